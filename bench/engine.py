"""Part 1: the engine limit against Jobdock, the same trivial job run N times.

(a) a bare aiodocker loop: create, start, wait, logs, remove, at concurrency C, with the
    HostConfig Jobdock builds;
(b) a `jobdock serve` process with JOBDOCK_WORKERS=C: POST /jobs for all N at once, then
    each waits with `GET /jobs/{id}?wait=30` (long poll) until terminal, output checked;
(b') the same with plain polling (GET /jobs/{id} every `poll_seconds`), for comparison.

Interleaved a/b/b'/a/b/b' per C so drift hits both alike; medians of the rounds. Latency is
submit to terminal: in (a) from when the job was handed to the loop, in (b) from the POST,
so both include the wait in the queue. A separate closed loop (one job at a time, C=1)
gives the per-job overhead without any queue.

Jobdock's client is aiohttp, the HTTP library the bare loop's aiodocker uses: with httpx it
took 17-19 ms of CPU per job (one POST, one long poll) on the cores the engine needs, with
aiohttp a few.
"""

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import psutil

from app.settings import Settings
from app.worker.runner import ContainerRunner, JobSpec
from bench.common import (
    TERMINAL,
    BenchError,
    Database,
    Results,
    check,
    median,
    ms,
    percentile,
    profiled,
    running_service,
)
from tests.support.service import Service

COMMAND = ["echo", "hi"]
# GETs sent again after a transport error, reported with the results.
RETRIES = [0]
EXPECTED = "hi\n"


@dataclass
class Run:
    """One timed batch of N jobs."""

    jobs_per_second: float
    latencies: list[float]
    # CPU seconds per job of each process of interest (dockerd, containerd, the service,
    # this client), filled in by `metered`.
    cpu_per_job: dict[str, float] = field(default_factory=dict)


class CpuMeter:
    """CPU time (user + system) of the engine's daemons, the service and this process."""

    def __init__(self, service_pid: int | None) -> None:
        self.processes: dict[str, psutil.Process] = {"client": psutil.Process()}
        if service_pid:
            self.processes["jobdock"] = psutil.Process(service_pid)
        for process in psutil.process_iter(["name"]):
            if process.info["name"] in ("dockerd", "containerd"):
                self.processes[process.info["name"]] = process

    def read(self) -> dict[str, float]:
        times = {}
        for name, process in self.processes.items():
            try:
                cpu = process.cpu_times()
                times[name] = cpu.user + cpu.system
            except psutil.Error:
                times[name] = float("nan")
        return times


async def metered(meter: CpuMeter, jobs: int, batch: Awaitable[Run]) -> Run:
    before = meter.read()
    result = await batch
    after = meter.read()
    result.cpu_per_job = {name: (after[name] - before[name]) / jobs for name in before}
    return result


@dataclass
class Side:
    runs: list[Run] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return median([run.jobs_per_second for run in self.runs])

    def latency(self, q: float) -> float:
        # Median over rounds of each round's percentile.
        return median([percentile(run.latencies, q) for run in self.runs])

    def ratio_to(self, other: "Side") -> float:
        return median(
            [
                mine.jobs_per_second / theirs.jobs_per_second
                for mine, theirs in zip(self.runs, other.runs, strict=True)
            ]
        )

    def cpu(self) -> str:
        names = [n for n in ("dockerd", "containerd", "jobdock", "client") if n in self.cpu_names]
        return " ".join(
            f"{name} {median([run.cpu_per_job[name] for run in self.runs]) * 1000:.0f}"
            for name in names
        )

    @property
    def cpu_names(self) -> set[str]:
        return set().union(*(run.cpu_per_job for run in self.runs)) if self.runs else set()


def container_config(docker: aiodocker.Docker, image: str) -> dict[str, Any]:
    """The config Jobdock's runner would create for this job (same HostConfig, labels)."""
    runner = ContainerRunner(docker, Settings(), "bench")
    spec = JobSpec(uuid.uuid4(), 1, image, COMMAND, {}, None, 1024, 256, 60)
    return runner._container_config(spec)


