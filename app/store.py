"""Every query on jobs. Writes are single statements, so SQLite and PostgreSQL behave alike."""

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer
from sqlmodel import col

from app.db import SUBMISSIONS_CHANNEL
from app.errors import InvalidCursor, JobAlreadyFinished, JobNotFound
from app.models import (
    AppliedLimits,
    AttemptRecord,
    Instance,
    Job,
    JobCreate,
    JobResult,
    JobState,
    utc_now,
)
from app.settings import Settings

LOST_WITH_WORKER = "lost with its worker: its lease expired while it was running"


def parse_job_id(raw: str) -> uuid.UUID:
    """Read a job id from a URL; anything that is not a UUID names no job."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise JobNotFound(f"no job has the id {raw!r}") from None


async def create_job(*, session: AsyncSession, job_in: JobCreate, settings: Settings) -> Job:
    job = Job.model_validate(
        job_in,
        update={
            "cpu_shares": job_in.cpu_shares or settings.default_cpu_shares,
            "memory_mb": job_in.memory_mb or settings.default_memory_mb,
            "timeout_seconds": job_in.timeout_seconds or settings.default_timeout_seconds,
        },
    )
    session.add(job)
    if session.get_bind().dialect.name == "postgresql":
        # Delivered on commit: idle workers in other processes look for work at once.
        await session.execute(select(func.pg_notify(SUBMISSIONS_CHANNEL, "")))
    await session.commit()
    return job


async def get_job(*, session: AsyncSession, job_id: uuid.UUID) -> Job:
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(f"no job has the id {job_id}")
    return job


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        position = datetime.fromisoformat(created_at), uuid.UUID(job_id)
        if position[0].tzinfo is None:
            raise InvalidCursor()
        # Out-of-range instants (year 1 east of UTC, year 9999 west) overflow here, not in SQL.
        return position[0].astimezone(UTC), position[1]
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError):
        raise InvalidCursor() from None


async def list_jobs(
    *,
    session: AsyncSession,
    state: JobState | None = None,
    limit: int,
    cursor: str | None = None,
) -> tuple[Sequence[Job], str | None]:
    """One page of jobs, newest first, without their output."""
    query = select(Job).options(defer(Job.stdout), defer(Job.stderr))  # type: ignore[arg-type]
    if state is not None:
        query = query.where(col(Job.state) == state)
    if cursor is not None:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(
                col(Job.created_at) < created_at,
                and_(col(Job.created_at) == created_at, col(Job.id) < job_id),
            )
        )
    query = query.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)
    jobs = (await session.execute(query)).scalars().all()
    if len(jobs) > limit:
        return jobs[:limit], _encode_cursor(jobs[limit - 1])
    return jobs, None


async def _update_job(
    session: AsyncSession, conditions: Sequence[Any], **values: Any
) -> Job | None:
    """One UPDATE of the job that matches `conditions`; the job as it is now, or None."""
    result = await session.execute(
        update(Job)
        .where(*conditions)
        .values(**values)
        .returning(Job)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()


async def cancel_job(*, session: AsyncSession, job_id: uuid.UUID) -> Job:
    """Cancel a queued job at once, or ask the worker of a running job to kill it."""
    now = utc_now()
    job = await _update_job(
        session,
        [col(Job.id) == job_id, col(Job.state) == JobState.queued],
        state=JobState.cancelled,
        cancel_requested=True,
        error="cancelled before it started",
        finished_at=now,
    )
    if job is None:
        job = await _update_job(
            session,
            [col(Job.id) == job_id, col(Job.state) == JobState.running],
            cancel_requested=True,
        )
    await session.commit()
    if job is not None:
        return job
    existing = await get_job(session=session, job_id=job_id)
    raise JobAlreadyFinished(f"job {job_id} has already finished: it is {existing.state.value}")


async def claim_next_job(
    *, session: AsyncSession, worker_id: str, lease_seconds: float
) -> Job | None:
    """Atomically move the best queued job to running under this worker's lease."""
    now = utc_now()
    best = (
        select(col(Job.id))
        .where(col(Job.state) == JobState.queued, col(Job.run_after) <= now)
        .order_by(col(Job.priority).desc(), col(Job.created_at).asc())
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    job = await _update_job(
        session,
        [col(Job.id) == best, col(Job.state) == JobState.queued],
        state=JobState.running,
        worker_id=worker_id,
        attempt=col(Job.attempt) + 1,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        started_at=now,
    )
    await session.commit()
    return job


async def _write_while_held(
    session: AsyncSession, job_id: uuid.UUID, worker_id: str, values: dict[str, Any]
) -> bool:
    """Update a running job only while this worker's claim on it holds; commit."""
    written = await session.execute(
        update(Job)
        .where(*_held_by(job_id, worker_id))  # type: ignore[arg-type]
        .values(**values)
        .returning(col(Job.id))
    )
    held = written.scalar_one_or_none() is not None
    await session.commit()
    return held


def _held_by(job_id: uuid.UUID, worker_id: str) -> list[object]:
    return [
        col(Job.id) == job_id,
        col(Job.worker_id) == worker_id,
        col(Job.state) == JobState.running,
    ]


async def record_container(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    container_id: str,
    limits: AppliedLimits,
) -> None:
    await _write_while_held(
        session, job_id, worker_id, {"container_id": container_id, "limits": limits.model_dump()}
    )


async def release_job(*, session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> bool:
    """Undo a claim whose job never started: back to the queue, the attempt not counted."""
    return await _write_while_held(
        session,
        job_id,
        worker_id,
        {
            "state": JobState.queued,
            "worker_id": None,
            "lease_expires_at": None,
            "started_at": None,
            "attempt": col(Job.attempt) - 1,
        },
    )


async def renew_leases(
    *, session: AsyncSession, worker_id: str, job_ids: Sequence[uuid.UUID], lease_seconds: float
) -> dict[uuid.UUID, bool]:
    """Extend this worker's leases; returns each still-held job and whether cancel was asked."""
    if not job_ids:
        return {}
    result = await session.execute(
        update(Job)
        .where(
            col(Job.id).in_(job_ids),
            col(Job.worker_id) == worker_id,
            col(Job.state) == JobState.running,
        )
        .values(lease_expires_at=utc_now() + timedelta(seconds=lease_seconds))
        .returning(col(Job.id), col(Job.cancel_requested))
    )
    held = {job_id: cancel for job_id, cancel in result}
    await session.commit()
    return held


async def finish_job(
    *, session: AsyncSession, job_id: uuid.UUID, worker_id: str, result: JobResult
) -> bool:
    """Write a terminal state, only while this worker's claim holds. False if it did not."""
    if not result.state.is_terminal:
        raise ValueError(f"{result.state} is not a terminal state")
    return await _write_while_held(
        session,
        job_id,
        worker_id,
        {
            "state": result.state,
            "exit_code": result.exit_code,
            "stdout": result.stdout,
            "stderr": result.stderr,
            "output_truncated": result.output_truncated,
            "error": result.error,
            "finished_at": utc_now(),
            "lease_expires_at": None,
        },
    )


async def take_over_job(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    attempt: int,
    worker_id: str,
    lease_seconds: float,
    only_if_lease_expired: bool,
) -> Job | None:
    """Move a running attempt's claim to this worker, which found its container.

    Conditional on the job still running that very attempt, so a finished or retried job
    is never taken over.
    """
    now = utc_now()
    conditions = [
        col(Job.id) == job_id,
        col(Job.state) == JobState.running,
        col(Job.attempt) == attempt,
    ]
    if only_if_lease_expired:
        conditions.append(col(Job.lease_expires_at) < now)
    job = await _update_job(
        session,
        conditions,
        worker_id=worker_id,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
    )
    await session.commit()
    return job


def _requeued(run_after: datetime, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of a job going back to the queue for its next attempt."""
    return {
        "state": JobState.queued,
        "worker_id": None,
        "lease_expires_at": None,
        "run_after": run_after,
        "started_at": None,
        "container_id": None,
        "limits": None,
        "attempts": attempts,
        "exit_code": None,
        "error": None,
        "stdout": "",
        "stderr": "",
        "output_truncated": False,
    }


async def retry_job(
    *,
    session: AsyncSession,
    job: Job,
    worker_id: str,
    result: JobResult,
    run_after: datetime,
) -> bool:
    """Record a failed attempt and queue the next one, only while this worker's claim holds."""
    record = AttemptRecord(
        attempt=job.attempt,
        state=result.state,
        exit_code=result.exit_code,
        error=result.error,
        worker_id=worker_id,
        started_at=job.started_at,
        finished_at=utc_now(),
    )
    attempts = [*(job.attempts or []), record.model_dump(mode="json")]
    return await _write_while_held(session, job.id, worker_id, _requeued(run_after, attempts))


async def rescue_lost_jobs(
    *, session: AsyncSession, next_run_after: Callable[[int], datetime]
) -> list[tuple[uuid.UUID, JobState]]:
    """Re-queue, or end when its attempts are used, each running job whose lease expired.

    Each write is conditional on what was read (worker, attempt, lease), so a job its
    worker renewed or finished meanwhile is left alone.
    """
    now = utc_now()
    lost = (
        (
            await session.execute(
                select(Job)
                .options(defer(Job.stdout), defer(Job.stderr))  # type: ignore[arg-type]
                .where(col(Job.state) == JobState.running, col(Job.lease_expires_at) < now)
            )
        )
        .scalars()
        .all()
    )
    await session.commit()
    rescued = []
    for job in lost:
        record = AttemptRecord(
            attempt=job.attempt,
            state=JobState.failed,
            exit_code=None,
            error=LOST_WITH_WORKER,
            worker_id=job.worker_id,
            started_at=job.started_at,
            finished_at=now,
        )
        if job.attempt < job.max_attempts:
            state = JobState.queued
            attempts = [*(job.attempts or []), record.model_dump(mode="json")]
            values = _requeued(next_run_after(job.attempt), attempts)
        else:
            state = JobState.failed
            values = {
                "state": state,
                "error": LOST_WITH_WORKER,
                "finished_at": now,
                "lease_expires_at": None,
            }
        written = await session.execute(
            update(Job)
            .where(
                col(Job.id) == job.id,
                col(Job.state) == JobState.running,
                col(Job.worker_id) == job.worker_id,
                col(Job.attempt) == job.attempt,
                col(Job.lease_expires_at) < now,
            )
            .values(**values)
            .returning(col(Job.id))
        )
        if written.scalar_one_or_none() is not None:
            rescued.append((job.id, state))
        await session.commit()
    return rescued


async def get_instance_id(*, session: AsyncSession) -> uuid.UUID:
    """The id of this installation's database (created by migration 0003)."""
    instance_id = (
        await session.execute(select(col(Instance.id)).order_by(col(Instance.created_at)).limit(1))
    ).scalar_one_or_none()
    if instance_id is None:
        instance = Instance()
        session.add(instance)
        await session.commit()
        return instance.id
    return instance_id


async def get_states(
    *, session: AsyncSession, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, JobState]:
    if not job_ids:
        return {}
    rows = await session.execute(
        select(col(Job.id), col(Job.state)).where(col(Job.id).in_(job_ids))
    )
    return {job_id: JobState(state) for job_id, state in rows}
