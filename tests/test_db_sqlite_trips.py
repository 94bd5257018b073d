"""SQLite through aiosqlite: each statement is one trip to aiosqlite's thread, and the last
statement of a transaction carries its commit (app.db, app.sqlite_cursor)."""

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite.core
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import store
from app.db import COMMITS_WITH_STATEMENT, SessionFactory, create_engine, create_session_factory
from app.db import upgrade_to_head as migrate
from app.models import Job, JobCreate, JobResult, JobState
from app.settings import Settings

JOBS = Job.__table__  # type: ignore[attr-defined]


@pytest.fixture
async def sqlite_engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobdock.db'}")
    await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The functions run on aiosqlite's thread, by name, from now on."""
    seen: list[str] = []
    execute = aiosqlite.core.Connection._execute

    async def counted(self: Any, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(function, "__name__", repr(function)))
        return await execute(self, function, *args, **kwargs)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aiosqlite.core.Connection, "_execute", counted)
    return seen


def raw_state(engine: AsyncEngine, job_id: uuid.UUID) -> str:
    """The job's state as another connection (another process, say) sees it now."""
    with sqlite3.connect(str(engine.url.database)) as connection:
        (state,) = connection.execute(
            "SELECT state FROM jobs WHERE id = ?", (job_id.hex,)
        ).fetchone()
    return str(state)


async def submit(sessions: SessionFactory, count: int = 1) -> None:
    async with sessions() as session:
        await store.create_jobs(
            session=session,
            jobs_in=[JobCreate(image="busybox", command=["true"])] * count,
            settings=Settings(max_queued=0),
        )


async def test_a_claim_and_a_finish_are_one_trip_each_and_committed_on_return(
    sqlite_engine: AsyncEngine, trips: list[str]
) -> None:
    sessions = create_session_factory(sqlite_engine)
    await submit(sessions, 2)
    trips.clear()

    async with sessions() as session:
        job = await store.claim_next_job(session=session, worker_id="w", lease_seconds=30)
    assert job is not None
    assert len(trips) == 1, trips
    assert raw_state(sqlite_engine, job.id) == "running"

    async with sessions() as session:
        written = await store.finish_job(
            session=session,
            job_id=job.id,
            worker_id="w",
            result=JobResult(state=JobState.succeeded, exit_code=0),
        )
    assert written
    assert len(trips) == 2, trips
    assert raw_state(sqlite_engine, job.id) == "succeeded"


async def test_a_submission_is_one_trip_and_committed_on_return(
    sqlite_engine: AsyncEngine, trips: list[str]
) -> None:
    sessions = create_session_factory(sqlite_engine)
    async with sessions() as session:
        (job,) = await store.create_jobs(
            session=session,
            jobs_in=[JobCreate(image="busybox", command=["true"])],
            settings=Settings(max_queued=0),
        )
    assert len(trips) == 1, trips
    assert raw_state(sqlite_engine, job.id) == "queued"


async def test_a_transaction_of_several_statements_commits_once_at_its_end(
    sqlite_engine: AsyncEngine, trips: list[str]
) -> None:
    sessions = create_session_factory(sqlite_engine)
    await submit(sessions)
    trips.clear()
    async with sessions() as session:
        await session.execute(select(JOBS.c.id))
        await session.execute(update(JOBS).values(priority=5))
        # Not committed: another connection still sees the old row...
        with sqlite3.connect(str(sqlite_engine.url.database)) as connection:
            assert connection.execute("SELECT priority FROM jobs").fetchone() == (0,)
        await session.execute(
            update(JOBS).values(state=JobState.cancelled), execution_options=COMMITS_WITH_STATEMENT
        )
        await session.commit()
    # ... until the statement that ends the transaction: both changes landed together.
    with sqlite3.connect(str(sqlite_engine.url.database)) as connection:
        assert connection.execute("SELECT priority, state FROM jobs").fetchone() == (5, "cancelled")
    # select, update, update-and-commit: the session's commit() made no trip of its own.
    assert len(trips) == 3, trips


async def test_a_failing_last_statement_commits_nothing_and_frees_the_write_lock(
    sqlite_engine: AsyncEngine,
) -> None:
    sessions = create_session_factory(sqlite_engine)
    await submit(sessions)
    async with sessions() as session:
        row = (await session.execute(select(JOBS))).one()._asdict()
    async with sessions() as session:
        await session.execute(update(JOBS).values(priority=7))
        with pytest.raises(IntegrityError):
            # The same primary key again.
            await session.execute(insert(JOBS), row, execution_options=COMMITS_WITH_STATEMENT)
        await session.rollback()
    with sqlite3.connect(str(sqlite_engine.url.database)) as connection:
        assert connection.execute("SELECT priority FROM jobs").fetchall() == [(0,)]
    # The next writer is not kept waiting for a lock the failed transaction held.
    async with sessions() as session:
        await session.execute(update(JOBS).values(priority=9))
        await session.commit()
    with sqlite3.connect(str(sqlite_engine.url.database)) as connection:
        assert connection.execute("SELECT priority FROM jobs").fetchall() == [(9,)]
