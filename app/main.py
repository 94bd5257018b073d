"""The application: create_app() and its lifespan (database, Docker client, worker pool)."""

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from app import __version__, store
from app.api import health, jobs, logs, stats
from app.api import ui as dashboard
from app.api.errors import install_error_handlers
from app.api.hot import HotRoutes
from app.api.limits import install_request_limits
from app.auth import warn_if_exposed
from app.db import (
    JOB_EVENTS_CHANNEL,
    SyncWriter,
    create_engine,
    create_read_engine,
    create_session_factory,
    is_postgresql,
    listen,
    upgrade_to_head,
)
from app.events import JobEvents
from app.metrics import HttpMetricsMiddleware, Metrics
from app.settings import Settings, get_settings
from app.worker.service import start_pool

logger = logging.getLogger(__name__)


@asynccontextmanager
async def _relay_job_events(settings: Settings, events: JobEvents) -> AsyncIterator[None]:
    """On PostgreSQL, wake this process's waiters on changes made by other processes."""

    async def relay() -> None:
        while True:
            try:
                await listen(
                    settings.database_url,
                    {JOB_EVENTS_CHANNEL: events.on_notification},
                    events.notify_all,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("listening for job events failed (%r); retrying", exc)
                # Waiters fall back to re-reading the database meanwhile.
                await asyncio.sleep(1.0)

    task = asyncio.create_task(relay(), name="jobdock-job-events")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def create_app(settings: Settings | None = None, *, run_workers: bool = True) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            engine = create_engine(settings.database_url)
            stack.push_async_callback(engine.dispose)
            await upgrade_to_head(engine)
            session_factory = create_session_factory(engine)
            async with session_factory() as session:
                await warn_if_exposed(session, settings.host)
            events = JobEvents()
            app.state.settings = settings
            app.state.engine = engine
            read_engine = create_read_engine(settings.database_url)
            app.state.read_connection = None
            if read_engine is not None:
                stack.callback(read_engine.dispose)
                # Kept open for the prepared hot reads (see SyncReader).
                read_connection = read_engine.raw_connection()
                stack.callback(read_connection.close)
                app.state.read_connection = read_connection.driver_connection
            app.state.read_engine = read_engine
            app.state.session_factory = session_factory
            # POST /jobs: new jobs written in groups, and the queue cap counted down.
            sync_writer = None
            if read_engine is not None:  # a SQLite file
                sync_writer = SyncWriter(engine)
                stack.push_async_callback(sync_writer.close)
            submissions = store.SubmissionWriter(engine, sync_writer)
            stack.push_async_callback(submissions.close)
            app.state.submissions = submissions
            app.state.queue_room = store.QueueRoom(pending=lambda: submissions.in_flight)
            app.state.events = events
            app.state.pool = None
            if is_postgresql(settings.database_url):
                await stack.enter_async_context(_relay_job_events(settings, events))
            if run_workers and settings.workers > 0:
                app.state.pool = await start_pool(
                    stack, settings, session_factory, events, metrics=metrics
                )
            logger.info("jobdock %s ready (database %s)", __version__, engine.url)
            # What startup built (modules, the app, its schemas and compiled statements)
            # lives as long as the process: out of the collector's way, a full collection
            # under load walks only what requests allocate, not pause the loop for all of it.
            gc.collect()
            gc.freeze()
            yield

    app = FastAPI(
        title="Jobdock",
        version=__version__,
        summary="Run jobs in Docker containers over HTTP.",
        lifespan=lifespan,
    )
    # The busiest routes first: the router tries them in this order.
    app.include_router(jobs.router)
    app.include_router(logs.router)
    app.include_router(health.router)
    app.include_router(stats.router)
    app.include_router(dashboard.router)

    # Innermost of the app's own middleware: it answers the plain GET /jobs/{id} and POST
    # /jobs ahead of the router, and hands the router everything else.
    app.add_middleware(HotRoutes, router=jobs.router)
    install_error_handlers(app)
    install_request_limits(app, max_body_bytes=settings.max_request_bytes)
    # Outermost of the app's own middleware: it also times what the limits refuse.
    app.state.metrics = metrics
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return app
