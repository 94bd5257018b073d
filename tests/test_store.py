"""app.store on a real SQLite file: claiming, leases, conditional writes, cancel, listing."""

import asyncio
import base64
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col

from app import store
from app.db import SessionFactory, json_deserializer
from app.errors import InvalidCursor, JobAlreadyFinished, JobNotFound, QueueFull, QuotaExceeded
from app.models import Job, JobCreate, JobPublic, JobResult, JobState, utc_now
from app.settings import Settings

LEASE = 30.0
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


async def add_job(session_factory: SessionFactory, **fields: Any) -> Job:
    """Insert a job as stored rows look, with any column set explicitly."""
    values: dict[str, Any] = {
        "image": "busybox",
        "cpu_shares": 1024,
        "memory_mb": 256,
        "timeout_seconds": 300,
        **fields,
    }
    job = Job(**values)
    async with session_factory() as session:
        session.add(job)
        await session.commit()
    return job


async def read(session_factory: SessionFactory, job_id: uuid.UUID) -> Job:
    async with session_factory() as session:
        return await store.get_job(session=session, job_id=job_id)


async def claim(
    session_factory: SessionFactory, worker_id: str = "worker-a", lease_seconds: float = LEASE
) -> Job | None:
    async with session_factory() as session:
        return await store.claim_next_job(
            session=session, worker_id=worker_id, lease_seconds=lease_seconds
        )


async def claimed(
    session_factory: SessionFactory, worker_id: str = "worker-a", lease_seconds: float = LEASE
) -> Job:
    job = await claim(session_factory, worker_id, lease_seconds)
    assert job is not None, "nothing to claim"
    return job


async def finish(
    session_factory: SessionFactory, job_id: uuid.UUID, worker_id: str, result: JobResult
) -> bool:
    async with session_factory() as session:
        return await store.finish_job(
            session=session, job_id=job_id, worker_id=worker_id, result=result
        )


async def cancel(session_factory: SessionFactory, job_id: uuid.UUID) -> Job:
    async with session_factory() as session:
        return await store.cancel_job(session=session, job_id=job_id)


async def renew(
    session_factory: SessionFactory,
    worker_id: str,
    job_ids: Sequence[uuid.UUID],
    lease_seconds: float,
) -> dict[uuid.UUID, bool]:
    async with session_factory() as session:
        return await store.renew_leases(
            session=session, worker_id=worker_id, job_ids=job_ids, lease_seconds=lease_seconds
        )


async def fail_lost(session_factory: SessionFactory) -> list[uuid.UUID]:
    """Rescue lost jobs; with one attempt allowed (the default) they all end failed."""
    async with session_factory() as session:
        rescued = await store.rescue_lost_jobs(session=session, next_run_after=lambda _: T0)
    assert all(state is JobState.failed for _, state in rescued), rescued
    return [job_id for job_id, _ in rescued]


async def list_page(
    session_factory: SessionFactory,
    *,
    limit: int,
    cursor: str | None = None,
    state: JobState | None = None,
) -> tuple[list[Job], str | None]:
    async with session_factory() as session:
        jobs, next_cursor = await store.list_jobs(
            session=session, state=state, limit=limit, cursor=cursor
        )
        return list(jobs), next_cursor


async def walk(
    session_factory: SessionFactory, *, limit: int, state: JobState | None = None
) -> list[Job]:
    """Every page of the listing, following next_cursor until it is None."""
    seen: list[Job] = []
    cursor: str | None = None
    for _ in range(1000):
        page, cursor = await list_page(session_factory, limit=limit, cursor=cursor, state=state)
        assert len(page) <= limit
        seen.extend(page)
        if cursor is None:
            return seen
        assert page, "a page with a next cursor must not be empty"
    raise AssertionError("the listing never ends")


def assert_utc(value: datetime | None) -> datetime:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
    return value


def success(stdout: str = "done\n") -> JobResult:
    return JobResult(state=JobState.succeeded, exit_code=0, stdout=stdout)


async def test_twenty_claimers_take_ten_jobs_exactly_once(
    session_factory: SessionFactory,
) -> None:
    queued = {(await add_job(session_factory, command=["echo", str(n)])).id for n in range(10)}

    results = await asyncio.gather(
        *(claim(session_factory, worker_id=f"worker-{n}") for n in range(20))
    )

    won = [job for job in results if job is not None]
    assert len(won) == 10
    assert sorted(job.id for job in won) == sorted(queued)
    for job in won:
        stored = await read(session_factory, job.id)
        assert stored.state is JobState.running
        assert stored.worker_id == job.worker_id
        assert stored.attempt == 1
    assert len({job.worker_id for job in won}) == 10
    assert await claim(session_factory) is None


