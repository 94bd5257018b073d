"""The fast paths of submission and reading on a real database: grouped commits
(app.store.submit.SubmissionWriter), the queue cap counted down (QueueRoom), and the
prepared reads of a SyncReader (app.db.PreparedRead) and prepared inserts
(app.db.PreparedInsert), which must read and store exactly what SQLAlchemy does, and the
groups written on the event loop's thread (app.db.SyncWriter)."""

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db as app_db
from app import store
from app.db import (
    POOL_MAX_OVERFLOW,
    POOL_SIZE,
    SyncReader,
    SyncWriter,
    create_read_engine,
    create_session_factory,
)
from app.errors import JobNotFound, QueueFull
from app.models import CallbackState, Job, JobCreate, JobResult, JobState
from app.settings import Settings
from app.store import keys as key_store
from tests.test_store import add_job, claimed, finish

JOBS = Job.__table__  # type: ignore[attr-defined]
JOB_IN = JobCreate(image="busybox", command=["echo", "hi"])


@pytest.fixture
def inserts(db_engine: AsyncEngine) -> Iterator[list[int]]:
    """The INSERTs into jobs sent from now on: the number of rows of each."""
    seen: list[int] = []

    def count(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _c: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            seen.append(len(parameters) if many else 1)

    event.listen(db_engine.sync_engine, "before_cursor_execute", count)
    yield seen
    event.remove(db_engine.sync_engine, "before_cursor_execute", count)


@pytest.fixture
def read_engine(settings: Settings, db_engine: AsyncEngine) -> Iterator[Engine | None]:
    engine = create_read_engine(settings.database_url)
    yield engine
    if engine is not None:
        engine.dispose()


@pytest.fixture
async def reader(db_engine: AsyncEngine, read_engine: Engine | None) -> AsyncIterator[Any]:
    """What the API reads with: a SyncReader on SQLite, a connection on PostgreSQL."""
    if read_engine is None:
        async with db_engine.connect() as connection:
            yield connection
        return
    raw = read_engine.raw_connection()
    sync_reader = SyncReader(read_engine, raw.driver_connection)  # type: ignore[arg-type]
    try:
        yield sync_reader
    finally:
        sync_reader.close()
        raw.close()


async def queued_count(db_engine: AsyncEngine) -> int:
    async with db_engine.connect() as connection:
        found = await connection.execute(
            select(func.count()).select_from(JOBS).where(JOBS.c.state == JobState.queued)
        )
        return int(found.scalar_one())


async def submit(
    *, writer: store.SubmissionWriter, reader: Any, room: store.QueueRoom, **fields: Any
) -> dict[str, Any]:
    """store.queue_job, then its commit (the reader fixture is no pooled connection of the
    writer's engine, so it may be held meanwhile): the new job's row."""
    row, committed = await store.queue_job(writer=writer, reader=reader, room=room, **fields)
    await committed
    return row


async def test_concurrent_submissions_share_a_few_inserts_and_all_are_stored(
    db_engine: AsyncEngine, settings: Settings, reader: Any, inserts: list[int]
) -> None:
    writer = store.SubmissionWriter(db_engine)
    room = store.QueueRoom()
    jobs = await asyncio.gather(
        *(
            submit(writer=writer, reader=reader, room=room, job_in=JOB_IN, settings=settings)
            for _ in range(50)
        )
    )
    await writer.close()
    assert len({job["id"] for job in jobs}) == 50
    assert sum(inserts) == 50
    # Grouped: those that arrived while a group was being written went in the next one.
    # (How many groups depends on the reads before each; on SQLite, which reads without
    # awaiting, the first submission goes alone and the other 49 together.)
    assert len(inserts) < 25 and max(inserts) > 1, inserts
    for job in jobs:
        stored = await store.read_job(session=reader, job_id=job["id"])
        assert stored["state"] == JobState.queued
        assert stored["command"] == ["echo", "hi"]
        assert stored["memory_mb"] == settings.default_memory_mb


async def test_more_submitters_than_pooled_connections_each_reading_on_one(
    db_engine: AsyncEngine, settings: Settings
) -> None:
    """As POST /jobs does on PostgreSQL: each submission reads (quota, queue cap) on a pooled
    connection of the writer's own engine, and waits for its commit only after giving that
    connection back. Held while waiting, the connections would all be taken by submitters
    waiting for a writer that waits for a connection: stuck until the pool's timeout."""
    writer = store.SubmissionWriter(db_engine)
    room = store.QueueRoom(pending=lambda: writer.in_flight)
    submitters = POOL_SIZE + POOL_MAX_OVERFLOW + 10

    async def submit_on_a_pooled_connection() -> dict[str, Any]:
        async with db_engine.connect() as reader:
            row, committed = await store.queue_job(
                writer=writer, reader=reader, room=room, job_in=JOB_IN, settings=settings
            )
        await committed
        return row

    # Far longer than the grouped commits take, far shorter than the pool's 30 s timeout.
    rows = await asyncio.wait_for(
        asyncio.gather(*(submit_on_a_pooled_connection() for _ in range(submitters))), 20
    )
    await writer.close()
    assert len({row["id"] for row in rows}) == submitters
    assert await queued_count(db_engine) == submitters


async def test_a_failed_group_fails_each_of_its_submissions(
    db_engine: AsyncEngine, settings: Settings, reader: Any
) -> None:
    writer = store.SubmissionWriter(db_engine)
    taken = uuid.uuid4()
    await add_job(create_session_factory(db_engine), id=taken)
    rows = [store.jobs._new_job(JOB_IN, settings) for _ in range(3)]
    rows[1]["id"] = taken  # the primary key is taken: the whole group's INSERT fails
    outcomes = await asyncio.gather(*(writer.enqueue(row) for row in rows), return_exceptions=True)
    await writer.close()
    assert all(isinstance(outcome, Exception) for outcome in outcomes), outcomes
    assert await queued_count(db_engine) == 1  # only the job that was there before
    # The writer goes on with the next group.
    job = await submit(
        writer=writer, reader=reader, room=store.QueueRoom(), job_in=JOB_IN, settings=settings
    )
    assert (await store.read_job(session=reader, job_id=job["id"]))["state"] == JobState.queued


async def test_the_queue_cap_holds_exactly_for_one_process(
    db_engine: AsyncEngine, settings: Settings, reader: Any
) -> None:
    capped = settings.model_copy(update={"max_queued": 5})
    writer = store.SubmissionWriter(db_engine)
    # A clock that never moves: no refresh by time, only the count-down and the re-probe.
    room = store.QueueRoom(clock=lambda: 0.0, pending=lambda: writer.in_flight)

    async def submit_one() -> dict[str, Any]:
        return await submit(writer=writer, reader=reader, room=room, job_in=JOB_IN, settings=capped)

    # Eight at once: the re-probes of the last three count the five not committed yet.
    outcomes = await asyncio.gather(*(submit_one() for _ in range(8)), return_exceptions=True)
    assert sum(isinstance(outcome, dict) for outcome in outcomes) == 5, outcomes
    assert sum(isinstance(outcome, QueueFull) for outcome in outcomes) == 3, outcomes
    assert await queued_count(db_engine) == 5
    with pytest.raises(QueueFull) as refused:
        await submit_one()
    assert refused.value.retry_after_seconds == capped.queue_full_retry_after_seconds
    assert "5 jobs are waiting" in str(refused.value)
    # One job leaves the queue: the refusal's re-probe sees the room at once.
    async with create_session_factory(db_engine)() as session:
        await store.cancel_job(session=session, job_id=(await submit_ids(db_engine))[0])
    await submit_one()
    with pytest.raises(QueueFull):
        await submit_one()
    await writer.close()
    assert await queued_count(db_engine) == 5


async def submit_ids(db_engine: AsyncEngine) -> list[uuid.UUID]:
    async with db_engine.connect() as connection:
        found = await connection.execute(select(JOBS.c.id).where(JOBS.c.state == JobState.queued))
        return [row.id for row in found]


async def test_the_room_sees_other_processes_after_its_refresh(
    db_engine: AsyncEngine, settings: Settings, reader: Any
) -> None:
    capped = settings.model_copy(update={"max_queued": 4})
    now = [0.0]
    room = store.QueueRoom(refresh_seconds=1.0, clock=lambda: now[0])
    await room.take(reader, capped, 1)  # probed: 4 free, 3 left after this one
    sessions = create_session_factory(db_engine)
    for _ in range(3):  # another process queues three jobs
        await add_job(sessions)
    await room.take(reader, capped, 1)  # not probed again yet: counted down from 3 to 2
    now[0] = 1.0
    with pytest.raises(QueueFull):  # probed: 3 queued of 4, none free for 2
        await room.take(reader, capped, 2)
    room.forget()
    await room.take(reader, capped, 1)


async def raw_read(reader: Any, query: Any, parameters: dict[str, Any]) -> Any:
    """A prepared read on the raw connection itself (no fallback)."""
    if isinstance(reader, SyncReader):
        return reader.first(query, parameters)
    return await query.first_on(reader, parameters)


async def test_prepared_reads_read_what_sqlalchemy_reads(
    db_engine: AsyncEngine, settings: Settings, reader: Any
) -> None:
    """On SQLite on a SyncReader's raw sqlite3 connection; on PostgreSQL on the reader's raw
    asyncpg connection (each checked by itself too: read_first would hide a failure of the
    raw read behind SQLAlchemy's)."""
    sessions = create_session_factory(db_engine)
    owner = uuid.uuid4()
    job = await add_job(
        sessions,
        command=["sh", "-c", "echo 'é'"],
        env={"A": "1"},
        labels={"team": "ml"},
        owner=owner,
    )
    claimed_job = await claimed(sessions)
    assert claimed_job.id == job.id
    await finish(
        sessions,
        job.id,
        "worker-a",
        JobResult(state=JobState.failed, exit_code=3, stdout="out", error="boom"),
    )
    async with db_engine.connect() as connection:
        expected = await store.read_job(session=connection, job_id=job.id)
        expected_own = await store.read_job(session=connection, job_id=job.id, owner=owner)
    assert await store.read_job(session=reader, job_id=job.id) == expected
    assert await store.read_job(session=reader, job_id=job.id, owner=owner) == expected_own
    for statement, parameters, wanted in (
        (store.jobs._READ_JOB, {"read_id": job.id}, expected),
        (store.jobs._READ_OWN_JOB, {"read_id": job.id, "read_owner": owner}, expected_own),
        (store.jobs._READ_JOB, {"read_id": uuid.uuid4()}, None),
    ):
        assert await raw_read(reader, store.jobs._PREPARED_READS[statement], parameters) == wanted
    assert expected["finished_at"] is not None and expected["finished_at"].tzinfo is not None
    assert expected["labels"] == {"team": "ml"}
    with pytest.raises(JobNotFound):
        await store.read_job(session=reader, job_id=job.id, owner=uuid.uuid4())

    assert await key_store.any_active_key(session=reader) is False
    async with sessions() as session:
        key = await key_store.create_key(
            session=session, name="k", key_hash="ab" * 32, max_queued=7
        )
    assert await key_store.any_active_key(session=reader) is True
    found = await key_store.find_active_key(session=reader, key_hash="ab" * 32)
    async with db_engine.connect() as connection:
        assert found == await key_store.find_active_key(session=connection, key_hash="ab" * 32)
    prepared_key = key_store._PREPARED_FIND_ACTIVE_KEY
    assert await raw_read(reader, prepared_key, {"key_hash": "ab" * 32}) == found
    assert await raw_read(reader, key_store._PREPARED_ANY_ACTIVE_KEY, {}) == {"any_active": True}
    assert found is not None and found["id"] == key.id and found["max_queued"] == 7
    assert await key_store.find_active_key(session=reader, key_hash="cd" * 32) is None


async def test_prepared_inserts_store_what_sqlalchemy_stores(
    db_engine: AsyncEngine, settings: Settings
) -> None:
    """_add_jobs on SQLite converts a row's parameters itself (app.db.PreparedInsert): what it
    stores must be, column for column, what SQLAlchemy's INSERT stores."""
    if db_engine.dialect.name != "sqlite":
        pytest.skip("prepared inserts are SQLite's")
    plain = store.jobs._new_job(JOB_IN, settings)
    varied = store.jobs._new_job(
        JobCreate(
            image="busybox",
            command=["sh", "-c", "echo 'é' \"q\" \\ \U0001f600"],
            env={"A": "1", "B": "é"},
            labels={"team": "ml"},
            retry_on_exit_codes=[75, 1],
            callback_url="https://example.com/hook",
            stdin="input\n",
            cpus=0.25,
        ),
        settings,
        owner=uuid.uuid4(),
    )
    # An instant with no microseconds, in another zone; a state and a callback state.
    varied["run_after"] = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    varied["callback_state"] = CallbackState.pending
    rows = [plain, varied]
    twins = [{**row, "id": uuid.uuid4()} for row in rows]
    async with db_engine.connect() as connection:
        await store.jobs._add_jobs(connection, rows)
        await connection.execute(JOBS.insert(), twins)
        await connection.commit()
        stored = {
            row[0]: row[1:]
            for row in await connection.exec_driver_sql(
                f"SELECT id, {', '.join(c.name for c in JOBS.columns if c.name != 'id')} FROM jobs"
            )
        }
    for row, twin in zip(rows, twins, strict=True):
        ours, theirs = stored[row["id"].hex], stored[twin["id"].hex]
        assert ours == theirs
    assert stored[varied["id"].hex] != stored[plain["id"].hex]
    with pytest.raises(ValueError, match="without the columns"):
        async with db_engine.connect() as connection:
            await store.jobs._add_jobs(connection, [{k: v for k, v in plain.items() if k != "env"}])


@pytest.fixture
async def sync_writer(db_engine: AsyncEngine) -> AsyncIterator[SyncWriter]:
    if db_engine.dialect.name != "sqlite":
        pytest.skip("a SyncWriter writes to a SQLite file")
    writer = SyncWriter(db_engine)
    yield writer
    await writer.close()


async def test_groups_written_on_the_loop_are_stored_and_read_back(
    db_engine: AsyncEngine,
    settings: Settings,
    reader: Any,
    sync_writer: SyncWriter,
    inserts: list[int],
) -> None:
    writer = store.SubmissionWriter(db_engine, sync_writer)
    room = store.QueueRoom()
    jobs = await asyncio.gather(
        *(
            submit(writer=writer, reader=reader, room=room, job_in=JOB_IN, settings=settings)
            for _ in range(40)
        )
    )
    await writer.close()
    assert await queued_count(db_engine) == 40
    assert inserts == []  # none through aiosqlite
    async with db_engine.connect() as connection:
        for job in jobs:
            # Read back by SQLAlchemy as by the prepared read: the row as it was queued.
            stored = await store.read_job(session=connection, job_id=job["id"])
            assert stored == await store.read_job(session=reader, job_id=job["id"])
            assert stored["state"] == JobState.queued and stored["command"] == ["echo", "hi"]
            assert stored["created_at"] == job["created_at"]


async def test_the_loop_writer_waits_for_this_process_s_writers(
    db_engine: AsyncEngine, settings: Settings, sync_writer: SyncWriter, inserts: list[int]
) -> None:
    """A write transaction of this process (a worker's claim, say) holds the process's write
    lock: the group waits for its commit, then is written (no busy error, no loss)."""
    sessions = create_session_factory(db_engine)
    job = await add_job(sessions)
    writer = store.SubmissionWriter(db_engine, sync_writer)
    async with sessions() as session:
        await session.execute(JOBS.update().where(JOBS.c.id == job.id).values(priority=5))
        committed = writer.enqueue(store.jobs._new_job(JOB_IN, settings))
        await asyncio.sleep(0.2)
        assert not committed.done()  # waiting for the lock this transaction holds
        await session.commit()
    await asyncio.wait_for(committed, 5)
    await writer.close()
    assert await queued_count(db_engine) == 2
    assert inserts == [1]  # add_job's own; the group went in on the loop, after the commit


async def test_another_process_s_writer_never_blocks_the_loop(
    db_engine: AsyncEngine, settings: Settings, sync_writer: SyncWriter, inserts: list[int]
) -> None:
    """Another process holds SQLite's write lock: the loop writer gives up at once and the
    group is written through aiosqlite, which waits off the loop for the lock."""
    other = sqlite3.connect(str(db_engine.url.database), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writer = store.SubmissionWriter(db_engine, sync_writer)
    committed = writer.enqueue(store.jobs._new_job(JOB_IN, settings))
    # The loop keeps turning meanwhile (SQLite's busy handler would hold it for seconds).
    loop = asyncio.get_running_loop()
    gaps = []
    for _ in range(20):
        began = loop.time()
        await asyncio.sleep(0.01)
        gaps.append(loop.time() - began)
    assert max(gaps) < 1.0 and not committed.done(), gaps
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(committed, 10)
    await writer.close()
    assert await queued_count(db_engine) == 1
    assert inserts == [1]  # through aiosqlite


async def test_a_failed_loop_group_writes_nothing_and_the_next_goes_in(
    db_engine: AsyncEngine, settings: Settings, sync_writer: SyncWriter
) -> None:
    taken = uuid.uuid4()
    await add_job(create_session_factory(db_engine), id=taken)
    writer = store.SubmissionWriter(db_engine, sync_writer)
    rows = [store.jobs._new_job(JOB_IN, settings) for _ in range(3)]
    rows[2]["id"] = taken
    outcomes = await asyncio.gather(*(writer.enqueue(row) for row in rows), return_exceptions=True)
    assert all(isinstance(outcome, sqlite3.IntegrityError) for outcome in outcomes), outcomes
    assert await queued_count(db_engine) == 1
    await writer.enqueue(store.jobs._new_job(JOB_IN, settings))
    await writer.close()
    assert await queued_count(db_engine) == 2


async def test_the_loop_writer_has_the_wal_checkpointed_off_the_loop(
    db_engine: AsyncEngine, settings: Settings, sync_writer: SyncWriter, monkeypatch: Any
) -> None:
    monkeypatch.setattr(app_db, "SYNC_WRITER_CHECKPOINT_SECONDS", 0.0)
    checkpoints: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "wal_checkpoint" in statement:
            checkpoints.append(statement)

    event.listen(db_engine.sync_engine, "before_cursor_execute", seen)
    try:
        writer = store.SubmissionWriter(db_engine, sync_writer)
        for _ in range(3):
            await writer.enqueue(store.jobs._new_job(JOB_IN, settings))
            await sync_writer.close()  # waits for the checkpoint under way
        await writer.close()
    finally:
        event.remove(db_engine.sync_engine, "before_cursor_execute", seen)
    assert checkpoints == ["PRAGMA wal_checkpoint(PASSIVE)"] * 3
    # Its own commits never checkpoint (that would block the loop on an fsync).
    connection = sync_writer._connect()
    assert connection.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    assert await queued_count(db_engine) == 3


async def test_a_group_holds_at_most_max_group_rows(
    db_engine: AsyncEngine, settings: Settings, inserts: list[int]
) -> None:
    writer = store.SubmissionWriter(db_engine)
    count = 2 * store.submit.MAX_GROUP + 10
    await asyncio.gather(
        *(writer.enqueue(store.jobs._new_job(JOB_IN, settings)) for _ in range(count))
    )
    await writer.close()
    assert sum(inserts) == count and max(inserts) == store.submit.MAX_GROUP, inserts
    assert await queued_count(db_engine) == count


async def test_a_failed_raw_read_is_made_through_sqlalchemy(
    db_engine: AsyncEngine, reader: Any, monkeypatch: Any
) -> None:
    """On PostgreSQL a prepared read that fails (a lost connection, say) is made again
    through SQLAlchemy, which handles the connection as for every other statement."""
    if isinstance(reader, SyncReader):
        pytest.skip("PostgreSQL's prepared reads fall back to SQLAlchemy")
    job = await add_job(create_session_factory(db_engine))

    async def lost(*_: Any) -> Any:
        raise ConnectionError("the connection was lost")

    monkeypatch.setattr(app_db.PreparedRead, "first_on", lost)
    found = await store.read_job(session=reader, job_id=job.id)
    assert found["id"] == job.id
    assert await key_store.any_active_key(session=reader) is False
