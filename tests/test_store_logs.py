"""app.store.logs on the real database (SQLite file, or PostgreSQL when configured)."""

import uuid
from typing import Any

import pytest

from app import store
from app.db import SessionFactory
from app.errors import JobNotFound
from app.models import JobCreate, JobResult, JobState, LogChunk
from app.settings import Settings
from app.store import logs as log_store

WORKER = "worker-a"


async def running_job(session_factory: SessionFactory, settings: Settings) -> uuid.UUID:
    async with session_factory() as session:
        job, _ = await store.create_job(
            session=session, job_in=JobCreate(image="busybox"), settings=settings
        )
    async with session_factory() as session:
        claimed = await store.claim_next_job(session=session, worker_id=WORKER, lease_seconds=60)
    assert claimed is not None and claimed.id == job.id
    return job.id


def chunk(job_id: uuid.UUID, seq: int, stream: str, data: str, attempt: int = 1) -> LogChunk:
    return LogChunk(job_id=job_id, seq=seq, attempt=attempt, stream=stream, data=data)


async def append(
    session_factory: SessionFactory, job_id: uuid.UUID, *chunks: LogChunk, worker: str = WORKER
) -> bool:
    async with session_factory() as session:
        return await log_store.append_chunks(
            session=session, job_id=job_id, worker_id=worker, chunks=chunks
        )


async def test_chunks_are_appended_numbered_and_read_back_with_filters(
    settings: Settings, session_factory: SessionFactory
) -> None:
    job_id = await running_job(session_factory, settings)
    async with session_factory() as session:
        assert await log_store.last_seq(session=session, job_id=job_id) is None
        assert await log_store.next_seq(session=session, job_id=job_id) == 0
    assert await append(
        session_factory,
        job_id,
        chunk(job_id, 0, "stdout", "a\n", attempt=1),
        chunk(job_id, 1, "stderr", "é\x01", attempt=1),
        chunk(job_id, 2, "stdout", "b\n", attempt=2),
        chunk(job_id, 3, "stdout", "cd", attempt=2),
    )
    async with session_factory() as session:
        assert await log_store.last_seq(session=session, job_id=job_id) == 3
        assert await log_store.next_seq(session=session, job_id=job_id) == 4

        async def seqs(**filters: Any) -> list[int]:
            found = await log_store.read_chunks(session=session, job_id=job_id, **filters)
            return [c.seq for c in found]

        assert await seqs() == [0, 1, 2, 3]
        assert await seqs(offset=1) == [1, 2, 3]
        assert await seqs(stream="stdout") == [0, 2, 3]
        assert await seqs(stream="stderr", offset=2) == []
        assert await seqs(attempt=2) == [2, 3]
        assert await seqs(up_to=2) == [0, 1, 2]
        assert await seqs(offset=1, limit=2) == [1, 2]
        assert await seqs(offset=99) == []
        # Characters, not bytes: a re-attached worker skips this much of the output it reads.
        assert await log_store.stored_sizes(session=session, job_id=job_id, attempt=1) == {
            "stdout": 2,
            "stderr": 2,
        }
        assert await log_store.stored_sizes(session=session, job_id=job_id, attempt=2) == {
            "stdout": 4,
            "stderr": 0,
        }
        assert await log_store.stored_sizes(session=session, job_id=job_id, attempt=3) == {
            "stdout": 0,
            "stderr": 0,
        }
        other = uuid.uuid4()
        assert await log_store.read_chunks(session=session, job_id=other) == []


async def test_only_the_worker_holding_the_claim_appends(
    settings: Settings, session_factory: SessionFactory
) -> None:
    job_id = await running_job(session_factory, settings)
    assert not await append(session_factory, job_id, chunk(job_id, 0, "stdout", "x"), worker="b")
    assert await append(session_factory, job_id, chunk(job_id, 0, "stdout", "x"))
    # A seq already taken (by a later attempt, say) is refused, not raised.
    assert not await append(session_factory, job_id, chunk(job_id, 0, "stdout", "y"))
    async with session_factory() as session:
        assert await store.finish_job(
            session=session,
            job_id=job_id,
            worker_id=WORKER,
            result=JobResult(state=JobState.succeeded, exit_code=0, stdout="xz"),
            chunks=[chunk(job_id, 1, "stdout", "z")],
        )
    # Once the job has ended nothing more is appended, not even by its worker.
    assert not await append(session_factory, job_id, chunk(job_id, 2, "stdout", "late"))
    async with session_factory() as session:
        stored = await log_store.read_chunks(session=session, job_id=job_id)
        assert [(c.seq, c.data) for c in stored] == [(0, "x"), (1, "z")]
        status = await log_store.get_log_status(session=session, job_id=job_id)
        assert (status.state, status.attempt, status.exit_code) == (JobState.succeeded, 1, 0)


async def test_a_result_written_without_the_claim_drops_its_chunks(
    settings: Settings, session_factory: SessionFactory
) -> None:
    job_id = await running_job(session_factory, settings)
    async with session_factory() as session:
        assert not await store.finish_job(
            session=session,
            job_id=job_id,
            worker_id="not-the-worker",
            result=JobResult(state=JobState.failed, exit_code=1),
            chunks=[chunk(job_id, 0, "stdout", "x")],
        )
    async with session_factory() as session:
        assert await log_store.read_chunks(session=session, job_id=job_id) == []
        with pytest.raises(JobNotFound):
            await log_store.get_log_status(session=session, job_id=uuid.uuid4())