async def bare_one(docker: aiodocker.Docker, config: dict[str, Any]) -> None:
    container = await docker.containers.create(config)
    try:
        await container.start()
        status = await container.wait()
        logs = await container.log(stdout=True, stderr=True)
        check(status.get("StatusCode") == 0, f"bare job exited {status}")
        check("".join(logs) == EXPECTED, f"bare job printed {logs!r}")
    finally:
        await container.delete(force=True)


async def bare_loop(docker: aiodocker.Docker, image: str, jobs: int, concurrency: int) -> Run:
    config = container_config(docker, image)
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one() -> float:
        async with slots:
            await bare_one(docker, config)
        return time.perf_counter() - start

    latencies = await asyncio.gather(*(one() for _ in range(jobs)))
    return Run(jobs / (time.perf_counter() - start), list(latencies))


async def jobdock_wait(
    client: aiohttp.ClientSession, job_id: str, poll_seconds: float | None, timeout: float = 300
) -> dict[str, Any]:
    """Until terminal: long poll (`poll_seconds` None) or plain polling."""
    deadline = time.monotonic() + timeout
    while True:
        params = {"wait": "30"} if poll_seconds is None else {}
        try:
            async with client.get(f"/jobs/{job_id}", params=params) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError):
            # A keep-alive connection the server closed as it was reused: a GET is safe to
            # send again.
            RETRIES[0] += 1
            continue
        check(status == 200, f"GET /jobs/{job_id}: {status}")
        job: dict[str, Any] = json.loads(body)
        if job["state"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise BenchError(f"job {job_id} still {job['state']} after {timeout} s")
        if poll_seconds is not None:
            await asyncio.sleep(poll_seconds)


async def submit(client: aiohttp.ClientSession, image: str, command: list[str]) -> str:
    async with client.post("/jobs", json={"image": image, "command": command}) as response:
        body = await response.read()
        check(response.status == 202, f"POST /jobs: {response.status} {body[:500]!r}")
    job_id: str = json.loads(body)["id"]
    return job_id


def check_done(job: dict[str, Any]) -> None:
    check(
        job["state"] == "succeeded" and job["stdout"] == EXPECTED and job["exit_code"] == 0,
        f"job ended {job['state']} {job.get('error')!r} stdout={job.get('stdout')!r}",
    )


def new_client(service: Service) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=service.url,
        connector=aiohttp.TCPConnector(limit=1000),
        timeout=aiohttp.ClientTimeout(total=120),
    )


async def through_jobdock(
    service: Service, image: str, jobs: int, poll_seconds: float | None
) -> Run:
    async with new_client(service) as client:
        start = time.perf_counter()

        async def one() -> float:
            job_id = await submit(client, image, COMMAND)
            check_done(await jobdock_wait(client, job_id, poll_seconds))
            return time.perf_counter() - start

        latencies = await asyncio.gather(*(one() for _ in range(jobs)))
        return Run(jobs / (time.perf_counter() - start), list(latencies))


async def closed_loop_bare(docker: aiodocker.Docker, image: str, jobs: int) -> Run:
    config = container_config(docker, image)
    latencies = []
    start = time.perf_counter()
    for _ in range(jobs):
        began = time.perf_counter()
        await bare_one(docker, config)
        latencies.append(time.perf_counter() - began)
    return Run(jobs / (time.perf_counter() - start), latencies)


async def closed_loop_jobdock(service: Service, image: str, jobs: int) -> Run:
    latencies = []
    async with new_client(service) as client:
        start = time.perf_counter()
        for _ in range(jobs):
            began = time.perf_counter()
            job_id = await submit(client, image, COMMAND)
            check_done(await jobdock_wait(client, job_id, None))
            latencies.append(time.perf_counter() - began)
        return Run(jobs / (time.perf_counter() - start), latencies)