async def test_claim_order_is_priority_then_age_and_skips_future_jobs(
    session_factory: SessionFactory,
) -> None:
    now = utc_now()
    later = now + timedelta(hours=1)
    old_low = await add_job(session_factory, priority=0, created_at=now - timedelta(minutes=9))
    young_high = await add_job(session_factory, priority=5, created_at=now - timedelta(minutes=1))
    old_high = await add_job(session_factory, priority=5, created_at=now - timedelta(minutes=5))
    young_low = await add_job(session_factory, priority=0, created_at=now - timedelta(minutes=2))
    await add_job(
        session_factory, priority=10, created_at=now - timedelta(minutes=20), run_after=later
    )
    await add_job(
        session_factory, priority=0, created_at=now - timedelta(minutes=30), run_after=later
    )
    await add_job(session_factory, state=JobState.succeeded, priority=99)

    order = [(await claimed(session_factory)).id for _ in range(4)]

    assert order == [old_high.id, young_high.id, old_low.id, young_low.id]
    assert await claim(session_factory) is None


async def test_claim_takes_a_job_whose_run_after_has_passed(
    session_factory: SessionFactory,
) -> None:
    retried = await add_job(session_factory, run_after=utc_now() - timedelta(seconds=1))
    assert (await claimed(session_factory)).id == retried.id


async def test_claim_sets_worker_attempt_lease_and_start(session_factory: SessionFactory) -> None:
    job = await add_job(session_factory, attempt=2)
    before = utc_now()

    got = await claimed(session_factory, worker_id="worker-7", lease_seconds=45.0)

    after = utc_now()
    assert got.id == job.id
    assert got.state is JobState.running
    assert got.worker_id == "worker-7"
    assert got.attempt == 3
    started = assert_utc(got.started_at)
    lease = assert_utc(got.lease_expires_at)
    assert before <= started <= after
    assert lease - started == timedelta(seconds=45)
    stored = await read(session_factory, job.id)
    assert (stored.state, stored.worker_id, stored.attempt) == (JobState.running, "worker-7", 3)
    assert stored.started_at == started
    assert stored.lease_expires_at == lease


async def test_finish_writes_only_while_the_claim_holds(session_factory: SessionFactory) -> None:
    await add_job(session_factory)
    job = await claimed(session_factory, worker_id="worker-a")

    stolen = JobResult(state=JobState.failed, exit_code=1, stdout="x", error="nope")
    assert await finish(session_factory, job.id, "worker-b", stolen) is False
    untouched = await read(session_factory, job.id)
    assert untouched.state is JobState.running
    assert untouched.worker_id == "worker-a"
    assert untouched.exit_code is None
    assert untouched.stdout == ""
    assert untouched.error is None
    assert untouched.finished_at is None
    assert untouched.lease_expires_at == job.lease_expires_at

    assert await finish(session_factory, job.id, "worker-a", success("hello\n")) is True
    done = await read(session_factory, job.id)
    assert done.state is JobState.succeeded
    assert done.exit_code == 0
    assert done.stdout == "hello\n"
    assert done.lease_expires_at is None
    assert assert_utc(done.finished_at) >= assert_utc(done.started_at)

    # Terminal states never change again, not even for the worker that held the claim.
    assert await finish(session_factory, job.id, "worker-a", stolen) is False
    again = await read(session_factory, job.id)
    assert (again.state, again.exit_code, again.stdout) == (JobState.succeeded, 0, "hello\n")
    assert again.finished_at == done.finished_at


async def test_finish_does_not_touch_a_queued_job(session_factory: SessionFactory) -> None:
    job = await add_job(session_factory)
    assert await finish(session_factory, job.id, "worker-a", success()) is False
    assert (await read(session_factory, job.id)).state is JobState.queued


async def test_finish_refuses_a_non_terminal_state(session_factory: SessionFactory) -> None:
    await add_job(session_factory)
    job = await claimed(session_factory)
    with pytest.raises(ValueError, match="not a terminal state"):
        await finish(session_factory, job.id, "worker-a", JobResult(state=JobState.queued))
    assert (await read(session_factory, job.id)).state is JobState.running


