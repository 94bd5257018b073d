"""What a finished container used: wall time, CPU time, peak memory, and the image that ran.

Wall time comes from the container's inspect (StartedAt/FinishedAt). CPU time and peak
memory come from the engine's stats stream, sampled while the container runs: the engine
reports its cgroup's cumulative CPU time and, on cgroup v1, the cgroup's own memory
high-water mark, so one sample late in the run says how much was used up to then (on
cgroup v2 only the current usage: the peak is the largest sample). Samples come about
once a second. The runner opens the stats stream only once a container has run for a
moment (its STATS_DELAY_SECONDS, a quarter of a second), so a trivial job that ends
sooner never costs a stats connection; the first sample comes within about a second of
the opening. Once the container has exited the engine reports nothing more, so a job that
ends before the first sample (in practice, most jobs shorter than about half a second)
has no CPU time or peak memory (None), and the CPU time of a job's last moments is not
counted.
"""

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from app.models import ResourceReport

logger = logging.getLogger(__name__)

# RFC 3339 as the engine writes it: nanoseconds, "Z" or an offset.
_ENGINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?\d*(Z|[+-]\d\d:\d\d)$")
# The engine's zero time.Time: "never" (not started, or not finished yet).
_ZERO_YEAR = "0001-"

# How long connecting to the engine for its stats may take before the reader gives up.
STATS_CONNECT_SECONDS = 10.0


def parse_engine_time(text: str | None) -> tuple[datetime, int] | None:
    """An engine timestamp as (whole seconds, nanoseconds), or None for "never"."""
    if not text or text.startswith(_ZERO_YEAR):
        return None
    match = _ENGINE_TIME.match(text)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return stamp, int((fraction or "").ljust(9, "0"))


def wall_seconds(state: dict[str, Any]) -> float | None:
    """How long the container ran, from its inspect's State; None if it never finished."""
    started = parse_engine_time(state.get("StartedAt"))
    finished = parse_engine_time(state.get("FinishedAt"))
    if started is None or finished is None:
        return None
    seconds = (finished[0] - started[0]).total_seconds() + (finished[1] - started[1]) / 1e9
    # A container killed before it really started can report a finish before its start.
    return max(0.0, round(seconds, 9))


@dataclass
class StatsSampler:
    """Folds the engine's stats samples into CPU time and peak memory."""

    cpu_ns: int | None = None
    peak_memory_bytes: int | None = None
    samples: int = 0

    def feed(self, sample: dict[str, Any]) -> None:
        memory = sample.get("memory_stats") or {}
        cpu = (sample.get("cpu_stats") or {}).get("cpu_usage") or {}
        total_usage = cpu.get("total_usage") or 0
        # A stopped container's samples are empty: they say nothing, not "zero".
        if not memory and not total_usage:
            return
        self.samples += 1
        if total_usage:
            # Cumulative, so the largest is the latest.
            self.cpu_ns = max(self.cpu_ns or 0, int(total_usage))
        # cgroup v1 keeps a high-water mark; cgroup v2 only the current usage.
        peak = memory.get("max_usage") or memory.get("usage")
        if peak:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, int(peak))

    @property
    def cpu_seconds(self) -> float | None:
        return None if self.cpu_ns is None else self.cpu_ns / 1e9


async def follow_stats(
    docker: aiodocker.Docker, container_id: str, sampler: StatsSampler, *, delay: float = 0.0
) -> None:
    """Feed the sampler from the engine's stats stream until cancelled or the stream ends.

    Runs as a task beside the container and is cancelled once it exits. aiodocker's own
    `stats()` generator never releases its response when left early, so every abandoned
    reading would keep one connection of the pool: the response is held and closed here.
    Never raises but CancelledError: resource figures are best effort.
    """
    try:
        if delay > 0:
            await asyncio.sleep(delay)
        timeout = aiohttp.ClientTimeout(total=None, connect=STATS_CONNECT_SECONDS)
        # aiodocker has no public call that hands out the response to close.
        async with docker._query(
            f"containers/{container_id}/stats", params={"stream": "1"}, timeout=timeout
        ) as response:
            try:
                # One JSON document per line, about one a second.
                async for line in response.content:
                    if line.strip():
                        sampler.feed(json.loads(line))
            finally:
                response.close()
    except asyncio.CancelledError:
        raise
    except (DockerError, aiohttp.ClientError, OSError, ValueError) as exc:
        logger.debug("stats of container %s: %r", container_id, exc)


async def image_digest(docker: aiodocker.Docker, image_id: str) -> str | None:
    """The image's first registry digest; None when it has none (built locally) or is gone."""
    try:
        image = await docker.images.inspect(image_id)
    except DockerError as exc:
        logger.debug("inspect of image %s: %s", image_id, exc.message)
        return None
    return digest_of(image)


def digest_of(image: dict[str, Any]) -> str | None:
    """The first registry digest of an image's inspect; None when it has none."""
    digests = image.get("RepoDigests") or []
    return str(digests[0]) if digests else None


def resource_report(
    info: dict[str, Any], sampler: StatsSampler, digest: str | None
) -> ResourceReport:
    """The report of a container that has exited, from its last inspect and the samples."""
    return ResourceReport(
        wall_seconds=wall_seconds(info.get("State") or {}),
        cpu_seconds=sampler.cpu_seconds,
        peak_memory_bytes=sampler.peak_memory_bytes,
        image_id=info.get("Image") or None,
        image_digest=digest,
    )


async def stop_sampling(task: "asyncio.Task[None]") -> None:
    """Cancel a follow_stats task and wait for it to let go of its connection."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
