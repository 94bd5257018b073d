"""What the stats reader costs a trivial job: `echo hi` runs with and without it.

Runs N jobs each way through the real ContainerRunner, alternating, and prints the
means, medians and the paired difference. Not a test: timings depend on the machine.

    .venv/bin/python scripts/measure_stats_cost.py [N] [STATS_DELAY_SECONDS]
"""

import asyncio
import statistics
import sys
import time
import uuid
from typing import Any

import app.worker.runner as runner_module
from app.models import AppliedLimits
from app.settings import Settings
from app.worker.resources import follow_stats as real_follow_stats
from app.worker.runner import ContainerRunner, JobSpec, create_docker_client

IMAGE = "jobdock-test-busybox:latest"  # `make test-image` builds it


async def no_stats(*args: Any, **kwargs: Any) -> None:
    return None


async def ignore_created(container_id: str, limits: AppliedLimits) -> None:
    return None


def echo_hi() -> JobSpec:
    return JobSpec(
        job_id=uuid.uuid4(),
        attempt=1,
        image=IMAGE,
        command=["echo", "hi"],
        env={},
        working_dir=None,
        cpu_shares=1024,
        memory_mb=64,
        timeout_seconds=30,
    )


async def main(n: int, delay: float) -> None:
    runner_module.STATS_DELAY_SECONDS = delay
    settings = Settings(engine_call_timeout_seconds=30.0)
    docker = create_docker_client(settings)
    runner = ContainerRunner(docker, settings, f"measure-{uuid.uuid4().hex[:8]}")

    async def once() -> float:
        started = time.perf_counter()
        run = await runner.run(
            echo_hi(), cancel=asyncio.Event(), detach=asyncio.Event(), on_created=ignore_created
        )
        assert run.stdout == "hi\n", run
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        for _ in range(3):
            await once()  # warm-up
        for i in range(2 * n):
            mode = ("with", "without")[i % 2]
            stats = real_follow_stats if mode == "with" else no_stats
            runner_module.follow_stats = stats  # type: ignore[attr-defined]
            times[mode].append(await once())
    finally:
        await docker.close()
    pairs = [a - b for a, b in zip(times["with"], times["without"], strict=True)]
    for mode, seconds in times.items():
        print(
            f"{mode:8s} n={len(seconds)} total={sum(seconds):.2f} s "
            f"mean={statistics.mean(seconds) * 1000:.1f} ms "
            f"median={statistics.median(seconds) * 1000:.1f} ms"
        )
    with_, without = statistics.mean(times["with"]), statistics.mean(times["without"])
    print(
        f"delay={delay:g} s: paired difference median={statistics.median(pairs) * 1000:+.1f} ms, "
        f"mean={statistics.mean(pairs) * 1000:+.1f} ms ({(with_ - without) / without:+.1%})"
    )


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 50,
            float(sys.argv[2]) if len(sys.argv) > 2 else 0.0,
        )
    )