async def test_cancel_a_queued_job_at_once(session_factory: SessionFactory) -> None:
    job = await add_job(session_factory)
    cancelled = await cancel(session_factory, job.id)
    assert cancelled.state is JobState.cancelled
    assert cancelled.error is not None and "cancelled" in cancelled.error
    assert_utc(cancelled.finished_at)
    stored = await read(session_factory, job.id)
    assert stored.state is JobState.cancelled
    assert stored.finished_at == cancelled.finished_at
    # A cancelled job is never claimed.
    assert await claim(session_factory) is None


async def test_cancel_a_running_job_only_asks_its_worker(session_factory: SessionFactory) -> None:
    await add_job(session_factory)
    job = await claimed(session_factory, worker_id="worker-a")

    asked = await cancel(session_factory, job.id)

    assert asked.state is JobState.running
    assert asked.cancel_requested is True
    assert asked.finished_at is None
    stored = await read(session_factory, job.id)
    assert (stored.state, stored.cancel_requested) == (JobState.running, True)
    # The worker still holds it and writes the end.
    result = JobResult(state=JobState.cancelled, error="cancelled while running")
    assert await finish(session_factory, job.id, "worker-a", result) is True
    assert (await read(session_factory, job.id)).state is JobState.cancelled


@pytest.mark.parametrize(
    "state", [JobState.succeeded, JobState.failed, JobState.timed_out, JobState.cancelled]
)
async def test_cancel_a_finished_job_raises(
    session_factory: SessionFactory, state: JobState
) -> None:
    job = await add_job(session_factory, state=state, finished_at=T0, error="was already over")
    with pytest.raises(JobAlreadyFinished, match=state.value):
        await cancel(session_factory, job.id)
    stored = await read(session_factory, job.id)
    assert (stored.state, stored.cancel_requested, stored.error) == (
        state,
        False,
        "was already over",
    )
    assert stored.finished_at == T0


async def test_cancel_an_unknown_job_raises(session_factory: SessionFactory) -> None:
    missing = uuid.uuid4()
    with pytest.raises(JobNotFound, match=str(missing)):
        await cancel(session_factory, missing)


async def test_get_an_unknown_job_raises(session_factory: SessionFactory) -> None:
    with pytest.raises(JobNotFound):
        await read(session_factory, uuid.uuid4())


async def test_renew_extends_only_this_workers_running_jobs(
    session_factory: SessionFactory,
) -> None:
    for _ in range(4):
        await add_job(session_factory)
    mine = await claimed(session_factory, worker_id="worker-a", lease_seconds=5)
    mine_cancelled = await claimed(session_factory, worker_id="worker-a", lease_seconds=5)
    mine_finished = await claimed(session_factory, worker_id="worker-a", lease_seconds=5)
    theirs = await claimed(session_factory, worker_id="worker-b", lease_seconds=5)
    await cancel(session_factory, mine_cancelled.id)
    assert await finish(session_factory, mine_finished.id, "worker-a", success()) is True

    held = await renew(
        session_factory,
        "worker-a",
        [mine.id, mine_cancelled.id, mine_finished.id, theirs.id, uuid.uuid4()],
        lease_seconds=3600,
    )

    assert held == {mine.id: False, mine_cancelled.id: True}
    for job in (mine, mine_cancelled):
        old = assert_utc(job.lease_expires_at)
        new = assert_utc((await read(session_factory, job.id)).lease_expires_at)
        assert new > old
        assert new - old > timedelta(minutes=30)
    assert (await read(session_factory, theirs.id)).lease_expires_at == theirs.lease_expires_at
    assert (await read(session_factory, mine_finished.id)).lease_expires_at is None
    assert (await read(session_factory, mine_finished.id)).state is JobState.succeeded


async def test_renew_nothing(session_factory: SessionFactory) -> None:
    assert await renew(session_factory, "worker-a", [], lease_seconds=10) == {}


async def test_renew_after_rescue_reports_the_job_lost(session_factory: SessionFactory) -> None:
    await add_job(session_factory)
    job = await claimed(session_factory, worker_id="worker-a", lease_seconds=-1)
    assert await fail_lost(session_factory) == [job.id]
    assert await renew(session_factory, "worker-a", [job.id], lease_seconds=30) == {}
    assert await finish(session_factory, job.id, "worker-a", success()) is False
    assert (await read(session_factory, job.id)).state is JobState.failed


