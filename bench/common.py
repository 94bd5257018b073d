"""What every part of the benchmark shares: the processes under test, statistics, results.

A wrong answer from anything measured raises `BenchError`, which aborts the whole run:
a fast wrong answer is no result.
"""

import asyncio
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from sqlalchemy.engine import make_url

from app.db import asyncpg_dsn
from tests.support.service import Service

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}
MIB = 1024 * 1024
BENCH_DB_PREFIX = "jobdock_bench_"
PROFILE_RATE = 200


class BenchError(RuntimeError):
    """Something measured gave a wrong answer, or would not start."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds == seconds else "n/a"


@dataclass
class Row:
    """One line of the result table."""

    part: str
    name: str
    value: str
    target: str = ""
    verdict: str = ""

    def markdown(self) -> str:
        return f"| {self.part} | {self.name} | {self.value} | {self.target} | {self.verdict} |"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self, part: str, name: str, value: str, target: str = "", ok: bool | None = None
    ) -> None:
        verdict = "" if ok is None else ("met" if ok else "**missed**")
        row = Row(part, name, value, target, verdict)
        self.rows.append(row)
        print(row.markdown(), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def markdown(self) -> str:
        lines = ["| part | measure | value | target | |", "|---|---|---|---|---|"]
        lines += [row.markdown() for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def _run(command: Sequence[str]) -> str:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False, cwd=ROOT
        ).stdout.rstrip()
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"


def machine_description() -> list[str]:
    mem = _run(["free", "-g"]).splitlines()
    cpu = "n/a"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    status = _run(["git", "status", "--short"]).splitlines()
    return [
        f"nproc: {_run(['nproc']).strip()} ({cpu})",
        f"memory (free -g): {mem[1] if len(mem) > 1 else 'n/a'}",
        "docker server: "
        + _run(
            ["docker", "version", "--format", "{{.Server.Version}} {{.Server.Os}}/{{.Server.Arch}}"]
        )
        + ", "
        + _run(["docker", "info", "--format", "storage {{.Driver}}, cgroup v{{.CgroupVersion}}"]),
        f"kernel: {platform.release()}",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"commit: {_run(['git', 'log', '-1', '--oneline'])[:100]}",
        f"uncommitted: {len(status)} paths ("
        + ", ".join(line[3:] for line in status[:40])
        + (", ..." if len(status) > 40 else "")
        + ")",
    ]


class RssSampler:
    """Peak RSS of a process, sampled every `interval` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                rss: int = self._process.memory_info().rss
            except psutil.Error:
                return
            self.samples.append(rss)
            self.peak = max(self.peak, rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------
# Databases


@dataclass
class Database:
    """Where a part's Jobdock keeps its jobs: a fresh SQLite file or PostgreSQL database."""

    kind: str  # "sqlite" or "postgres"
    server_url: str | None = None  # postgresql+asyncpg://... of the server (postgres only)
    created: list[str] = field(default_factory=list)

    async def fresh_url(self, workdir: Path) -> str:
        if self.kind == "sqlite":
            return f"sqlite+aiosqlite:///{workdir / f'jobdock-{uuid.uuid4().hex[:8]}.db'}"
        assert self.server_url is not None
        name = BENCH_DB_PREFIX + uuid.uuid4().hex[:12]
        await _pg_execute(self.server_url, f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    async def drop_all(self) -> None:
        if self.server_url is None:
            return
        for name in self.created:
            await _pg_execute(self.server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


async def _pg_execute(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(server_url))  # type: ignore[no-untyped-call]
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def postgres_server_url() -> str:
    """The server URL: JOBDOCK_BENCH_POSTGRES_URL, else what scripts/ensure-postgres.sh says."""
    url = os.environ.get("JOBDOCK_BENCH_POSTGRES_URL")
    if url:
        return url
    out = subprocess.run(
        [str(ROOT / "scripts" / "ensure-postgres.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("postgresql")]
    if out.returncode != 0 or not lines:
        raise BenchError(f"no PostgreSQL server: {out.stderr.strip()[-500:]}")
    return lines[-1].strip()


# ------------------------------------------------------------------------------------
# Processes under test


async def start_service(
    workdir: Path,
    database: Database,
    *,
    workers: int,
    database_url: str | None = None,
    **settings: Any,
) -> Service:
    """A real `jobdock serve` process on a fresh database (or the one given), ready to answer.

    The service is under development by others: a start that fails is tried again a few
    times before the run gives up.
    """
    url = database_url or await database.fresh_url(workdir)
    last: Exception | None = None
    for attempt in range(4):
        service = Service(
            workdir,
            database_url=url,
            workers=workers,
            poll_interval_seconds=2.0,
            max_queued=0,
            retention=0,
            **settings,
        )
        try:
            await service.start(timeout=60.0)
            return service
        except RuntimeError as exc:
            last = exc
            await service.close()
            print(f"jobdock did not start (attempt {attempt + 1}); retrying", flush=True)
            await asyncio.sleep(15)
    raise BenchError(f"jobdock would not start: {last}")


@contextlib.asynccontextmanager
async def running_service(
    workdir: Path,
    database: Database,
    *,
    workers: int,
    database_url: str | None = None,
    **settings: Any,
) -> AsyncIterator[Service]:
    service = await start_service(
        workdir, database, workers=workers, database_url=database_url, **settings
    )
    try:
        yield service
    finally:
        await service.close()


@contextlib.contextmanager
def profiled(pid: int, output: Path | None, seconds: float) -> Iterator[None]:
    """Sample the process with py-spy while the block runs: raw folded stacks of the
    threads that hold the GIL (`--gil`: the Python work, which is what a 2-core box runs
    out of), 200 Hz. The wall time sampled goes to `output` + ".seconds"."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if output is None or not Path(py_spy).exists():
        yield
        return
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--gil",
            "--rate",
            str(PROFILE_RATE),
            "--duration",
            str(max(1, round(seconds))),
            "--output",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    began = time.monotonic()
    try:
        yield
    finally:
        ended = time.monotonic()
        # py-spy writes its file when sent SIGINT, or when the duration ends.
        if process.poll() is None:
            process.send_signal(2)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        Path(f"{output}.seconds").write_text(f"{ended - began:.3f}\n")


async def gather_limited(count: int, concurrency: int, one: Callable[[int], Any]) -> list[Any]:
    """Run `one(i)` for i in range(count), at most `concurrency` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def limited(index: int) -> Any:
        async with slots:
            return await one(index)

    return list(await asyncio.gather(*(limited(i) for i in range(count))))
