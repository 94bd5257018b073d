"""The `jobdock` command: serve the API with its workers, or migrate the database."""

import asyncio
import logging
from typing import Annotated

import typer
import uvicorn

from app.db import create_engine, upgrade_to_head
from app.settings import Settings

cli = typer.Typer(help="Jobdock: run jobs in Docker containers over HTTP.", no_args_is_help=True)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _settings(workers: int | None) -> Settings:
    overrides = {} if workers is None else {"workers": workers}
    return Settings(**overrides)  # type: ignore[arg-type]


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Jobs run at once (JOBDOCK_WORKERS); 0 serves only.")
    ] = None,
    no_workers: Annotated[
        bool, typer.Option("--no-workers", help="Serve the API only; `jobdock worker` runs jobs.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the HTTP API with the embedded worker pool."""
    from app.main import create_app

    _configure_logging(log_level)
    settings = _settings(workers)
    uvicorn.run(
        create_app(settings, run_workers=not no_workers),
        host=host or settings.host,
        port=port or settings.port,
        log_level=log_level,
        # Requests in flight get a few seconds; the worker pool has its own grace period.
        timeout_graceful_shutdown=5,
    )


@cli.command()
def worker(
    workers: Annotated[int | None, typer.Option(help="Jobs run at once (JOBDOCK_WORKERS).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run jobs from the shared database on this host's Docker engine, without HTTP."""
    from app.worker.service import run_worker

    _configure_logging(log_level)
    asyncio.run(run_worker(_settings(workers)))


@cli.command()
def migrate() -> None:
    """Upgrade the database schema to the newest migration."""
    _configure_logging("info")
    settings = Settings()

    async def run() -> None:
        engine = create_engine(settings.database_url)
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    typer.echo("database is at the newest migration")


def main() -> None:
    cli()
