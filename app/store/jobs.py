"""Every query on jobs. Writes are single statements, so SQLite and PostgreSQL behave alike."""

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, defer
from sqlmodel import col

from app.db import JOB_EVENTS_CHANNEL, SUBMISSIONS_CHANNEL
from app.errors import (
    IdempotencyKeyReused,
    InvalidCursor,
    JobAlreadyFinished,
    JobNotFound,
    JobStillActive,
    QueueFull,
    QuotaExceeded,
)
from app.models import (
    TERMINAL_STATES,
    ApiKey,
    AppliedLimits,
    AttemptRecord,
    CallbackState,
    Instance,
    Job,
    JobCreate,
    JobResult,
    JobState,
    LogChunk,
    utc_now,
)
from app.settings import Settings

# Jobs purged per statement by the retention, so one purge never holds a long lock.
PURGE_BATCH_SIZE = 500
LOST_WITH_WORKER = "lost with its worker: its lease expired while it was running"


def parse_job_id(raw: str) -> uuid.UUID:
    """Read a job id from a URL; anything that is not a UUID names no job."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise JobNotFound(f"no job has the id {raw!r}") from None


def _is_postgresql(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def notify_job_changed(session: AsyncSession, job_id: uuid.UUID) -> None:
    """On PostgreSQL, tell callers waiting in other processes (delivered on commit)."""
    if _is_postgresql(session):
        await session.execute(select(func.pg_notify(JOB_EVENTS_CHANNEL, str(job_id))))


def request_hash(job_in: JobCreate) -> str:
    """A fingerprint of what a submission asks for: equal for equal jobs, however spelled."""
    canonical = json.dumps(job_in.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _new_job(job_in: JobCreate, settings: Settings) -> Job:
    return Job.model_validate(
        job_in,
        update={
            "cpu_shares": job_in.cpu_shares or settings.default_cpu_shares,
            "cpus": job_in.cpus or settings.default_cpus,
            "memory_mb": job_in.memory_mb or settings.default_memory_mb,
            "timeout_seconds": job_in.timeout_seconds or settings.default_timeout_seconds,
        },
    )


async def _count_queued(session: AsyncSession, *conditions: Any) -> int:
    """How many jobs are queued (of those that meet `conditions`)."""
    count = await session.execute(
        select(func.count()).select_from(Job).where(col(Job.state) == JobState.queued, *conditions)
    )
    return int(count.scalar_one())


async def _check_queue_room(session: AsyncSession, settings: Settings, adding: int) -> None:
    if not settings.max_queued:
        return
    queued = await _count_queued(session)
    if queued + adding > settings.max_queued:
        raise QueueFull(
            f"the queue is full: {queued} jobs are waiting and this service takes at most "
            f"{settings.max_queued}; retry later",
            retry_after_seconds=settings.queue_full_retry_after_seconds,
        )


async def _check_owner_quota(
    session: AsyncSession,
    settings: Settings,
    owner: uuid.UUID | None,
    max_queued: int | None,
    adding: int,
) -> None:
    """429 for a key whose queued jobs would exceed its quota."""
    if owner is None or max_queued is None:
        return
    queued = await _count_queued(session, col(Job.owner) == owner)
    if queued + adding > max_queued:
        raise QuotaExceeded(
            f"this API key has {queued} jobs queued and may have at most {max_queued}; "
            "retry when some have started",
            retry_after_seconds=settings.queue_full_retry_after_seconds,
        )


def _scoped_key(owner: uuid.UUID | None, key: str) -> str:
    """An Idempotency-Key as stored: scoped by its owner, so tenants never collide."""
    return key if owner is None else f"{owner.hex}:{key}"


async def _add_jobs(session: AsyncSession, jobs: Sequence[Job]) -> None:
    session.add_all(jobs)
    if _is_postgresql(session):
        # Delivered on commit: idle workers in other processes look for work at once.
        await session.execute(select(func.pg_notify(SUBMISSIONS_CHANNEL, "")))
    await session.commit()


async def _job_with_key(
    session: AsyncSession, key: str, fingerprint: str, settings: Settings
) -> Job | None:
    """The live job submitted under `key`, if any; an expired key is released."""
    job = (
        await session.execute(select(Job).where(col(Job.idempotency_key) == key))
    ).scalar_one_or_none()
    if job is None:
        return None
    if job.created_at <= utc_now() - settings.idempotency_ttl:
        await session.execute(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.idempotency_key) == key)
            .values(idempotency_key=None, request_hash=None)
        )
        await session.commit()
        return None
    if job.request_hash != fingerprint:
        # The caller's own key, not the owner-scoped form it is stored in.
        shown = key if job.owner is None else key.removeprefix(f"{job.owner.hex}:")
        raise IdempotencyKeyReused(
            f"the Idempotency-Key {shown!r} was used for a different request (job {job.id}); "
            "use a new key for a new job"
        )
    return job


async def create_job(
    *,
    session: AsyncSession,
    job_in: JobCreate,
    settings: Settings,
    idempotency_key: str | None = None,
    owner: uuid.UUID | None = None,
    owner_max_queued: int | None = None,
) -> tuple[Job, bool]:
    """Queue a job. With an idempotency key already used for the same request, the job
    it made is returned instead; the flag says whether a job was created.

    `owner` (the submitting API key) owns the job and scopes its idempotency key;
    `owner_max_queued` is that key's quota of queued jobs."""
    fingerprint = request_hash(job_in)
    stored_key = None if idempotency_key is None else _scoped_key(owner, idempotency_key)
    if stored_key is not None:
        existing = await _job_with_key(session, stored_key, fingerprint, settings)
        if existing is not None:
            return existing, False
    await _check_owner_quota(session, settings, owner, owner_max_queued, 1)
    await _check_queue_room(session, settings, 1)
    job = _new_job(job_in, settings)
    job.owner = owner
    if stored_key is not None:
        job.idempotency_key = stored_key
        job.request_hash = fingerprint
    try:
        await _add_jobs(session, [job])
    except IntegrityError:
        # The same key, submitted at the same moment by another request, won.
        await session.rollback()
        if stored_key is None:
            raise
        existing = await _job_with_key(session, stored_key, fingerprint, settings)
        if existing is None:
            raise
        return existing, False
    return job, True


