"""Every query on a job's log chunks: its output as written while it runs.

A job's chunks are numbered by `seq` from 0, across all its attempts; only the worker that
holds the job's claim writes them, so it numbers them itself and they commit in order.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.errors import JobNotFound
from app.models import Job, JobState, LogChunk
from app.store.jobs import LOG_CHUNKS, chunk_rows, held_by, notify_job_changed


@dataclass(frozen=True)
class LogStatus:
    """What a log reader needs of a job: where it is and, once it ended, how."""

    state: JobState
    attempt: int
    exit_code: int | None
    error: str | None


async def get_log_status(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> LogStatus:
    """The job's state without its output; JobNotFound if there is no such job (or, with
    `owner`, if that key does not own it). Readers of chunks call this first."""
    query = select(col(Job.state), col(Job.attempt), col(Job.exit_code), col(Job.error)).where(
        col(Job.id) == job_id
    )
    if owner is not None:
        query = query.where(col(Job.owner) == owner)
    row = (await session.execute(query)).one_or_none()
    if row is None:
        raise JobNotFound(f"no job has the id {job_id}")
    state, attempt, exit_code, error = row
    return LogStatus(state=JobState(state), attempt=attempt, exit_code=exit_code, error=error)


async def next_seq(*, session: AsyncSession, job_id: uuid.UUID) -> int:
    """The seq the job's next chunk gets: one past its last, or 0."""
    last = await last_seq(session=session, job_id=job_id)
    return 0 if last is None else last + 1


async def last_seq(*, session: AsyncSession, job_id: uuid.UUID) -> int | None:
    """The seq of the job's last stored chunk, or None if it has none."""
    return (
        await session.execute(
            select(func.max(col(LogChunk.seq))).where(col(LogChunk.job_id) == job_id)
        )
    ).scalar_one_or_none()


async def stored_sizes(*, session: AsyncSession, job_id: uuid.UUID, attempt: int) -> dict[str, int]:
    """Characters of each stream stored for one attempt (absent streams are 0)."""
    rows = await session.execute(
        select(col(LogChunk.stream), func.sum(func.length(col(LogChunk.data))))
        .where(col(LogChunk.job_id) == job_id, col(LogChunk.attempt) == attempt)
        .group_by(col(LogChunk.stream))
    )
    sizes = {"stdout": 0, "stderr": 0}
    for stream, size in rows:
        sizes[stream] = int(size or 0)
    return sizes


async def append_chunks(
    *, session: AsyncSession, job_id: uuid.UUID, worker_id: str, chunks: Sequence[LogChunk]
) -> bool:
    """Store a running job's new chunks, only while this worker's claim holds; commit.

    The insert comes first, so the claim is checked inside the write transaction (under
    SQLite's write lock, and with the job's row locked on PostgreSQL): a rescue cannot
    requeue the job between the check and the commit. False, with nothing written, if
    the claim is gone.
    """
    try:
        if chunks:
            # One Core executemany: the ORM's unit of work adds nothing for plain new rows.
            await session.execute(insert(LOG_CHUNKS), chunk_rows(chunks))
    except IntegrityError:
        # Seqs taken: a later attempt of the job already writes its own output.
        await session.rollback()
        return False
    held = (
        await session.execute(
            select(col(Job.id))
            .where(*held_by(job_id, worker_id))  # type: ignore[arg-type]
            .with_for_update()
        )
    ).scalar_one_or_none() is not None
    if not held:
        await session.rollback()
        return False
    await notify_job_changed(session, job_id)
    await session.commit()
    return True


async def read_chunks(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    offset: int = 0,
    stream: str | None = None,
    attempt: int | None = None,
    up_to: int | None = None,
    limit: int | None = None,
) -> Sequence[LogChunk]:
    """The job's chunks with `offset <= seq` (`<= up_to`), in order; optionally only one
    stream's or one attempt's."""
    query = select(LogChunk).where(col(LogChunk.job_id) == job_id, col(LogChunk.seq) >= offset)
    if stream is not None:
        query = query.where(col(LogChunk.stream) == stream)
    if attempt is not None:
        query = query.where(col(LogChunk.attempt) == attempt)
    if up_to is not None:
        query = query.where(col(LogChunk.seq) <= up_to)
    query = query.order_by(col(LogChunk.seq))
    if limit is not None:
        query = query.limit(limit)
    return (await session.execute(query)).scalars().all()
