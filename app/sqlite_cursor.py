"""An aiosqlite cursor for SQLAlchemy that runs each statement in one trip to aiosqlite's
thread (see app.db._use_one_hop_cursors)."""

import collections
import sqlite3
from typing import Any

from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
)
from sqlalchemy.util import EMPTY_DICT

# What one trip brings back: description, rows, rowcount, lastrowid.
_Outcome = tuple[Any, list[Any], int, int | None]


def _run(
    connection: sqlite3.Connection, operation: str, parameters: Any, many: bool, commit: bool
) -> _Outcome:
    """On aiosqlite's thread: the whole life of a sqlite3 cursor; with `commit`, the
    transaction's commit right after the statement."""
    cursor = connection.cursor()
    try:
        if many:
            cursor.executemany(operation, parameters)
        elif parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        description = cursor.description
        rows = cursor.fetchall() if description else []
        outcome = description, rows, cursor.rowcount, cursor.lastrowid
        if commit and connection.in_transaction:
            connection.commit()
        return outcome
    finally:
        cursor.close()


class OneHopCursor(AsyncAdapt_aiosqlite_cursor):
    """Like SQLAlchemy's, but the sqlite3 cursor lives and dies within one function run on
    aiosqlite's thread: its description, rows, rowcount and lastrowid come back together."""

    __slots__ = ("_arraysize", "_commit_after", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: Any) -> None:
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1
        # Set (by app.db) for a statement that ends its transaction: see commit_with().
        self._commit_after = False

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> Any:
        return self._lastrowid

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _async_soft_close(self) -> None:
        return None

    def close(self) -> None:
        self._rows.clear()

    def commit_with(self) -> None:
        """Commit the transaction in the same trip as the next statement. The connection's
        own commit() that follows then finds no transaction open and makes no trip."""
        self._commit_after = True

    async def _trip(self, operation: Any, parameters: Any, many: bool) -> None:
        commit, self._commit_after = self._commit_after, False
        async with self._adapt_connection._execute_mutex:
            outcome: _Outcome = await self._connection._execute(
                _run, self._connection._conn, operation, parameters, many, commit
            )
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows)

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._trip(operation, parameters, many=False)
        return None

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._trip(operation, seq_of_parameters, many=True)
        return None


def commit_unless_idle(connection: AsyncAdapt_aiosqlite_connection) -> None:
    """AsyncAdapt_aiosqlite_connection.commit without the trip to aiosqlite's thread when
    no transaction is open (nothing written since the last commit, or a statement committed
    with its transaction: OneHopCursor.commit_with)."""
    sqlite_connection = connection._connection._connection
    if sqlite_connection is not None and not sqlite_connection.in_transaction:
        return
    _commit(connection)


_commit = AsyncAdapt_aiosqlite_connection.commit
