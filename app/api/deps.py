"""Typed dependency aliases shared by the routes."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

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


SessionDep = Annotated[AsyncSession, Depends(get_session)]
SessionFactoryDep = Annotated[SessionFactory, Depends(get_session_factory)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
EventsDep = Annotated[JobEvents, Depends(get_events)]
PoolDep = Annotated[WorkerPool | None, Depends(get_pool)]
