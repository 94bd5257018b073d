"""The pool stores a running job's output as log chunks (fake runner, real database)."""

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app import store
from app.db import SessionFactory
from app.models import JobCreate, JobState, LogChunk
from app.settings import Settings
from app.store import logs as log_store
from app.worker.logs import MAX_CHUNK_CHARS, JobLog
from app.worker.runner import ContainerRun, JobSpec, LabelledContainer
from tests.worker.test_pool import (
    FakeRunner,
    claim,
    container_run,
    make_pool,
    running,
    submit,
    wait_event,
    wait_for_state,
    wait_until,
)


async def chunks_of(session_factory: SessionFactory, job_id: uuid.UUID) -> Sequence[LogChunk]:
    async with session_factory() as session:
        return await log_store.read_chunks(session=session, job_id=job_id)


def joined(chunks: Sequence[LogChunk], stream: str, attempt: int | None = None) -> str:
    return "".join(c.data for c in chunks if c.stream == stream and attempt in (None, c.attempt))


def rows(chunks: Sequence[LogChunk]) -> list[tuple[int, int, str, str]]:
    return [(c.seq, c.attempt, c.stream, c.data) for c in chunks]


async def test_output_is_stored_while_the_job_runs_and_adds_up_to_the_final_output(
    settings: Settings, session_factory: SessionFactory
) -> None:
    gate = asyncio.Event()

    async def prints(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        sink = runner.sinks[spec.job_id]
        sink("stdout", "one\n")
        sink("stdout", "two\n")
        sink("stderr", "warn\n")
        await gate.wait()
        sink("stdout", "three\n")
        # The final reading has a last line the follower never saw.
        return container_run(stdout="one\ntwo\nthree\nfour", stderr="warn\n")

    runner = FakeRunner(prints)
    job = await submit(session_factory, settings)
    pool = make_pool(session_factory, runner, settings)
    with pool.events.subscribe(job.id) as changed:
        async with running(pool):
            await wait_event(changed, "a wake-up for the first chunks")
            live = await chunks_of(session_factory, job.id)
            # One write for everything gathered in the interval, a chunk per stream run.
            assert rows(live) == [(0, 1, "stdout", "one\ntwo\n"), (1, 1, "stderr", "warn\n")]
            still = await wait_for_state(session_factory, job.id, {JobState.running})
            assert still.attempt == 1
            gate.set()
            done = await wait_for_state(session_factory, job.id)
    chunks = await chunks_of(session_factory, job.id)
    assert done.state is JobState.succeeded
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert joined(chunks, "stdout") == done.stdout == "one\ntwo\nthree\nfour"
    assert joined(chunks, "stderr") == done.stderr == "warn\n"
    assert rows(chunks)[2:] == [(2, 1, "stdout", "three\nfour")]


async def test_a_short_job_writes_its_output_with_its_result_in_one_transaction(
    settings: Settings, session_factory: SessionFactory, db_engine: AsyncEngine
) -> None:
    async def echo(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        runner.sinks[spec.job_id]("stdout", "hi\n")
        return container_run(stdout="hi\n")

    runner = FakeRunner(echo)
    job = await submit(session_factory, settings)
    # What each connection ran, in order: other loops of the pool use other connections.
    seen: list[tuple[int, str]] = []

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        kind = sql.split()[0].upper()
        seen.append((id(conn), kind + (" chunks" if "job_log_chunks" in sql else "")))

    def commit(conn: Any) -> None:
        seen.append((id(conn), "COMMIT"))

    event.listen(db_engine.sync_engine, "before_cursor_execute", statement)
    event.listen(db_engine.sync_engine, "commit", commit)
    try:
        async with running(make_pool(session_factory, runner, settings)):
            done = await wait_for_state(session_factory, job.id)
    finally:
        event.remove(db_engine.sync_engine, "before_cursor_execute", statement)
        event.remove(db_engine.sync_engine, "commit", commit)
    assert done.stdout == "hi\n"
    assert rows(await chunks_of(session_factory, job.id)) == [(0, 1, "stdout", "hi\n")]
    inserts = [(i, conn) for i, (conn, kind) in enumerate(seen) if kind == "INSERT chunks"]
    assert len(inserts) == 1, seen
    # The chunk goes in the transaction that writes the result: the UPDATE right before.
    index, conn = inserts[0]
    before = [kind for c, kind in seen[:index] if c == conn and not kind.startswith("SELECT")]
    assert before[-1] == "UPDATE", seen


async def test_a_retried_job_numbers_its_chunks_on_across_attempts(
    settings: Settings, session_factory: SessionFactory
) -> None:
    async def fails(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        runner.sinks[spec.job_id]("stdout", f"attempt {spec.attempt}\n")
        return container_run(exit_code=3, stdout=f"attempt {spec.attempt}\n", stderr="bad\n")

    runner = FakeRunner(fails)
    fast = settings.model_copy(update={"retry_backoff_seconds": 0.05})
    async with session_factory() as session:
        job, _ = await store.create_job(
            session=session,
            job_in=JobCreate(image="jobdock-test-busybox:latest", max_attempts=2),
            settings=fast,
        )
    async with running(make_pool(session_factory, runner, fast)):
        await wait_until(lambda: len(runner.specs) == 2, "a second attempt")
        done = await wait_for_state(session_factory, job.id)
    assert (done.state, done.attempt) == (JobState.failed, 2)
    chunks = await chunks_of(session_factory, job.id)
    assert rows(chunks) == [
        (0, 1, "stdout", "attempt 1\n"),
        (1, 1, "stderr", "bad\n"),
        (2, 2, "stdout", "attempt 2\n"),
        (3, 2, "stderr", "bad\n"),
    ]


async def test_a_re_attached_job_does_not_store_its_output_twice(
    settings: Settings, session_factory: SessionFactory
) -> None:
    job = await submit(session_factory, settings)
    assert (await claim(session_factory, "dead-worker", lease_seconds=600)).id == job.id
    # The dead worker stored part of the output before it went.
    async with session_factory() as session:
        assert await log_store.append_chunks(
            session=session,
            job_id=job.id,
            worker_id="dead-worker",
            chunks=[LogChunk(job_id=job.id, seq=0, attempt=1, stream="stdout", data="one\ntw")],
        )

    async def whole_output(spec: JobSpec, cancel: asyncio.Event) -> ContainerRun:
        # A re-attached runner reads the container's output from its start.
        sink = runner.sinks[spec.job_id]
        sink("stdout", "one\n")
        sink("stdout", "two\nthree\n")
        sink("stderr", "err\n")
        return container_run(stdout="one\ntwo\nthree\n", stderr="err\n")

    runner = FakeRunner(whole_output)
    runner.containers = [LabelledContainer("c-orphan", job.id, 1, "dead-worker")]
    async with running(make_pool(session_factory, runner, settings, worker_id="new-worker")):
        done = await wait_for_state(session_factory, job.id)
    assert runner.attached == [("c-orphan", job.id)]
    chunks = await chunks_of(session_factory, job.id)
    assert rows(chunks) == [
        (0, 1, "stdout", "one\ntw"),
        (1, 1, "stdout", "o\nthree\n"),
        (2, 1, "stderr", "err\n"),
    ]
    assert joined(chunks, "stdout") == done.stdout


async def test_a_worker_that_lost_its_claim_stores_no_more_output(
    settings: Settings, session_factory: SessionFactory
) -> None:
    job = await submit(session_factory, settings)
    await claim(session_factory, "worker-a", lease_seconds=600)
    chunk = LogChunk(job_id=job.id, seq=0, attempt=1, stream="stdout", data="x")
    async with session_factory() as session:
        assert not await log_store.append_chunks(
            session=session, job_id=job.id, worker_id="worker-b", chunks=[chunk]
        )
    assert await chunks_of(session_factory, job.id) == []


def test_job_log_buffers_numbers_skips_and_reconciles() -> None:
    log = JobLog(uuid.uuid4(), 2, stored={"stdout": 3})
    log.feed("stdout", "ab")  # skipped: stored already
    log.feed("stdout", "cde")  # "c" skipped
    log.feed("stderr", "x\x00y")
    log.feed("stderr", "")
    log.feed("stdout", "f")
    log.reconcile("abcdefg", "x\ufffdy")
    log.next_seq = 5
    taken = log.take()
    assert not log.has_pending
    assert [(c.seq, c.attempt, c.stream, c.data) for c in log.chunks(taken)] == [
        (5, 2, "stdout", "de"),
        (6, 2, "stderr", "x\ufffdy"),
        (7, 2, "stdout", "fg"),
    ]
    log.restore(taken)
    assert log.has_pending
    log.advance(3)
    assert log.next_seq == 8


def test_job_log_splits_bursts_into_bounded_chunks() -> None:
    log = JobLog(uuid.uuid4(), 1)
    log.feed("stdout", "a" * (MAX_CHUNK_CHARS * 2 + 10))
    log.next_seq = 0
    sizes = [len(c.data) for c in log.chunks(log.take())]
    assert sizes == [MAX_CHUNK_CHARS, MAX_CHUNK_CHARS, 10]
