"""The `jobdock` command: serve the API with its workers, migrate the database, and talk
to a running service (submit, get, ls, logs, cancel, delete).

Exit codes of the client commands:
  0    success (`submit --wait`/`--follow`: the job succeeded)
  1    the server refused the request (its message is printed), or the job failed
       without an exit code of its own (image not found, engine error, lost worker)
  2    bad command line
  69   no Jobdock answers at the URL (EX_UNAVAILABLE)
  124  `submit --wait`/`--follow`: the job timed out
  130  `submit --wait`/`--follow`: the job was cancelled, or Ctrl-C detached from it
  N    `submit --wait`/`--follow`: the job's own non-zero exit code N
"""

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from app.client import (
    DEFAULT_URL,
    ClientError,
    EndEvent,
    JobdockClient,
    LogEvent,
    ServerUnreachable,
)
from app.keys_cli import keys_cli
from app.settings import Settings

cli = typer.Typer(help="Jobdock: run jobs in Docker containers over HTTP.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69
EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 130

# Each GET /jobs/{id}?wait= returns at the job's end or after this long: short enough for
# the spinner to show queued -> running soon, long enough to be no busy loop.
WAIT_SPINNER_SECONDS = 2.0
WAIT_QUIET_SECONDS = 30.0


def _settings(workers: int | None, **overrides: object) -> Settings:
    """The settings from the environment, with what the command line gave on top."""
    if workers is not None:
        overrides["workers"] = workers
    given = {name: value for name, value in overrides.items() if value is not None}
    return Settings(**given)  # type: ignore[arg-type]


LogLevelOption = Annotated[
    str | None,
    typer.Option(help="debug, info, warning or error (default: JOBDOCK_LOG_LEVEL, or info)."),
]


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
    log_level: LogLevelOption = None,
) -> None:
    """Serve the HTTP API with the embedded worker pool."""
    import uvicorn

    from app.logs import configure_logging
    from app.main import create_app

    settings = _settings(workers, log_level=log_level)
    configure_logging(settings)
    # The address actually listened on: the app warns at start if it is exposed keyless.
    settings = settings.model_copy(update={"host": host or settings.host})
    uvicorn.run(
        create_app(settings, run_workers=not no_workers),
        host=settings.host,
        port=port or settings.port,
        log_level=settings.log_level,
        # uvicorn's loggers go through configure_logging's handler (JSON or text) rather
        # than handlers of its own.
        log_config=None,
        # Requests in flight get a few seconds; the worker pool has its own grace period.
        timeout_graceful_shutdown=5,
    )


@cli.command()
def worker(
    workers: Annotated[int | None, typer.Option(help="Jobs run at once (JOBDOCK_WORKERS).")] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (JOBDOCK_METRICS_PORT; "
            "HOST is JOBDOCK_HOST, 127.0.0.1 by default).",
        ),
    ] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run jobs from the shared database on this host's Docker engine, without HTTP."""
    from app.logs import configure_logging
    from app.worker.service import run_worker

    settings = _settings(workers, metrics_port=metrics_port, log_level=log_level)
    configure_logging(settings)
    asyncio.run(run_worker(settings))


@cli.command()
def migrate() -> None:
    """Upgrade the database schema to the newest migration."""
    from app.db import create_engine, upgrade_to_head
    from app.logs import configure_logging

    settings = Settings()
    configure_logging(settings)

    async def run() -> None:
        engine = create_engine(settings.database_url)
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    typer.echo("database is at the newest migration")


# ---------------------------------------------------------------------------------------
# Client commands: they talk to a running service over HTTP, nothing else.


class State(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"


class Stream(StrEnum):
    stdout = "stdout"
    stderr = "stderr"
    all = "all"


UrlOption = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="JOBDOCK_URL",
        show_envvar=True,
        help="Base URL of the Jobdock service.",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="JOBDOCK_API_KEY",
        show_envvar=True,
        help="API key, sent as `Authorization: Bearer`; needed once the service has keys.",
    ),
]
JobId = Annotated[str, typer.Argument(help="The job's id, as `submit` printed it.")]


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"jobdock: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _api(url: str, api_key: str | None = None) -> Iterator[JobdockClient]:
    """A client for `url`; its errors become a message on stderr and an exit code."""
    try:
        client = JobdockClient(url, api_key=api_key)
    except ClientError as exc:
        _fail(exc.message, EXIT_USAGE)
    try:
        yield client
    except ServerUnreachable as exc:
        _fail(exc.message, EXIT_UNREACHABLE)
    except ClientError as exc:
        _fail(exc.message, EXIT_ERROR)
    finally:
        client.close()


