"""The application: create_app() and its lifespan (database, Docker client, worker pool)."""

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import health, jobs
from app.api.errors import install_error_handlers
from app.db import create_engine, create_session_factory, upgrade_to_head
from app.settings import Settings, get_settings
from app.worker.service import start_pool

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, run_workers: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            engine = create_engine(settings.database_url)
            stack.push_async_callback(engine.dispose)
            await upgrade_to_head(engine)
            session_factory = create_session_factory(engine)
            app.state.settings = settings
            app.state.session_factory = session_factory
            app.state.pool = None
            if run_workers and settings.workers > 0:
                app.state.pool = await start_pool(stack, settings, session_factory)
            logger.info("jobdock %s ready (database %s)", __version__, engine.url)
            yield

    app = FastAPI(
        title="Jobdock",
        version=__version__,
        summary="Run jobs in Docker containers over HTTP.",
        lifespan=lifespan,
    )
    app.include_router(health.router)
    app.include_router(jobs.router)

    install_error_handlers(app)
    return app