async def create_jobs(
    *,
    session: AsyncSession,
    jobs_in: Sequence[JobCreate],
    settings: Settings,
    owner: uuid.UUID | None = None,
    owner_max_queued: int | None = None,
) -> list[Job]:
    """Queue several jobs in one transaction: all of them or none."""
    await _check_owner_quota(session, settings, owner, owner_max_queued, len(jobs_in))
    await _check_queue_room(session, settings, len(jobs_in))
    jobs = [_new_job(job_in, settings) for job_in in jobs_in]
    for job in jobs:
        job.owner = owner
    await _add_jobs(session, jobs)
    return jobs


async def get_job(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> Job:
    """The job; with `owner`, only if that key owns it (another tenant's job is not found)."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or (owner is not None and job.owner != owner):
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
    labels: dict[str, str] | None = None,
    image: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int,
    cursor: str | None = None,
    owner: uuid.UUID | None = None,
) -> tuple[Sequence[Job], str | None]:
    """One page of jobs, newest first, without their output; every filter must hold."""
    query = select(Job).options(
        defer(Job.stdout),  # type: ignore[arg-type]
        defer(Job.stderr),  # type: ignore[arg-type]
        defer(Job.stdin),  # type: ignore[arg-type]
    )
    if owner is not None:
        query = query.where(col(Job.owner) == owner)
    if state is not None:
        query = query.where(col(Job.state) == state)
    for key, value in (labels or {}).items():
        query = query.where(col(Job.labels)[key].as_string() == value)
    if image is not None:
        query = query.where(col(Job.image) == image)
    if created_after is not None:
        query = query.where(col(Job.created_at) > created_after)
    if created_before is not None:
        query = query.where(col(Job.created_at) < created_before)
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


def _owned_by(owner: uuid.UUID | None) -> list[Any]:
    return [] if owner is None else [col(Job.owner) == owner]


async def delete_job(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> None:
    """Remove a finished job and its logs; a queued or running job is refused."""
    deleted = await session.execute(
        delete(Job)
        .where(col(Job.id) == job_id, col(Job.state).in_(TERMINAL_STATES), *_owned_by(owner))
        .returning(col(Job.id))
    )
    if deleted.scalar_one_or_none() is None:
        await session.rollback()
        job = await get_job(session=session, job_id=job_id, owner=owner)
        raise JobStillActive(
            f"job {job_id} is {job.state.value}; cancel it and wait until it ends, then delete it"
        )
    await session.execute(delete(LogChunk).where(col(LogChunk.job_id) == job_id))
    await session.commit()


async def purge_finished_jobs(
    *, session: AsyncSession, finished_before: datetime, batch_size: int = PURGE_BATCH_SIZE
) -> int:
    """Delete up to `batch_size` jobs (and their logs) that finished before the instant."""
    job_ids = (
        (
            await session.execute(
                select(col(Job.id))
                .where(
                    col(Job.finished_at) < finished_before,
                    col(Job.state).in_(TERMINAL_STATES),
                )
                .limit(batch_size)
            )
        )
        .scalars()
        .all()
    )
    if not job_ids:
        await session.commit()
        return 0
    await session.execute(delete(LogChunk).where(col(LogChunk.job_id).in_(job_ids)))
    result = await session.execute(
        delete(Job)
        .where(col(Job.id).in_(job_ids), col(Job.state).in_(TERMINAL_STATES))
        .returning(col(Job.id))
    )
    purged = len(result.all())
    await session.commit()
    return purged


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


def _terminal(state: JobState, now: datetime, **values: Any) -> dict[str, Any]:
    """The columns of a job reaching a terminal state; its webhook, if any, becomes due."""
    return {
        "state": state,
        "finished_at": now,
        "lease_expires_at": None,
        "callback_state": case(
            (col(Job.callback_url).is_not(None), CallbackState.pending.value), else_=None
        ),
        "callback_next_at": case((col(Job.callback_url).is_not(None), now), else_=None),
        # No attempt will read it again; it may be large, or secret.
        "stdin": None,
        **values,
    }


async def cancel_job(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> Job:
    """Cancel a queued job at once, or ask the worker of a running job to kill it."""
    now = utc_now()
    job = await _update_job(
        session,
        [col(Job.id) == job_id, col(Job.state) == JobState.queued, *_owned_by(owner)],
        **_terminal(
            JobState.cancelled, now, cancel_requested=True, error="cancelled before it started"
        ),
    )
    if job is not None:
        await notify_job_changed(session, job_id)
    if job is None:
        job = await _update_job(
            session,
            [col(Job.id) == job_id, col(Job.state) == JobState.running, *_owned_by(owner)],
            cancel_requested=True,
        )
    await session.commit()
    if job is not None:
        return job
    existing = await get_job(session=session, job_id=job_id, owner=owner)
    raise JobAlreadyFinished(f"job {job_id} has already finished: it is {existing.state.value}")


async def claim_next_job(
    *, session: AsyncSession, worker_id: str, lease_seconds: float
) -> Job | None:
    """Atomically move the best queued job to running under this worker's lease."""
    now = utc_now()
    best = (
        select(col(Job.id))
        .where(
            col(Job.state) == JobState.queued,
            col(Job.run_after) <= now,
            _owner_below_max_running(),
        )
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


def _owner_below_max_running() -> Any:
    """A queued job may start unless its owner's key already runs its `max_running` jobs.

    The keys at their limit are found once per claim (not per candidate row): a tenant with
    a long blocked queue does not slow down the claim for everyone else. A job without
    owner passes at once. Concurrent claims may overshoot a limit by at most the number
    of claims made at the same instant.
    """
    running = aliased(Job)
    running_count = (
        select(func.count())
        .select_from(running)
        .where(col(running.owner) == col(ApiKey.id), col(running.state) == JobState.running)
        .correlate(ApiKey)
        .scalar_subquery()
    )
    at_limit = select(col(ApiKey.id)).where(
        col(ApiKey.max_running).is_not(None), col(ApiKey.max_running) <= running_count
    )
    return or_(col(Job.owner).is_(None), col(Job.owner).not_in(at_limit))


async def _write_while_held(
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    values: dict[str, Any],
    chunks: Sequence[LogChunk] = (),
) -> bool:
    """Update a running job only while this worker's claim on it holds (and store its last
    log chunks in the same transaction); commit."""
    written = await session.execute(
        update(Job)
        .where(*held_by(job_id, worker_id))  # type: ignore[arg-type]
        .values(**values)
        .returning(col(Job.id))
    )
    held = written.scalar_one_or_none() is not None
    if held and chunks:
        session.add_all(chunks)
    await session.commit()
    return held


def held_by(job_id: uuid.UUID, worker_id: str) -> list[object]:
    """The conditions of a running job still claimed by this worker."""
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
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    result: JobResult,
    chunks: Sequence[LogChunk] = (),
) -> bool:
    """Write a terminal state, only while this worker's claim holds. False if it did not.

    `chunks`, the attempt's last log chunks, are stored in the same transaction."""
    if not result.state.is_terminal:
        raise ValueError(f"{result.state} is not a terminal state")
    await notify_job_changed(session, job_id)
    return await _write_while_held(
        session,
        job_id,
        worker_id,
        _terminal(
            result.state,
            utc_now(),
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            output_truncated=result.output_truncated,
            error=result.error,
            resources=None if result.resources is None else result.resources.model_dump(),
        ),
        chunks,
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
    chunks: Sequence[LogChunk] = (),
) -> bool:
    """Record a failed attempt and queue the next one, only while this worker's claim holds.

    `chunks`, the attempt's last log chunks, are stored in the same transaction."""
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
    await notify_job_changed(session, job.id)
    return await _write_while_held(
        session, job.id, worker_id, _requeued(run_after, attempts), chunks
    )


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
            values = _terminal(state, now, error=LOST_WITH_WORKER)
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
            await notify_job_changed(session, job.id)
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
