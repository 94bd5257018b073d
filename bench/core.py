"""First benchmark of the core: Jobdock end to end against a bare aiodocker loop.

Runs, in one process on one machine, interleaved a/b/a/b:
  (a) N trivial jobs through a bare aiodocker loop (create, start, wait, logs, remove)
      at concurrency C, with the same HostConfig Jobdock uses;
  (b) the same N jobs through a `jobdock serve` process (POST /jobs, poll until terminal)
      with JOBDOCK_WORKERS=C.
Then the service's peak RSS while one job prints a lot of output.

    .venv/bin/python -m bench.core [--jobs 40] [--concurrency 4] [--rounds 2]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiodocker

from app.settings import MIB, Settings
from app.worker.runner import ContainerRunner, JobSpec
from tests.support.images import ensure_test_image
from tests.support.service import Service


async def bare_loop(docker: aiodocker.Docker, image: str, jobs: int, concurrency: int) -> float:
    """Jobs per second when driving the engine directly, same container config."""
    config = ContainerRunner(docker, Settings(), "bench")._container_config(
        JobSpec(uuid.uuid4(), 1, image, ["echo", "hi"], {}, None, 1024, 256, 60)
    )
    slots = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with slots:
            container = await docker.containers.create(config)
            try:
                await container.start()
                await container.wait()
                logs = await container.log(stdout=True)
                assert "".join(logs) == "hi\n", logs
            finally:
                await container.delete(force=True)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(jobs)))
    return jobs / (time.perf_counter() - start)


async def through_jobdock(
    service: Service, image: str, jobs: int, poll_seconds: float = 0.5
) -> tuple[float, list[float]]:
    """Jobs per second and submit-to-terminal latencies through the HTTP API."""

    async def one() -> float:
        submitted = time.perf_counter()
        job = await service.submit(image=image, command=["echo", "hi"])
        # Until GET /jobs/{id}?wait= exists, poll gently so the poller is not the load.
        done = await service.wait(job["id"], poll_seconds=poll_seconds)
        assert done["state"] == "succeeded" and done["stdout"] == "hi\n", done
        return time.perf_counter() - submitted

    start = time.perf_counter()
    latencies = await asyncio.gather(*(one() for _ in range(jobs)))
    return jobs / (time.perf_counter() - start), list(latencies)


async def peak_rss_while_printing(service: Service, image: str, megabytes: int) -> int:
    job = await service.submit(
        image=image,
        command=["sh", "-c", f"head -c {megabytes * MIB} /dev/zero | tr '\\0' x"],
    )
    peak = service.rss_bytes()
    while (await service.get(job["id"]))["state"] in ("queued", "running"):
        peak = max(peak, service.rss_bytes())
        await asyncio.sleep(0.02)
    done = await service.get(job["id"])
    assert done["output_truncated"] and len(done["stdout"]) == MIB, done["state"]
    return peak


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    async with aiodocker.Docker() as docker:
        image = await ensure_test_image(docker)
        with tempfile.TemporaryDirectory() as workdir:
            service = Service(Path(workdir), workers=args.concurrency, poll_interval_seconds=1.0)
            await service.start()
            try:
                bare: list[float] = []
                ours: list[float] = []
                latencies: list[float] = []
                for _ in range(args.rounds):
                    bare.append(await bare_loop(docker, image, args.jobs, args.concurrency))
                    rate, lat = await through_jobdock(service, image, args.jobs, args.poll)
                    ours.append(rate)
                    latencies.extend(lat)
                idle_rss = service.rss_bytes()
                peaks: dict[int, int] = {}
                for megabytes in (50, 200):
                    peaks[megabytes] = await peak_rss_while_printing(service, image, megabytes)
            finally:
                await service.close()
    a, b = statistics.median(bare), statistics.median(ours)
    rows: list[tuple[str, Any]] = [
        ("jobs x rounds, concurrency", f"{args.jobs} x {args.rounds}, C={args.concurrency}"),
        ("bare aiodocker loop, jobs/s (a)", f"{a:.1f}"),
        ("Jobdock end to end, jobs/s (b)", f"{b:.1f}"),
        ("ratio b/a", f"{b / a:.2f}"),
        (
            "Jobdock submit->terminal p50 / p99",
            f"{percentile(latencies, 0.5) * 1000:.0f} ms / "
            f"{percentile(latencies, 0.99) * 1000:.0f} ms",
        ),
        ("service RSS idle", f"{idle_rss / MIB:.0f} MiB"),
        *((f"service peak RSS, job prints {m} MB", f"{p / MIB:.0f} MiB") for m, p in peaks.items()),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--poll", type=float, default=0.5, help="seconds between GET /jobs/{id} per job"
    )
    asyncio.run(main(parser.parse_args()))
