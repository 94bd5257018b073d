"""A worker pool wired to its Docker engine: inside the API process, or on its own."""

import asyncio
import logging
import signal
from contextlib import AsyncExitStack

from app import store
from app.db import SessionFactory, create_engine, create_session_factory, upgrade_to_head
from app.events import JobEvents
from app.metrics import Metrics
from app.settings import Settings
from app.worker.pool import WorkerPool
from app.worker.runner import ContainerRunner, create_docker_client

logger = logging.getLogger(__name__)


async def start_pool(
    stack: AsyncExitStack,
    settings: Settings,
    session_factory: SessionFactory,
    events: JobEvents | None = None,
    *,
    metrics: Metrics | None = None,
) -> WorkerPool:
    """Start a pool on the configured engine; the stack stops it, then closes the client.
    The pool records its jobs, and exposes its slots, in `metrics`."""
    async with session_factory() as session:
        instance_id = str(await store.get_instance_id(session=session))
    docker = create_docker_client(settings)
    stack.push_async_callback(docker.close)
    pool = WorkerPool(
        session_factory=session_factory,
        runner=ContainerRunner(
            docker, settings, settings.worker_id, instance_id, defer_removal=True
        ),
        settings=settings,
        instance_id=instance_id,
        events=events,
        metrics=metrics,
    )
    pool.metrics.watch_pool(pool.concurrency, lambda: pool.busy_slots)
    await pool.start()
    stack.push_async_callback(pool.stop)
    return pool


async def run_worker(settings: Settings) -> None:
    """`jobdock worker`: run jobs without serving HTTP, until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        # No job gauges here: they are read from the database by the API's /metrics.
        metrics = Metrics(job_gauges=False)
        if settings.metrics_port is not None:
            server = metrics.serve(settings.host, settings.metrics_port)
            stack.callback(server.server_close)
            stack.callback(server.shutdown)
        engine = create_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        await upgrade_to_head(engine)
        pool = await start_pool(stack, settings, create_session_factory(engine), metrics=metrics)
        logger.info("worker %s ready (database %s)", pool.worker_id, engine.url)
        await stop.wait()
        logger.info("worker %s stopping", pool.worker_id)
