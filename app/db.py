"""The async database engine and session factory, for SQLite (WAL) and PostgreSQL."""

import asyncio
import json
import logging
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic_core import from_json
from sqlalchemy import Dialect, Engine, Executable, Result, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import types as sa_types
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

if TYPE_CHECKING:
    from alembic.config import Config

SessionFactory = async_sessionmaker[AsyncSession]

logger = logging.getLogger(__name__)

# How long a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT_SECONDS = 30


# Connections kept open: the API's concurrent requests (a load of 32 clients) plus the
# workers, webhooks and listeners of the process; beyond it, short-lived overflow.
POOL_SIZE = 40
POOL_MAX_OVERFLOW = 20
# PostgreSQL: a server-side idle timeout or a restart closes old connections; replacing
# them after this long (instead of a pre-ping round trip on every checkout) avoids most.
POOL_RECYCLE_SECONDS = 1800


def json_deserializer(text: str | bytes) -> Any:
    """JSON columns (a job's command, env, labels...) read back: pydantic-core's parser, some
    five times faster than json.loads on them; json.loads for what it refuses and json.loads
    accepts (a lone surrogate escape, which a submission's JSON may carry)."""
    try:
        return from_json(text)
    except ValueError:
        return json.loads(text)


def create_engine(database_url: str) -> AsyncEngine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_async_engine(
            url,
            json_deserializer=json_deserializer,
            pool_size=POOL_SIZE,
            max_overflow=POOL_MAX_OVERFLOW,
            pool_recycle=POOL_RECYCLE_SECONDS,
        )

    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        url,
        # The implicit BEGIN that sqlite3 sends before a transaction's first write (never
        # before a read, which runs in autocommit: WAL reads never wait) takes the write
        # lock at once.
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "isolation_level": "IMMEDIATE"},
        json_deserializer=json_deserializer,
        pool_size=POOL_SIZE,
        max_overflow=POOL_MAX_OVERFLOW,
        # The reset below instead: no rollback (a round trip to aiosqlite's thread) for a
        # connection returned with no transaction open, the usual case after a commit.
        pool_reset_on_return=None,
    )
    _use_one_hop_cursors()
    _serialize_sqlite_writes(engine)

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _commit_with_statement(
        _conn: Connection, cursor: Any, _statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if context is not None and context.execution_options.get(_COMMIT_OPTION):
            cursor.commit_with()

    @event.listens_for(engine.sync_engine, "reset")
    def _rollback_if_open(dbapi_connection: Any, _record: Any, _state: Any) -> None:
        if dbapi_connection.driver_connection._conn.in_transaction:
            dbapi_connection.rollback()

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


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

_COMMIT_OPTION = "jobdock_commit_with_statement"
# Execution options for the last statement of a transaction: on SQLite, it commits in the
# same trip to aiosqlite's thread as the statement (the session's commit() that must still
# follow then costs nothing); elsewhere, nothing changes.
COMMITS_WITH_STATEMENT: Mapping[str, Any] = {_COMMIT_OPTION: True}


def _use_one_hop_cursors() -> None:
    """Make every statement on an aiosqlite connection one trip to its thread.

    SQLAlchemy's aiosqlite cursor makes four (create the cursor, execute, fetch the rows,
    close), each a hand-over between the event loop and aiosqlite's thread; on a busy
    machine each costs more than the statement itself. This cursor does all four in one
    function run on that thread. Installed for the aiosqlite dialect as a whole (idempotent).
    """
    from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_connection

    from app.sqlite_cursor import OneHopCursor, commit_unless_idle

    AsyncAdapt_aiosqlite_connection._cursor_cls = OneHopCursor
    AsyncAdapt_aiosqlite_connection.commit = commit_unless_idle  # type: ignore[method-assign,assignment]


# Each SQLite engine's process write lock (see _serialize_sqlite_writes), for a writer that
# is not one of its pooled connections: `async with _WRITE_LOCKS[engine.sync_engine]():`.
_WriteLock = Callable[[], AbstractAsyncContextManager[None]]
_WRITE_LOCKS: "weakref.WeakKeyDictionary[Engine, _WriteLock]" = weakref.WeakKeyDictionary()


def _serialize_sqlite_writes(engine: AsyncEngine) -> None:
    """Queue this process's SQLite write transactions on an asyncio lock.

    SQLite has one writer at a time. Without this, writers on different pooled connections
    meet SQLite's busy handler, which sleeps (up to 100 ms at a time) and retries: under
    load, writes wait seconds. With it, a transaction's first write statement waits for
    the lock (first come, first served), and the commit or rollback that ends the
    transaction hands it on. Other processes still meet the busy handler.
    """
    dialect = engine.sync_engine.dialect
    holder: list[Any] = [None]  # the driver connection in a write transaction
    locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def lock() -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        found = locks.get(loop)
        if found is None:
            locks.clear()  # an engine lives on one loop; a closed one's lock is garbage
            found = locks[loop] = asyncio.Lock()
        return found

    async def take() -> bool:
        """The lock, waiting at most SQLite's busy timeout (False then). A lock that is free
        is taken without wait_for, which makes a task of every acquire (one free, but with a
        waiter just woken, queues behind that waiter, which is about to run)."""
        found = lock()
        if not found.locked():
            return await found.acquire()
        try:
            return await asyncio.wait_for(found.acquire(), SQLITE_BUSY_TIMEOUT_SECONDS)
        except TimeoutError:
            return False

    def release(dbapi_connection: Any) -> None:
        if dbapi_connection is not None and holder[0] is dbapi_connection:
            holder[0] = None
            for found in locks.values():
                if found.locked():
                    found.release()

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _wait_for_the_write_lock(conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip()[:7].upper().startswith(_WRITES):
            return
        dbapi_connection = conn.connection.dbapi_connection
        if holder[0] is dbapi_connection or dbapi_connection is None:
            return

        async def acquire() -> None:
            if not await take():
                raise OperationalError(
                    statement, None, sqlite3.OperationalError("database is locked")
                )

        await_only(acquire())
        holder[0] = dbapi_connection

    def ends_transaction(end: Callable[[Any], None]) -> Callable[[Any], None]:
        def wrapped(connection: Any) -> None:
            try:
                end(connection)
            finally:
                release(getattr(connection, "dbapi_connection", connection))

        return wrapped

    # After the commit or rollback itself, so the next writer finds the database free.
    dialect.do_commit = ends_transaction(dialect.do_commit)  # type: ignore[method-assign,assignment]
    dialect.do_rollback = ends_transaction(dialect.do_rollback)  # type: ignore[method-assign,assignment]

    @event.listens_for(engine.sync_engine, "checkin")
    def _release_on_checkin(dbapi_connection: Any, _record: Any) -> None:
        release(dbapi_connection)

    @asynccontextmanager
    async def hold() -> AsyncIterator[None]:
        token = object()  # holds the lock as a pooled connection would
        if not await take():
            raise sqlite3.OperationalError("database is locked")
        holder[0] = token
        try:
            yield
        finally:
            release(token)

    _WRITE_LOCKS[engine.sync_engine] = hold

    @event.listens_for(engine.sync_engine, "invalidate")
    def _release_on_invalidate(dbapi_connection: Any, _record: Any, _exc: Any) -> None:
        release(dbapi_connection)


class SyncReader:
    """A synchronous SQLite connection that reads like an AsyncConnection (`await
    reader.execute(...)`), in the event loop's own thread.

    Through aiosqlite, every statement is several round trips to the connection's thread
    (cursor, execute, fetch, close; a rollback on return to the pool), each a GIL hand-over:
    on a busy machine a primary-key read costs a millisecond or more, against a few
    microseconds in SQLite itself. A WAL reader does not wait for writers, so the hot reads
    (a job by id, the API key check) run here directly. Writes never do (see
    create_read_engine).

    `first()` runs a PreparedRead on `raw`, one sqlite3 connection of the read engine that
    the process keeps open (each statement is read to its end before anything else runs on
    the loop, so requests can share it); `execute()` checks a connection out of the read
    engine's pool on first use, and close() returns it."""

    def __init__(self, engine: Engine, raw: sqlite3.Connection) -> None:
        self._engine = engine
        self._raw = raw
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = self._engine.connect()
        return self._connection

    @property
    def dialect(self) -> Dialect:
        return self._engine.dialect

    async def execute(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None
    ) -> Result[Any]:
        return self.connection.execute(statement, parameters)

    def first(self, query: "PreparedRead", parameters: Mapping[str, Any]) -> dict[str, Any] | None:
        """The first row of a prepared read, by column name, or None."""
        return query.first(self._raw, self._engine.dialect, parameters)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class PreparedRead:
    """A SELECT compiled once and then run on the raw driver connection, its parameters and
    columns converted by the same type processors that SQLAlchemy would apply (UUIDs, JSON,
    UTC datetimes): on SQLite on the raw sqlite3 connection of a SyncReader (`first`), on
    PostgreSQL on the asyncpg connection under an AsyncConnection (`first_on`).

    SQLAlchemy's execute costs some 60 us per statement (an execution context, a cursor
    result, its row processing) against a few for a primary-key read in SQLite: for the
    reads every API request makes (a job by id, the API key check) that was most of the
    request. Only for plain SELECTs: no expanding (IN) parameters, no literal binds."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._prepared: dict[str, _Prepared] = {}

    def _prepare(
        self, dialect: Dialect, column_types: Sequence[Any] | None = None, compiled: Any = None
    ) -> "_Prepared":
        """`column_types`: the driver's type of each column, which some result processors
        depend on (asyncpg's type OIDs, as SQLAlchemy passes them); SQLite's need none.
        `compiled`: the statement compiled for `dialect`, if it already is."""
        if compiled is None:
            compiled = self.statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        processors = compiled._bind_processors
        binds = [(name, processors.get(name)) for name in compiled.positiontup or ()]
        types = column_types or [None] * len(compiled._result_columns)
        columns = [
            (entry.keyname, entry.type._cached_result_processor(dialect, column_type))
            for entry, column_type in zip(compiled._result_columns, types, strict=True)
        ]
        prepared = self._prepared[dialect.name] = (compiled.string, binds, columns)
        return prepared

    @staticmethod
    def _values(binds: list[tuple[str, Any]], parameters: Mapping[str, Any]) -> list[Any]:
        return [
            parameters[name] if process is None else process(parameters[name])
            for name, process in binds
        ]

    @staticmethod
    def _row(columns: list[tuple[str, Any]], row: Sequence[Any]) -> dict[str, Any]:
        return {
            name: value if process is None else process(value)
            for (name, process), value in zip(columns, row, strict=True)
        }

    def first(
        self, raw: sqlite3.Connection, dialect: Dialect, parameters: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        sql, binds, columns = self._prepared.get(dialect.name) or self._prepare(dialect)
        cursor = raw.execute(sql, self._values(binds, parameters))
        try:
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None else self._row(columns, row)

    async def first_on(
        self, connection: AsyncConnection, parameters: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The same on PostgreSQL: the statement run by asyncpg itself (its statement cache
        prepares it once per connection) on the connection's raw asyncpg connection, in the
        connection's transaction if it has begun one."""
        dialect = connection.dialect
        # The checked-out connection's driver connection, without the trip through a
        # greenlet that get_raw_connection() makes (a lost one raises, and read_first reads
        # through SQLAlchemy).
        sync = connection.sync_connection
        pooled = sync.connection if sync is not None else await connection.get_raw_connection()
        raw: Any = pooled.driver_connection
        prepared = self._prepared.get(dialect.name)
        if prepared is None:
            compiled = self.statement.compile(dialect=dialect)  # type: ignore[attr-defined]
            attributes = (await raw.prepare(compiled.string)).get_attributes()
            prepared = self._prepare(
                dialect, [attribute.type.oid for attribute in attributes], compiled
            )
        sql, binds, columns = prepared
        row = await raw.fetchrow(sql, *self._values(binds, parameters))
        return None if row is None else self._row(columns, row)


_Prepared = tuple[str, list[tuple[str, Any]], list[tuple[str, Any]]]


async def read_first(
    reader: "Reader", query: PreparedRead, parameters: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The first row of `query` by column name, or None: prepared on a SyncReader or a
    PostgreSQL AsyncConnection, through SQLAlchemy on anything else. On PostgreSQL, if the
    raw read fails, the same read is made through SQLAlchemy, which tells a lost connection
    (and invalidates it in the pool) or raises the error as every other statement does."""
    if isinstance(reader, SyncReader):
        return reader.first(query, parameters)
    if isinstance(reader, AsyncConnection) and reader.dialect.name == "postgresql":
        try:
            return await query.first_on(reader, parameters)
        except Exception as exc:
            logger.debug("a prepared read failed (%r); reading through SQLAlchemy", exc)
    row = (await reader.execute(query.statement, parameters)).one_or_none()
    return None if row is None else row._asdict()


def _utc_text(value: datetime) -> str:
    """An aware datetime as SQLite's DATETIME stores UTCDateTime's naive UTC."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _json_text(value: Any) -> str:
    """A JSON column's text, as SQLAlchemy's JSON type makes it (json.dumps); an empty
    object or array at once."""
    if not value and type(value) in _EMPTY_JSON:
        return _EMPTY_JSON[type(value)]
    return json.dumps(value)


_EMPTY_JSON: dict[type, str] = {dict: "{}", list: "[]"}
_DATETIME_SAMPLES: tuple[Any, ...] = (
    datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    datetime(999, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
    datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
)
_JSON_SAMPLES: tuple[Any, ...] = (
    {},
    [],
    {"a": "é", "b": [1, 2.5, None, True]},
    ["sh", "-c", '"\\\u2028'],
)


def _quicker(column_type: Any, process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """For a column of new jobs' UTC datetimes or JSON, a quicker function than SQLAlchemy's
    bind processor `process`, if it converts every sample as `process` does; else
    `process`."""
    if isinstance(column_type, sa_types.JSON):
        quick, samples = _json_text, _JSON_SAMPLES
    elif isinstance(column_type, sa_types.TypeDecorator) and isinstance(
        column_type.impl, sa_types.DateTime
    ):
        quick, samples = _utc_text, _DATETIME_SAMPLES
    else:
        return process
    try:
        same = all(quick(sample) == process(sample) for sample in samples)
    except Exception:
        same = False
    return quick if same else process


class PreparedInsert:
    """An INSERT of whole rows compiled once for SQLite, its parameters converted by the same
    bind processors that SQLAlchemy would apply, for `exec_driver_sql`.

    SQLAlchemy's executemany processes each row's parameters through its execution context
    (some 25 us a row of `jobs`, on the event loop's thread, against 15 for SQLite's own
    insert on aiosqlite's). Here a row is one pass over its columns; a None is converted
    once, when compiled. Every row must have every column of the table (no defaults are
    applied): `rows()` refuses any that has not. (One multi-row INSERT instead of
    executemany was tried: SQLite took longer for it.)"""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._prepared: tuple[str, list[tuple[str, Any, Any]], frozenset[str]] | None = None

    def _prepare(self, dialect: Dialect) -> tuple[str, list[tuple[str, Any, Any]], frozenset[str]]:
        compiled: Any = self.statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        processors = compiled._bind_processors
        names = list(compiled.positiontup or ())
        plan = [
            (
                name,
                None
                if name not in processors
                else _quicker(self.statement.table.c[name].type, processors[name]),  # type: ignore[attr-defined]
                None if name not in processors else processors[name](None),
            )
            for name in names
        ]
        self._prepared = (compiled.string, plan, frozenset(names))
        return self._prepared

    def sql(self, dialect: Dialect) -> str:
        return (self._prepared or self._prepare(dialect))[0]

    def rows(self, dialect: Dialect, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """The rows as positional parameters (ValueError for a row without every column)."""
        _, plan, names = self._prepared or self._prepare(dialect)
        out = []
        for row in rows:
            if not names <= row.keys():
                raise ValueError(f"a row without the columns {sorted(names - row.keys())}")
            out.append(
                tuple(
                    [
                        row[name]
                        if process is None
                        else (if_none if row[name] is None else process(row[name]))
                        for name, process, if_none in plan
                    ]
                )
            )
        return out


# How often a SyncWriter has the WAL checkpointed, since its own commits do not.
SYNC_WRITER_CHECKPOINT_SECONDS = 1.0


class SyncWriter:
    """INSERTs committed on the event loop's own thread, on a SQLite file: the group INSERT of
    new jobs (app.store.submit), where aiosqlite's thread loses more than it gains.

    The statement's work is SQLite's (some 20 us a row), but on aiosqlite's thread each
    row of an executemany takes the GIL back from a busy event loop: a group of 16 took
    2 ms there, against 0.3 ms here, and every submission of the group waited for it. Here
    the loop is blocked for the statement and its commit only.

    The process's write lock is taken first (see _serialize_sqlite_writes), so no writer of
    this process is in the way; SQLite's busy timeout is 0, so a writer of another process
    makes `insert()` answer False at once, with nothing written, instead of blocking the
    loop (the caller writes another way, one that waits). Its commits do not checkpoint the
    WAL, which would block the loop on an fsync: a PASSIVE checkpoint runs on the async
    engine (off the loop) at most every SYNC_WRITER_CHECKPOINT_SECONDS."""

    def __init__(self, engine: AsyncEngine) -> None:
        if engine.dialect.name != "sqlite" or not engine.url.database:
            raise ValueError("a SyncWriter writes to a SQLite file")
        self._engine = engine
        self._connection: sqlite3.Connection | None = None
        self._checkpointed_at = time.monotonic()
        self._checkpointing: asyncio.Task[None] | None = None

    @property
    def dialect(self) -> Dialect:
        return self._engine.dialect

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(str(self._engine.url.database), isolation_level=None)
        for pragma in (
            "busy_timeout=0",
            "synchronous=NORMAL",
            "foreign_keys=ON",
            "wal_autocheckpoint=0",
        ):
            connection.execute(f"PRAGMA {pragma}")
        self._connection = connection
        return connection

    async def insert(self, sql: str, rows: Sequence[Sequence[Any]]) -> bool:
        """Run `sql` for each row and commit; False (nothing written) if another process
        holds SQLite's write lock. What else fails is raised, with nothing written."""
        async with _WRITE_LOCKS[self._engine.sync_engine]():
            connection = self._connection or self._connect()
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                # The primary code: SQLITE_BUSY_RECOVERY and the like are busy too.
                if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    return False
                raise
            try:
                connection.executemany(sql, rows)
                connection.execute("COMMIT")
            finally:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
        self._checkpoint_soon()
        return True

    def _checkpoint_soon(self) -> None:
        now = time.monotonic()
        running = self._checkpointing is not None and not self._checkpointing.done()
        if running or now - self._checkpointed_at < SYNC_WRITER_CHECKPOINT_SECONDS:
            return
        self._checkpointed_at = now
        self._checkpointing = asyncio.create_task(self._checkpoint(), name="jobdock-checkpoint")

    async def _checkpoint(self) -> None:
        try:
            async with self._engine.connect() as connection:
                await connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # the next one may succeed; SQLite's own ones go on
            logger.warning("checkpointing the SQLite WAL failed: %r", exc)

    async def close(self) -> None:
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        if self._connection is not None:
            self._connection.close()
            self._connection = None


# What the read-only queries take: a session, a connection, or a SyncReader.
Reader = AsyncSession | AsyncConnection | SyncReader
# A SQLite reader waits this long at most (blocking the event loop) in the rare moments a
# WAL reader is kept out (a checkpoint resetting the log, a recovery).
SQLITE_READER_BUSY_TIMEOUT_SECONDS = 2


def create_read_engine(database_url: str) -> Engine | None:
    """For a SQLite file: a synchronous engine whose connections only read (query_only),
    for SyncReader; None for any other database."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    engine = create_sync_engine(
        url.set(drivername="sqlite+pysqlite"),
        connect_args={"timeout": SQLITE_READER_BUSY_TIMEOUT_SECONDS},
        json_deserializer=json_deserializer,
        pool_size=POOL_SIZE,
        # No limit: a checkout that waited would block the event loop. Connections past
        # pool_size close on return.
        max_overflow=-1,
    )

    @event.listens_for(engine, "connect")
    def _read_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_READER_BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA query_only=ON")
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