async def test_rescue_lost_jobs_touches_only_running_jobs_with_expired_lease(
    session_factory: SessionFactory,
) -> None:
    past = utc_now() - timedelta(minutes=1)
    await add_job(session_factory, created_at=T0)
    await add_job(session_factory, created_at=T0 + timedelta(seconds=1))
    lost = await claimed(session_factory, worker_id="worker-a", lease_seconds=-60)
    alive = await claimed(session_factory, worker_id="worker-b", lease_seconds=3600)
    queued = await add_job(session_factory, lease_expires_at=past, attempt=1)
    finished = await add_job(
        session_factory, state=JobState.succeeded, lease_expires_at=past, exit_code=0
    )

    assert await fail_lost(session_factory) == [lost.id]

    failed = await read(session_factory, lost.id)
    assert failed.state is JobState.failed
    assert failed.error == store.LOST_WITH_WORKER
    assert failed.lease_expires_at is None
    assert_utc(failed.finished_at)
    kept = await read(session_factory, alive.id)
    assert (kept.state, kept.error, kept.lease_expires_at) == (
        JobState.running,
        None,
        alive.lease_expires_at,
    )
    assert (await read(session_factory, queued.id)).state is JobState.queued
    assert (await read(session_factory, finished.id)).state is JobState.succeeded
    assert (await read(session_factory, finished.id)).error is None
    assert await fail_lost(session_factory) == []


async def test_list_pages_through_identical_created_at_exactly_once(
    session_factory: SessionFactory,
) -> None:
    created = [T0] * 7 + [T0 - timedelta(seconds=1)] * 3 + [T0 + timedelta(microseconds=1)] * 2
    jobs = [await add_job(session_factory, created_at=at) for at in created]
    expected = [job.id for job in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]

    for limit in (1, 2, 3, 5, 7, 12, 100):
        walked = await walk(session_factory, limit=limit)
        assert [job.id for job in walked] == expected, f"limit {limit}"


async def test_list_pages_with_a_state_filter(session_factory: SessionFactory) -> None:
    jobs = [
        await add_job(
            session_factory,
            created_at=T0,
            state=JobState.failed if n % 3 == 0 else JobState.queued,
        )
        for n in range(9)
    ]
    failed = sorted((job.id for job in jobs if job.state is JobState.failed), reverse=True)
    assert len(failed) == 3
    walked = await walk(session_factory, limit=2, state=JobState.failed)
    assert [job.id for job in walked] == failed
    assert await walk(session_factory, limit=2, state=JobState.running) == []


async def test_list_last_full_page_has_no_cursor(session_factory: SessionFactory) -> None:
    for n in range(4):
        await add_job(session_factory, created_at=T0 + timedelta(seconds=n))
    first, cursor = await list_page(session_factory, limit=2)
    assert len(first) == 2 and cursor is not None
    second, cursor = await list_page(session_factory, limit=2, cursor=cursor)
    assert len(second) == 2
    assert cursor is None


def _cursor(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param("%%%", id="not-base64"),
        pytest.param(_cursor("2026-01-01T00:00:00+00:00"), id="one-part"),
        pytest.param(_cursor("2026-01-01T00:00:00", uuid.uuid4().hex), id="naive"),
        pytest.param(_cursor(12, uuid.uuid4().hex), id="number-date"),
        pytest.param(_cursor("2026-01-01T00:00:00+00:00", "xyz"), id="bad-uuid"),
        pytest.param(_cursor("0001-01-01T00:00:00+05:00", uuid.uuid4().hex), id="year-1-east"),
        pytest.param(_cursor("9999-12-31T23:59:59-05:00", uuid.uuid4().hex), id="year-9999-west"),
    ],
)
async def test_list_rejects_a_cursor_it_did_not_hand_out(
    session_factory: SessionFactory, cursor: str
) -> None:
    await add_job(session_factory)
    with pytest.raises(InvalidCursor):
        await list_page(session_factory, limit=10, cursor=cursor)


def test_parse_job_id() -> None:
    job_id = uuid.uuid4()
    assert store.parse_job_id(str(job_id)) == job_id
    for garbage in ("", "garbage", "1234", str(job_id)[:-1], "\x00"):
        with pytest.raises(JobNotFound, match="no job has the id"):
            store.parse_job_id(garbage)


