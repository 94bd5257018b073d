"""The fast path of POST /jobs: the queue cap without a probe per submission, and
submissions written in groups (one INSERT and one commit for all that arrived meanwhile).

A submission with an Idempotency-Key takes `create_job` instead: its row can meet the
unique index, and a group must not fail for one row.
"""

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import Reader, SyncWriter
from app.errors import QueueFull
from app.models import JobCreate, JobState
from app.settings import Settings
from app.store.jobs import (
    JOBS,
    _add_jobs,
    _add_jobs_on,
    _check_owner_quota,
    _count_queued,
    _new_job,
)

# How many jobs are queued, counted up to a cap: reads at most `queued_cap` index entries.
_QUEUED_UP_TO = select(func.count()).select_from(
    select(1)
    .select_from(JOBS)
    .where(JOBS.c.state == JobState.queued)
    .limit(bindparam("queued_cap"))
    .subquery()
)


class QueueRoom:
    """JOBDOCK_MAX_QUEUED for one process, without reading up to that many index entries
    for every submission.

    The room left is probed, then counted down by this process's own submissions. It is
    probed again when it would not take the next submission (so a 503 is only ever
    answered on a fresh probe) and after `refresh_seconds` (to see jobs that started, and
    other processes' submissions). A probe also counts the submissions of this process
    not committed yet (`pending`: they are not in the table). So one process alone never
    passes the cap; several can pass it by what the others queued within
    `refresh_seconds`."""

    def __init__(
        self,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        pending: Callable[[], int] = lambda: 0,
    ) -> None:
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._pending = pending
        self._room = 0
        self._probed_at: float | None = None
        # One probe at a time: concurrent submissions wait for it rather than each probe
        # and each count down from the same room.
        self._probing = asyncio.Lock()

    async def take(self, reader: Reader, settings: Settings, adding: int) -> None:
        """Make room for `adding` jobs, or raise QueueFull."""
        if not settings.max_queued:
            return
        async with self._probing:
            now = self._clock()
            stale = self._probed_at is None or now - self._probed_at >= self._refresh_seconds
            if stale or self._room < adding:
                found = await reader.execute(_QUEUED_UP_TO, {"queued_cap": settings.max_queued})
                self._room = settings.max_queued - int(found.scalar_one()) - self._pending()
                self._probed_at = now
            if self._room < adding:
                queued = await _count_queued(reader)  # for the message only
                raise QueueFull(
                    f"the queue is full: {queued} jobs are waiting and this service takes at "
                    f"most {settings.max_queued}; retry later",
                    retry_after_seconds=settings.queue_full_retry_after_seconds,
                )
            self._room -= adding

    def forget(self) -> None:
        """Probe again at the next submission (after jobs were queued some other way)."""
        self._probed_at = None


# Rows in one group at most: on a SQLite file a group is written on the event loop's thread
# (some 20 us a row), which must not stop for long whatever the load.
MAX_GROUP = 256


class SubmissionWriter:
    """Group commit of new jobs: `enqueue()`'s future is done once its row is committed, in
    one INSERT and one commit with every row added while the previous group was being
    written.

    Under load this is the difference between one write transaction per request, each
    holding SQLite's single writer across event-loop turns, and one per group."""

    def __init__(self, engine: AsyncEngine, sync_writer: SyncWriter | None = None) -> None:
        self._engine = engine
        # On a SQLite file: groups are written on the loop's thread (see SyncWriter).
        self._sync_writer = sync_writer
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None
        self._group_size = 0

    @property
    def in_flight(self) -> int:
        """Rows added and not committed yet (nor failed)."""
        return len(self._pending) + self._group_size

    def enqueue(self, row: dict[str, Any]) -> "asyncio.Future[None]":
        """Add a row to the next group (counted in `in_flight` from now on); the future is
        done once it is committed, or failed with its group's error. A request cancelled
        while it awaits the future still has its row written (like a commit whose answer
        was lost); only its answer is dropped."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write(), name="jobdock-submissions")
        return future

    async def _write(self) -> None:
        while self._pending:
            group = self._pending[:MAX_GROUP]
            self._pending = self._pending[MAX_GROUP:]
            self._group_size = len(group)
            try:
                rows = [row for row, _ in group]
                if self._sync_writer is None or not await _add_jobs_on(self._sync_writer, rows):
                    async with self._engine.connect() as connection:
                        await _add_jobs(connection, rows)
            except Exception as exc:
                self._group_size = 0
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
            else:
                self._group_size = 0
                for _, future in group:
                    if not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        """Wait for the group being written (and those queued behind it)."""
        if self._writing is not None:
            await asyncio.wait([self._writing])


async def queue_job(
    *,
    writer: SubmissionWriter,
    reader: Reader,
    room: QueueRoom,
    job_in: JobCreate,
    settings: Settings,
    owner: uuid.UUID | None = None,
    owner_max_queued: int | None = None,
) -> tuple[dict[str, Any], "asyncio.Future[None]"]:
    """Queue a job without an Idempotency-Key (for one, see create_job): the key's quota
    and the queue cap read on `reader`, the row handed to `writer` for its next group.
    Returns the new job's row (every column) and the future of its commit, to be awaited
    once `reader` is given back (a pooled connection must not be held while waiting for
    the writer, which takes one from the same pool)."""
    await _check_owner_quota(reader, settings, owner, owner_max_queued, 1)
    await room.take(reader, settings, 1)
    row = _new_job(job_in, settings, owner)
    return row, writer.enqueue(row)
