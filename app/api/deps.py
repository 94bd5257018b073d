"""Typed dependency aliases shared by the routes."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.events import JobEvents
from app.settings import Settings
from app.worker.pool import WorkerPool


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.session_factory() as session:
        yield session


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
SettingsDep = Annotated[Settings, Depends(get_settings)]
EventsDep = Annotated[JobEvents, Depends(get_events)]
PoolDep = Annotated[WorkerPool | None, Depends(get_pool)]
