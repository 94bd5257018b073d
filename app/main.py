"""The application: create_app() and its lifespan (database, Docker client, worker pool)."""

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app import __version__
from app.api import health, jobs
from app.db import create_engine, create_session_factory, upgrade_to_head
from app.errors import InvalidCursor, JobAlreadyFinished, JobdockError, JobNotFound
from app.settings import Settings, get_settings
from app.worker.pool import WorkerPool
from app.worker.runner import ContainerRunner, create_docker_client

logger = logging.getLogger(__name__)

ERROR_STATUS: dict[type[JobdockError], int] = {
    JobNotFound: status.HTTP_404_NOT_FOUND,
    JobAlreadyFinished: status.HTTP_409_CONFLICT,
    InvalidCursor: status.HTTP_422_UNPROCESSABLE_CONTENT,
}


class EscapedJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a 422 echoes the input, which may hold lone surrogates
    that UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return EscapedJSONResponse(
        {"detail": jsonable_encoder(exc.errors())},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


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
                docker = create_docker_client(settings)
                stack.push_async_callback(docker.close)
                pool = WorkerPool(
                    session_factory=session_factory,
                    runner=ContainerRunner(docker, settings, settings.worker_id),
                    settings=settings,
                )
                await pool.start()
                stack.push_async_callback(pool.stop)
                app.state.pool = pool
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

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, JobdockError)
        code = next(
            (code for kind, code in ERROR_STATUS.items() if isinstance(exc, kind)),
            status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
        return JSONResponse({"detail": exc.message}, status_code=code)

    app.add_exception_handler(JobdockError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return app
