"""The async database engine and session factory, for SQLite (WAL) and PostgreSQL."""

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

if TYPE_CHECKING:
    from alembic.config import Config

SessionFactory = async_sessionmaker[AsyncSession]

# How long a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT_SECONDS = 30


def create_engine(database_url: str) -> AsyncEngine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)

    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}, pool_size=10, max_overflow=20
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets the API read while workers write; NORMAL is durable across
        # process crashes in WAL mode (only an OS crash can lose the last commits).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    return async_sessionmaker(engine, expire_on_commit=False)


MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> "Config":
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


async def migrate(engine: AsyncEngine, direction: Literal["upgrade", "downgrade"], to: str) -> None:
    """`alembic upgrade|downgrade REVISION`, on this engine's own connection."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    step = command.upgrade if direction == "upgrade" else command.downgrade

    def run(connection: Any) -> None:
        config.attributes["connection"] = connection
        step(config, to)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration, on the service's own engine."""
    await migrate(engine, "upgrade", "head")


# The PostgreSQL channel on which a submission wakes idle workers in other processes.
SUBMISSIONS_CHANNEL = "jobdock_submissions"
# The channel on which a change of a job (its state, new output) wakes waiting callers;
# the payload is the job's id.
JOB_EVENTS_CHANNEL = "jobdock_job_events"


def is_postgresql(database_url: str) -> bool:
    return make_url(database_url).get_backend_name() == "postgresql"


def asyncpg_dsn(database_url: str | URL) -> str:
    """A SQLAlchemy PostgreSQL URL as the plain DSN asyncpg.connect takes."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


async def listen(
    database_url: str, channels: dict[str, Callable[[str], None]], on_connected: Callable[[], None]
) -> None:
    """Call each channel's callback with the payload of every NOTIFY on it, until cancelled
    or disconnected; `on_connected` runs once the LISTENs are in place, so a caller can catch
    up on what it may have missed while not listening.

    PostgreSQL only: a dedicated asyncpg connection, outside the pool, holds the LISTENs.
    """
    import asyncpg

    connection = await asyncpg.connect(asyncpg_dsn(database_url))  # type: ignore[no-untyped-call]
    lost = asyncio.Event()
    try:
        connection.add_termination_listener(lambda _: lost.set())
        for channel, callback in channels.items():

            def relay(*args: Any, callback: Callable[[str], None] = callback) -> None:
                # asyncpg calls (connection, pid, channel, payload).
                callback(str(args[3]))

            await connection.add_listener(channel, relay)
        on_connected()
        await lost.wait()
        raise ConnectionError("the PostgreSQL connection for LISTEN was lost")
    finally:
        await connection.close()


async def listen_for_submissions(database_url: str, on_submission: Callable[[], None]) -> None:
    """Call `on_submission` on every NOTIFY of a new job (and once listening)."""
    await listen(database_url, {SUBMISSIONS_CHANNEL: lambda _: on_submission()}, on_submission)