async def run(
    results: Results,
    *,
    docker: aiodocker.Docker,
    image: str,
    workdir: Path,
    database: Database,
    jobs: int,
    concurrencies: list[int],
    rounds: int,
    poll_seconds: float,
    poll_at: set[int],
    latency_jobs: int,
    profile_dir: Path | None,
    profile_at: int,
) -> None:
    part = "1 engine"
    ratios: dict[int, float] = {}
    for concurrency in concurrencies:
        bare, waited, polled = Side(), Side(), Side()
        async with running_service(workdir, database, workers=concurrency) as service:
            meter = CpuMeter(service.process.pid if service.process else None)
            # One unmeasured job each way: images, connections and caches warm.
            await bare_loop(docker, image, concurrency, concurrency)
            await through_jobdock(service, image, concurrency, None)
            for index in range(rounds):
                bare.runs.append(
                    await metered(meter, jobs, bare_loop(docker, image, jobs, concurrency))
                )
                profile = (
                    profile_dir / f"engine-c{concurrency}.txt"
                    if profile_dir is not None and index == 0 and concurrency == profile_at
                    else None
                )
                # Long enough for the run; py-spy stops when the block ends.
                with profiled(service.process.pid if service.process else 0, profile, 600):
                    waited.runs.append(
                        await metered(meter, jobs, through_jobdock(service, image, jobs, None))
                    )
                if concurrency in poll_at:
                    polled.runs.append(
                        await metered(
                            meter, jobs, through_jobdock(service, image, jobs, poll_seconds)
                        )
                    )
                print(
                    f"  C={concurrency} round {index + 1}: bare "
                    f"{bare.runs[-1].jobs_per_second:.2f}/s, jobdock "
                    f"{waited.runs[-1].jobs_per_second:.2f}/s"
                    + (f", polling {polled.runs[-1].jobs_per_second:.2f}/s" if polled.runs else ""),
                    flush=True,
                )
        # Each round's b over the a run just before it, then the median: drift between
        # rounds (this machine is shared) cancels within a pair.
        ratio = waited.ratio_to(bare)
        ratios[concurrency] = ratio
        results.add(part, f"C={concurrency} bare aiodocker loop (a), jobs/s", f"{bare.rate:.2f}")
        results.add(
            part,
            f"C={concurrency} Jobdock, ?wait=30 (b), jobs/s; ratio b/a (median of rounds)",
            f"{waited.rate:.2f}; {ratio:.2f}",
            ">= 0.85",
            ratio >= 0.85,
        )
        if polled.runs:
            results.add(
                part,
                f"C={concurrency} Jobdock, polling every {poll_seconds:g} s, jobs/s; ratio",
                f"{polled.rate:.2f}; {polled.ratio_to(bare):.2f}",
            )
        results.add(
            part,
            f"C={concurrency} CPU ms per job, a vs b" + (" vs polling" if polled.runs else ""),
            f"a: {bare.cpu()}; b: {waited.cpu()}"
            + (f"; polling: {polled.cpu()}" if polled.runs else ""),
        )
        results.add(
            part,
            f"C={concurrency} submit->terminal p50 / p99, a vs b (N={jobs} queued at once)",
            f"a {ms(bare.latency(0.5))} / {ms(bare.latency(0.99))}; "
            f"b {ms(waited.latency(0.5))} / {ms(waited.latency(0.99))}"
            + (
                f"; polling {ms(polled.latency(0.5))} / {ms(polled.latency(0.99))}"
                if polled.runs
                else ""
            ),
        )
    if RETRIES[0]:
        results.note(f"part 1: {RETRIES[0]} GET /jobs/{{id}} sent again after a transport error")
    best = max(ratios, key=lambda c: ratios[c])
    results.add(
        part,
        f"best ratio b/a (at C={best})",
        f"{ratios[best]:.2f}",
        ">= 0.90",
        ratios[best] >= 0.90,
    )

    # Per-job overhead without a queue: one job at a time, a/b interleaved.
    bare, waited = Side(), Side()
    async with running_service(workdir, database, workers=1) as service:
        await closed_loop_jobdock(service, image, 2)
        for _ in range(rounds):
            bare.runs.append(await closed_loop_bare(docker, image, latency_jobs))
            waited.runs.append(await closed_loop_jobdock(service, image, latency_jobs))
    overhead = waited.latency(0.5) - bare.latency(0.5)
    results.add(
        part,
        f"one job at a time (C=1, {latency_jobs} jobs): p50 / p99 a vs b",
        f"a {ms(bare.latency(0.5))} / {ms(bare.latency(0.99))}; "
        f"b {ms(waited.latency(0.5))} / {ms(waited.latency(0.99))}",
    )
    results.add(
        part, "p50 overhead b - a, one job at a time", ms(overhead), "<= 25 ms", overhead <= 0.025
    )