async def test_create_job_fills_in_defaults_from_settings(
    session_factory: SessionFactory, settings: Settings
) -> None:
    async with session_factory() as session:
        job, created = await store.create_job(
            session=session, job_in=JobCreate(image="busybox", memory_mb=64), settings=settings
        )
    assert created
    stored = await read(session_factory, job.id)
    assert stored.state is JobState.queued
    assert stored.cpu_shares == settings.default_cpu_shares
    assert stored.memory_mb == 64
    assert stored.timeout_seconds == settings.default_timeout_seconds
    assert stored.attempt == 0
    assert_utc(stored.created_at)
    assert_utc(stored.run_after)


async def test_datetimes_come_back_aware_utc(session_factory: SessionFactory) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2026, 6, 1, 14, 30, 15, 123456, tzinfo=plus_two)
    job = await add_job(session_factory, created_at=local, run_after=local)

    stored = await read(session_factory, job.id)
    assert assert_utc(stored.created_at) == local
    assert stored.created_at.hour == 12
    assert stored.created_at.microsecond == 123456
    assert assert_utc(stored.run_after) == local

    page, _ = await list_page(session_factory, limit=10)
    assert assert_utc(page[0].created_at) == local
    running = await claimed(session_factory)
    assert_utc(running.started_at)
    assert_utc(running.lease_expires_at)
    assert_utc(running.created_at)


async def test_naive_datetimes_are_refused(session_factory: SessionFactory) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        await add_job(session_factory, created_at=datetime(2026, 1, 1, 12, 0))


async def test_get_job_sees_writes_made_elsewhere(session_factory: SessionFactory) -> None:
    # Each call reads the row as it is now, not as an earlier session cached it.
    job = await add_job(session_factory)
    async with session_factory() as session:
        first = await store.get_job(session=session, job_id=job.id)
        assert first.state is JobState.queued
        async with session_factory() as other:
            await other.execute(
                update(Job).where(col(Job.id) == job.id).values(state=JobState.failed)
            )
            await other.commit()
        again = await store.get_job(session=session, job_id=job.id)
        assert again.state is JobState.failed


async def test_rescue_requeues_a_lost_job_with_attempts_left_and_records_the_attempt(
    session_factory: SessionFactory,
) -> None:
    await add_job(session_factory, max_attempts=2)
    lost = await claimed(session_factory, worker_id="worker-a", lease_seconds=-60)
    retry_at = utc_now() + timedelta(seconds=30)
    async with session_factory() as session:
        rescued = await store.rescue_lost_jobs(session=session, next_run_after=lambda _: retry_at)
    assert rescued == [(lost.id, JobState.queued)]
    job = await read(session_factory, lost.id)
    assert (job.state, job.attempt, job.worker_id, job.error) == (JobState.queued, 1, None, None)
    assert job.run_after == retry_at
    assert job.attempts is not None and len(job.attempts) == 1
    record = job.attempts[0]
    assert (record["attempt"], record["worker_id"], record["error"]) == (
        1,
        "worker-a",
        store.LOST_WITH_WORKER,
    )
    # Not claimable before its backoff ends.
    async with session_factory() as session:
        assert await store.claim_next_job(session=session, worker_id="b", lease_seconds=5) is None


async def test_retry_job_queues_the_next_attempt_only_while_the_claim_holds(
    session_factory: SessionFactory,
) -> None:
    await add_job(session_factory, max_attempts=3)
    job = await claimed(session_factory, worker_id="worker-a", lease_seconds=60)
    failed = JobResult(state=JobState.failed, exit_code=3, stdout="partial\n")
    async with session_factory() as session:
        assert not await store.retry_job(
            session=session, job=job, worker_id="intruder", result=failed, run_after=T0
        )
        assert await store.retry_job(
            session=session, job=job, worker_id="worker-a", result=failed, run_after=T0
        )
    again = await read(session_factory, job.id)
    assert (again.state, again.attempt, again.stdout, again.exit_code) == (
        JobState.queued,
        1,
        "",
        None,
    )
    assert again.attempts is not None
    assert [(a["attempt"], a["exit_code"], a["state"]) for a in again.attempts] == [
        (1, 3, "failed")
    ]
    second = await claimed(session_factory, worker_id="worker-b", lease_seconds=60)
    assert (second.id, second.attempt) == (job.id, 2)


