"""Typed dependency aliases shared by the routes."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from app.auth import NotAuthenticated, Principal, authenticate
from app.db import Reader, SessionFactory, SyncReader
from app.events import JobEvents
from app.settings import Settings
from app.worker.pool import WorkerPool


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.session_factory() as session:
        yield session


def _sync_reader(request: Request) -> SyncReader | None:
    """On SQLite, a SyncReader on the app's read engine and its open raw connection."""
    read_engine: Engine | None = request.app.state.read_engine
    if read_engine is None:
        return None
    return SyncReader(read_engine, request.app.state.read_connection)


@asynccontextmanager
async def reading(request: Request) -> AsyncIterator[Reader]:
    """A connection for a request that only reads, each read standing alone (it sees every
    commit made before it). On SQLite, a synchronous connection of the read engine (see
    app.db.create_read_engine); on PostgreSQL, one in autocommit: no BEGIN and ROLLBACK
    round trips."""
    reader = _sync_reader(request)
    if reader is not None:
        try:
            yield reader
        finally:
            reader.close()
        return
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execution_options(isolation_level="AUTOCOMMIT")
        yield connection


@asynccontextmanager
async def writing(request: Request) -> AsyncIterator[tuple[AsyncConnection, Reader]]:
    """A connection of its own to write on (the caller commits what it writes; the rest is
    rolled back), and what to read on before the first write: on SQLite a SyncReader
    (reads outside the write transaction, as SQLite's reads before a transaction's first
    write always were), elsewhere that same connection, so that a request never holds one
    pooled connection while it waits for a second."""
    engine: AsyncEngine = request.app.state.engine
    async with engine.connect() as connection:
        reader = _sync_reader(request)
        if reader is None:
            yield connection, connection
            return
        try:
            yield connection, reader
        finally:
            reader.close()


async def get_reader(request: Request) -> AsyncIterator[Reader]:
    """reading(), as a dependency."""
    async with reading(request) as reader:
        yield reader


# The plain getters below are `async def` on purpose: FastAPI runs a `def` dependency in
# its thread pool, a thread round trip per request for a dictionary lookup.


async def get_session_factory(request: Request) -> SessionFactory:
    """For responses that outlive the request's own session, such as a followed log."""
    factory: SessionFactory = request.app.state.session_factory
    return factory


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_events(request: Request) -> JobEvents:
    events: JobEvents = request.app.state.events
    return events


async def get_pool(request: Request) -> WorkerPool | None:
    pool: WorkerPool | None = request.app.state.pool
    return pool


bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `jobdock keys create`; not needed while no key exists",
)


async def _principal(
    executor: Reader, credentials: HTTPAuthorizationCredentials | None
) -> Principal | None:
    try:
        return await authenticate(
            executor, None if credentials is None else credentials.credentials
        )
    except NotAuthenticated as exc:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=str(exc),
            headers={"WWW-Authenticate": "Bearer"},
        ) from None


async def get_principal(
    session: Annotated[AsyncSession, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal | None:
    """The caller's key; None while no key is configured (the open mode). 401 otherwise.

    Reads with the request's own session (FastAPI shares it within a request)."""
    return await _principal(session, credentials)


async def get_reader_principal(
    connection: Annotated[Reader, Depends(get_reader)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal | None:
    """get_principal, on the request's own read-only connection (see get_reader)."""
    return await _principal(connection, credentials)


async def read_principal(request: Request, reader: Reader) -> Principal | None:
    """get_reader_principal without dependency injection, for the hottest route (GET
    /jobs/{id}): FastAPI's resolution of three dependencies cost more than the route's own
    reads. The route declares BEARER_SECURITY for its spec, since it has no Depends(bearer)."""
    return await _principal(reader, await bearer(request))


# What a route that calls read_principal declares in its spec: the same as Depends(bearer).
BEARER_SECURITY: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
ReaderDep = Annotated[Reader, Depends(get_reader)]
ReaderPrincipalDep = Annotated[Principal | None, Depends(get_reader_principal)]
SessionFactoryDep = Annotated[SessionFactory, Depends(get_session_factory)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
EventsDep = Annotated[JobEvents, Depends(get_events)]
PoolDep = Annotated[WorkerPool | None, Depends(get_pool)]
