"""Where tests keep jobs: a SQLite file by default, or a fresh PostgreSQL database each.

Set JOBDOCK_TEST_DATABASE_URL to a PostgreSQL server URL, such as
postgresql+asyncpg://jobdock:jobdock@127.0.0.1:5432/postgres, to run the suite there: every
test directory then gets its own database on that server, dropped at the end of the run.
"""

import asyncio
import hashlib
import os
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL, make_url

from app.db import asyncpg_dsn

SERVER_URL_VARIABLE = "JOBDOCK_TEST_DATABASE_URL"
PREFIX = "jobdock_test_"

_created: set[str] = set()


def server_url() -> URL | None:
    raw = os.environ.get(SERVER_URL_VARIABLE)
    return make_url(raw) if raw else None


async def _execute(server: URL, *statements: str) -> None:
    """Run statements on the server's maintenance database (outside any transaction)."""
    connection = await asyncpg.connect(asyncpg_dsn(server))  # type: ignore[no-untyped-call]
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def database_url_for(workdir: Path) -> str:
    """The database of one test directory: the same directory always names the same one."""
    server = server_url()
    if server is None:
        return f"sqlite+aiosqlite:///{workdir / 'jobdock.db'}"
    name = PREFIX + hashlib.sha256(str(workdir).encode()).hexdigest()[:20]
    if name not in _created:
        await _execute(
            server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'
        )
        _created.add(name)
    return server.set(database=name).render_as_string(hide_password=False)


async def drop_created_databases() -> None:
    server = server_url()
    if server is None or not _created:
        return
    for name in sorted(_created):
        # WITH (FORCE) ends the database's sessions, but may not end one of a role not ours:
        # an autovacuum worker that happens to be on it. It ends soon; try again.
        for attempt in range(20):
            try:
                await _execute(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except asyncpg.InsufficientPrivilegeError:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.5)
    _created.clear()
