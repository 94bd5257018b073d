"""The Alembic migrations: they build exactly the models' schema, and undo it cleanly."""

import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

import app.models  # noqa: F401  (puts the jobs table on SQLModel.metadata)
from app.db import (
    alembic_config,
    create_engine,
    create_session_factory,
    migrate,
    upgrade_to_head,
)
from app.models import JobPublic
from app.store import get_job
from tests.support.databases import database_url_for


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def head_revision(url: str) -> str:
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    assert len(heads) == 1, f"the migrations must have one head, not {heads}"
    return heads[0]


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh, empty database: a SQLite file, or PostgreSQL when configured."""
    engine = create_engine(await database_url_for(tmp_path))
    yield engine
    await engine.dispose()


def schema_drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    diff: list[Any] = compare_metadata(context, SQLModel.metadata)
    return diff


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_head_matches_the_models(engine: AsyncEngine) -> None:
    await upgrade_to_head(engine)
    async with engine.connect() as connection:
        assert await connection.run_sync(schema_drift) == []
        assert await connection.run_sync(current_revision) == head_revision(str(engine.url))
        assert "jobs" in await connection.run_sync(table_names)


async def test_drift_is_detected(engine: AsyncEngine) -> None:
    # The comparison itself must see a difference, or the test above proves nothing.
    await upgrade_to_head(engine)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("DROP INDEX ix_jobs_lease")
        await connection.exec_driver_sql("ALTER TABLE jobs ADD COLUMN surprise INTEGER")
    async with engine.connect() as connection:
        diff = await connection.run_sync(schema_drift)
    kinds = {entry[0] if isinstance(entry, tuple) else entry[0][0] for entry in diff}
    assert {"add_index", "remove_column"} <= kinds, diff


async def test_downgrade_to_base_then_upgrade_again(engine: AsyncEngine) -> None:
    await upgrade_to_head(engine)

    await migrate(engine, "downgrade", "base")
    async with engine.connect() as connection:
        assert await connection.run_sync(current_revision) is None
        assert "jobs" not in await connection.run_sync(table_names)

    await migrate(engine, "upgrade", "head")
    async with engine.connect() as connection:
        assert await connection.run_sync(schema_drift) == []
        assert await connection.run_sync(current_revision) == head_revision(str(engine.url))


async def test_upgrade_twice_changes_nothing(engine: AsyncEngine) -> None:
    await upgrade_to_head(engine)
    await upgrade_to_head(engine)
    async with engine.connect() as connection:
        assert await connection.run_sync(schema_drift) == []


def test_jobdock_migrate_creates_the_jobs_table(tmp_path: Path) -> None:
    database = tmp_path / "nested" / "cli.db"
    url = sqlite_url(database)
    env = {**os.environ, "JOBDOCK_DATABASE_URL": url}

    for _ in range(2):  # the second run finds the schema at head and changes nothing
        done = subprocess.run(
            [sys.executable, "-m", "app", "migrate"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    with sqlite3.connect(database) as connection:
        tables = {
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        (version,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
    connection.close()
    assert "jobs" in tables
    assert version == head_revision(url)
    assert set(SQLModel.metadata.tables["jobs"].columns.keys()) == columns


async def test_jobs_from_before_0004_read_back_with_empty_labels(engine: AsyncEngine) -> None:
    """A job stored by 0003 survives the upgrade and reads back through the API model."""
    await migrate(engine, "upgrade", "0003")
    job_id = uuid.uuid4()
    now = datetime.now(UTC).replace(tzinfo=None)
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO jobs (id, image, env, cpu_shares, memory_mb, timeout_seconds, "
                "state, priority, run_after, attempt, cancel_requested, stdout, stderr, "
                "output_truncated, created_at, max_attempts) VALUES (:id, 'busybox', '{}', "
                "1024, 256, 300, 'succeeded', 0, :now, 1, false, 'hi\n', '', false, :now, 1)"
            ),
            {"id": job_id.hex if engine.dialect.name == "sqlite" else job_id, "now": now},
        )
    await upgrade_to_head(engine)
    async with create_session_factory(engine)() as session:
        job = JobPublic.model_validate(await get_job(session=session, job_id=job_id))
    assert job.labels == {}
    assert job.stdout == "hi\n"
    assert job.callback_state is None and job.callback_deliveries == []
    assert job.resources is None