def _pairs(
    values: Sequence[str] | None, option: str, *, from_environ: bool = False
) -> dict[str, str]:
    """KEY=VALUE options as a dict; with `from_environ`, a bare KEY takes this shell's value."""
    pairs: dict[str, str] = {}
    for value in values or ():
        key, sep, rest = value.partition("=")
        if not sep:
            if from_environ and key in os.environ:
                rest = os.environ[key]
            else:
                hint = " (or KEY, to pass this shell's value)" if from_environ else ""
                raise typer.BadParameter(
                    f"{value!r} is not KEY=VALUE{hint}", param_hint=f"'{option}'"
                )
        if not key:
            raise typer.BadParameter(f"{value!r} has an empty key", param_hint=f"'{option}'")
        pairs[key] = rest
    return pairs


def _read_stdin_file(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode()
        return Path(path).read_bytes().decode()
    except UnicodeDecodeError:
        _fail(f"--stdin-file {path}: not UTF-8 text; a job's stdin is text", EXIT_USAGE)
    except OSError as exc:
        _fail(f"--stdin-file {path}: {exc.strerror or exc}", EXIT_USAGE)


def job_exit_code(state: str, exit_code: int | None) -> int:
    """The exit code of `submit --wait` for a job that ended in `state`."""
    if state == "succeeded":
        return 0
    if state == "timed_out":
        return EXIT_TIMED_OUT
    if state == "cancelled":
        return EXIT_CANCELLED
    if exit_code is not None and 0 < exit_code < 256:
        return exit_code
    return EXIT_ERROR


def _report_end(
    job_id: str, state: str, exit_code: int | None, error: str | None, truncated: bool = False
) -> None:
    if truncated:
        typer.echo(f"jobdock: job {job_id}: output was truncated", err=True)
    if state != "succeeded":
        how = f"{state} with exit code {exit_code}" if exit_code is not None else state
        typer.echo(f"jobdock: job {job_id} {how}" + (f": {error}" if error else ""), err=True)


def _write(text: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(text)
    stream.flush()


class _StatusLine:
    """The spinner's text, rendered afresh at each refresh so the clock keeps moving."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.state = "queued"
        self.started = time.monotonic()

    def __rich__(self) -> str:
        elapsed = time.monotonic() - self.started
        return f"job {self.job_id}: {self.state} ({elapsed:.0f} s)"


def _wait_with_spinner(client: JobdockClient, job_id: str) -> dict[str, Any]:
    """Long-poll the job to its end; on a terminal, a spinner shows its state meanwhile."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return client.wait(job_id, chunk_seconds=WAIT_QUIET_SECONDS)
    line = _StatusLine(job_id)
    with console.status(line, spinner="dots"):

        def show(job: dict[str, Any]) -> None:
            line.state = str(job.get("state"))

        return client.wait(job_id, on_state=show, chunk_seconds=WAIT_SPINNER_SECONDS)


def _follow(client: JobdockClient, job_id: str, stream: str) -> EndEvent:
    for event in client.follow_logs(job_id, stream=stream):
        if isinstance(event, LogEvent):
            _write(event.text, err=event.stream == "stderr")
        else:
            return event
    raise ClientError("the log stream ended without saying how the job ended")


@contextmanager
def _detach_on_interrupt(job_id: str) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        _fail(
            f"detached; job {job_id} goes on (`jobdock cancel {job_id}` stops it)",
            EXIT_CANCELLED,
        )


@cli.command(
    context_settings={"allow_interspersed_args": True},
    epilog="Example: jobdock submit --wait busybox:latest -- sh -c 'echo hi; exit 3'",
)
def submit(
    image: Annotated[str, typer.Argument(help="Docker image to run, e.g. busybox:latest.")],
    command: Annotated[
        list[str] | None,
        typer.Argument(help="Command and arguments; put them after `--`. Default: the image's."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="KEY=VALUE (repeatable); a bare KEY passes this shell's."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE label (repeatable).")
    ] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory limit in MiB.")] = None,
    cpu_shares: Annotated[int | None, typer.Option(help="Relative CPU weight (2..262144).")] = None,
    timeout: Annotated[
        int | None, typer.Option("--timeout", help="Seconds before the job is killed.")
    ] = None,
    working_dir: Annotated[
        str | None, typer.Option("--workdir", "-w", help="Absolute working directory.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="-100..100; higher runs first.")] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Runs at most this often while it fails.")
    ] = None,
    stdin_file: Annotated[
        str | None,
        typer.Option("--stdin-file", help="Text file for the job's stdin; `-` reads this stdin."),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Retrying with the same key returns the same job, never a second."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait for the job, print its output, exit with its exit code."),
    ] = False,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Stream its output live, exit with the job's exit code."
        ),
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Submit a job and print its id; with --wait or --follow, run it to the end."""
    job: dict[str, Any] = {"image": image}
    if command:
        job["command"] = list(command)
    if env:
        job["env"] = _pairs(env, "--env", from_environ=True)
    if label:
        job["labels"] = _pairs(label, "--label")
    optional = {
        "memory_mb": memory_mb,
        "cpu_shares": cpu_shares,
        "timeout_seconds": timeout,
        "working_dir": working_dir,
        "priority": priority,
        "max_attempts": max_attempts,
    }
    job.update({key: value for key, value in optional.items() if value is not None})
    if stdin_file is not None:
        job["stdin"] = _read_stdin_file(stdin_file)

    with _api(url, api_key) as client:
        created = client.submit(job, idempotency_key=idempotency_key)
        job_id = str(created["id"])
        if not (wait or follow):
            typer.echo(job_id)
            return
        # The job's output owns stdout from here; its id goes to stderr.
        typer.echo(f"jobdock: job {job_id}", err=True)
        with _detach_on_interrupt(job_id):
            if follow:
                end = _follow(client, job_id, Stream.all)
                _report_end(job_id, end.state, end.exit_code, end.error)
                code = job_exit_code(end.state, end.exit_code)
            else:
                done = _wait_with_spinner(client, job_id)
                _write(str(done.get("stdout") or ""))
                _write(str(done.get("stderr") or ""), err=True)
                state = str(done.get("state"))
                _report_end(
                    job_id,
                    state,
                    done.get("exit_code"),
                    done.get("error"),
                    bool(done.get("output_truncated")),
                )
                code = job_exit_code(state, done.get("exit_code"))
    raise typer.Exit(code)


@cli.command()
def get(
    job_id: JobId,
    wait: Annotated[
        float | None,
        typer.Option(help="Wait up to this many seconds for the job to finish first."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Print a job, with its output, as JSON."""
    with _api(url, api_key) as client:
        job = client.get(job_id, wait=wait)
    typer.echo(json.dumps(job, indent=2, ensure_ascii=False))


def _when(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.command("ls")
def list_jobs(
    state: Annotated[State | None, typer.Option(help="Only jobs in this state.")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", help="KEY=VALUE; only jobs with all these labels."),
    ] = None,
    image: Annotated[str | None, typer.Option(help="Only jobs of this image.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Jobs to show (page size with --all).")] = 20,
    all_pages: Annotated[
        bool, typer.Option("--all", "-a", help="Every matching job, page after page.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the ids.")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List jobs, newest first."""
    labels = list(_pairs(label, "--label").items())
    state_value = None if state is None else state.value
    more = False
    with _api(url, api_key) as client:
        if all_pages:
            jobs = list(
                client.iter_jobs(
                    state=state_value, labels=labels, image=image, page_size=min(limit, 100)
                )
            )
        else:
            page = client.list_jobs(
                state=state_value, labels=labels, image=image, limit=min(limit, 100)
            )
            jobs = list(page.get("items", []))
            more = bool(page.get("next_cursor"))
    if quiet:
        for job in jobs:
            typer.echo(job["id"])
    else:
        _print_table(jobs)
    if more:
        typer.echo("jobdock: more jobs match; --all lists them all", err=True)


def _print_table(jobs: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # A pipe gets full lines rather than the 80 columns rich assumes.
    console = Console(width=None if sys.stdout.isatty() else 240, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=36)
    table.add_column("STATE", no_wrap=True)
    table.add_column("EXIT", justify="right", no_wrap=True)
    table.add_column("IMAGE", no_wrap=True)
    table.add_column("COMMAND", overflow="ellipsis", no_wrap=True, max_width=40)
    table.add_column("CREATED (UTC)", no_wrap=True)
    table.add_column("LABELS", overflow="fold")
    for job in jobs:
        exit_code = job.get("exit_code")
        command = job.get("command") or []
        labels = job.get("labels") or {}
        table.add_row(
            str(job.get("id")),
            str(job.get("state")),
            "" if exit_code is None else str(exit_code),
            str(job.get("image")),
            _short(" ".join(command), 40),
            _when(job.get("created_at")),
            ",".join(f"{key}={value}" for key, value in sorted(labels.items())),
        )
    console.print(table)


@cli.command()
def logs(
    job_id: JobId,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream new output until the job ends.")
    ] = False,
    stream: Annotated[Stream, typer.Option(help="Which output to show.")] = Stream.all,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Print a job's output (stdout to stdout, stderr to stderr when following)."""
    with _api(url, api_key) as client:
        if not follow:
            _write(client.logs(job_id, stream=stream.value))
            return
        with _detach_on_interrupt(job_id):
            _follow(client, job_id, stream.value)


@cli.command()
def cancel(job_id: JobId, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Cancel a queued or running job."""
    with _api(url, api_key) as client:
        status, job = client.cancel(job_id)
    if status == 202:
        typer.echo(f"cancelling {job_id} (its container is being stopped)")
    else:
        typer.echo(f"cancelled {job_id} ({job.get('state')})")


@cli.command()
def delete(job_id: JobId, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Delete a finished job and its output."""
    with _api(url, api_key) as client:
        client.delete(job_id)
    typer.echo(f"deleted {job_id}")


def main() -> None:
    cli()
