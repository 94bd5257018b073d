"""Typed dependency aliases shared by the routes."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth import NotAuthenticated, Principal, authenticate
from app.db import SessionFactory
from app.events import JobEvents
from app.settings import Settings
from app.worker.pool import WorkerPool


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.session_factory() as session:
        yield session


def get_session_factory(request: Request) -> SessionFactory:
    """For responses that outlive the request's own session, such as a followed log."""
    factory: SessionFactory = request.app.state.session_factory
    return factory


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_events(request: Request) -> JobEvents:
    events: JobEvents = request.app.state.events
    return events


def get_pool(request: Request) -> WorkerPool | None:
    pool: WorkerPool | None = request.app.state.pool
    return pool


bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `jobdock keys create`; not needed while no key exists",
)


async def get_principal(
    session: Annotated[AsyncSession, Depends(get_session)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal | None:
    """The caller's key; None while no key is configured (the open mode). 401 otherwise.

    Reads with the request's own session (FastAPI shares it within a request)."""
    try:
        return await authenticate(session, None if credentials is None else credentials.credentials)
    except NotAuthenticated as exc:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail=str(exc),
            headers={"WWW-Authenticate": "Bearer"},
        ) from None


SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal | None, Depends(get_principal)]
SessionFactoryDep = Annotated[SessionFactory, Depends(get_session_factory)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
EventsDep = Annotated[JobEvents, Depends(get_events)]
PoolDep = Annotated[WorkerPool | None, Depends(get_pool)]