async def test_queue_cap_counts_at_most_cap_plus_one_yet_reports_the_real_number(
    session_factory: SessionFactory, settings: Settings
) -> None:
    capped = settings.model_copy(update={"max_queued": 3})
    for _ in range(5):
        await add_job(session_factory)
    await add_job(session_factory, state=JobState.running)
    job_in = JobCreate(image="busybox", command=["true"])
    async with session_factory() as session:
        with pytest.raises(QueueFull, match="5 jobs are waiting"):
            await store.create_job(session=session, job_in=job_in, settings=capped)
        roomy = settings.model_copy(update={"max_queued": 6})
        job, created = await store.create_job(session=session, job_in=job_in, settings=roomy)
        assert created and job.state is JobState.queued
        with pytest.raises(QueueFull, match="6 jobs are waiting"):
            await store.create_job(session=session, job_in=job_in, settings=roomy)


async def test_owner_quota_counts_only_the_owners_queued_jobs(
    session_factory: SessionFactory, settings: Settings
) -> None:
    owner, other = uuid.uuid4(), uuid.uuid4()
    for _ in range(3):
        await add_job(session_factory, owner=owner)
    await add_job(session_factory, owner=other)
    job_in = JobCreate(image="busybox")
    async with session_factory() as session:
        with pytest.raises(QuotaExceeded, match="has 3 jobs queued"):
            await store.create_job(
                session=session, job_in=job_in, settings=settings, owner=owner, owner_max_queued=2
            )
        job, _ = await store.create_job(
            session=session, job_in=job_in, settings=settings, owner=owner, owner_max_queued=4
        )
    assert job.owner == owner


async def test_a_created_job_reads_back_as_submitted_with_the_defaults(
    session_factory: SessionFactory, db_engine: AsyncEngine, settings: Settings
) -> None:
    job_in = JobCreate(image="busybox", command=["echo", "hi"], labels={"team": "ml"}, cpus=0.5)
    async with db_engine.connect() as connection:
        job, created = await store.create_job(
            session=connection, job_in=job_in, settings=settings, idempotency_key="k1"
        )
        assert created
        again, created = await store.create_job(
            session=connection, job_in=job_in, settings=settings, idempotency_key="k1"
        )
        assert not created and again.id == job.id
        row = await store.read_job(session=connection, job_id=job.id)
    stored = await read(session_factory, job.id)
    assert JobPublic.model_validate(row) == JobPublic.model_validate(stored)
    assert JobPublic.model_validate(job) == JobPublic.model_validate(stored)
    assert stored.memory_mb == settings.default_memory_mb and stored.cpus == 0.5
    assert stored.labels == {"team": "ml"} and stored.state is JobState.queued
    assert stored.idempotency_key == "k1" and stored.request_hash == store.request_hash(job_in)
    with pytest.raises(JobNotFound):
        async with db_engine.connect() as connection:
            await store.read_job(session=connection, job_id=job.id, owner=uuid.uuid4())


@pytest.mark.parametrize(
    "text",
    [
        '{"team": "ml", "n": [1, 2.5, null, true, "\\u00e9"]}',
        '["echo", "hi"]',
        "12345678901234567890123456789",
        # pydantic-core refuses a lone surrogate escape; json.loads (the fallback) reads it.
        '{"a": "\\ud800"}',
    ],
)
def test_json_columns_read_back_as_json_loads_reads_them(text: str) -> None:
    assert json_deserializer(text) == json.loads(text)
    assert json_deserializer(text.encode()) == json.loads(text)


async def test_writers_in_one_process_queue_for_sqlite_instead_of_backing_off(
    session_factory: SessionFactory, settings: Settings
) -> None:
    """Many concurrent single-job submissions each commit, none meets "database is locked"."""
    job_in = JobCreate(image="busybox")

    async def submit() -> Job:
        async with session_factory() as session:
            job, _ = await store.create_job(session=session, job_in=job_in, settings=settings)
            return job

    jobs = await asyncio.gather(*(submit() for _ in range(40)))
    assert len({job.id for job in jobs}) == 40
    async with session_factory() as session:
        states = await store.get_states(session=session, job_ids=[job.id for job in jobs])
    assert set(states.values()) == {JobState.queued} and len(states) == 40
