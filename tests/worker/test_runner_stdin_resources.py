"""A job's stdin and its resource report, against the real Docker engine.

Plus unit tests of the pieces that need no engine: parsing the engine's timestamps,
folding stats samples, and the pool passing the report on for every kind of end.
"""

import asyncio
import dataclasses
import gc
import os
import time
import uuid
from typing import Any, cast

import aiodocker
import aiohttp
import pytest
from aiodocker.exceptions import DockerError

from app.errors import EngineError
from app.models import Job, JobState, ResourceReport
from app.settings import Settings
from app.worker import runner as runner_module
from app.worker.pool import result_of, spec_of
from app.worker.resources import StatsSampler, image_digest, parse_engine_time, wall_seconds
from app.worker.runner import ContainerRunner, JobSpec, StopReason
from tests.worker import test_runner
from tests.worker.test_pool import container_run
from tests.worker.test_runner import (
    RUN_DEADLINE,
    CreatedRecorder,
    Harness,
    assert_removed,
    run,
)

# The real-engine harness of test_runner, as a fixture of this module too.
harness = test_runner.harness

ONE_MIB = 1024 * 1024

# Allocates ~50 MB in the shell (its buffers make the resident size about twice that),
# keeps it while burning CPU for 2 s, then sleeps 2 s so the engine samples the totals.
MEMORY_AND_CPU = (
    "x=$(head -c 50000000 /dev/zero | tr '\\0' a); "
    "timeout 2 sh -c 'while :; do :; done'; "
    "sleep 2; echo ${#x}"
)


def stdin_spec(h: Harness, command: list[str], stdin: str | None, **overrides: Any) -> JobSpec:
    return dataclasses.replace(h.spec(None, **overrides), command=command, stdin=stdin)


# -- stdin -------------------------------------------------------------------------------


async def test_stdin_is_read_by_cat(harness: Harness) -> None:
    spec = stdin_spec(harness, ["cat"], "hello stdin\n")
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "hello stdin\n"
    config = created.inspect["Config"]
    assert (config["OpenStdin"], config["StdinOnce"]) == (True, True)
    await assert_removed(harness.docker, spec, created.container_id)


async def test_multibyte_utf8_and_newlines_round_trip_exactly(harness: Harness) -> None:
    text = "héllo wörld ✓ 🚀 日本語\nline two\r\n\ttabbed\n\n\nno newline at the end ∎"
    spec = stdin_spec(harness, ["cat"], text)
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == text
    await assert_removed(harness.docker, spec, created.container_id)


async def test_one_mib_of_stdin_is_counted_in_bytes(harness: Harness) -> None:
    # Two bytes a character: the count proves bytes arrive, not characters.
    spec = stdin_spec(harness, ["wc", "-c"], "é" * (ONE_MIB // 2))
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout.strip() == str(ONE_MIB)
    await assert_removed(harness.docker, spec, created.container_id)


async def test_stdin_ignored_by_the_program_does_not_hold_up_the_job(harness: Harness) -> None:
    spec = stdin_spec(harness, ["true"], "x" * ONE_MIB)
    started = time.monotonic()
    result, created = await run(harness, spec)
    elapsed = time.monotonic() - started
    assert result.stop_reason is StopReason.exited
    assert result.exit_code == 0
    # A healthy run takes well under a second; a write waiting for a reader would hang.
    assert elapsed < 10.0, f"took {elapsed:.1f} s"
    await assert_removed(harness.docker, spec, created.container_id)


async def test_stdin_read_in_part_does_not_hold_up_the_job(harness: Harness) -> None:
    spec = stdin_spec(harness, ["head", "-c", "5"], "0123456789" * (ONE_MIB // 10))
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "01234"
    await assert_removed(harness.docker, spec, created.container_id)


async def test_without_stdin_the_program_reads_end_of_file_at_once(harness: Harness) -> None:
    spec = stdin_spec(harness, ["cat"], None)
    started = time.monotonic()
    result, created = await run(harness, spec)
    assert time.monotonic() - started < 10.0
    assert result.exit_code == 0
    assert result.stdout == ""
    # Exactly as before stdin existed: no open stdin.
    assert created.inspect["Config"]["OpenStdin"] is False
    await assert_removed(harness.docker, spec, created.container_id)


async def test_empty_stdin_is_no_stdin(harness: Harness) -> None:
    spec = stdin_spec(harness, ["cat"], "")
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert created.inspect["Config"]["OpenStdin"] is False


async def test_stdin_of_a_job_that_times_out_while_reading(harness: Harness) -> None:
    # Reads one line, then never reads again while 1 MiB waits: killed at the timeout.
    spec = stdin_spec(
        harness, ["sh", "-c", "read line; echo got $line; sleep 600"], "first\n" + "y" * ONE_MIB
    )
    spec = dataclasses.replace(spec, timeout_seconds=2)
    result, created = await run(harness, spec)
    assert result.stop_reason is StopReason.timed_out
    assert result.stdout == "got first\n"
    assert result.resources is not None
    assert result.resources.wall_seconds is not None
    assert 1.5 <= result.resources.wall_seconds < 10.0
    await assert_removed(harness.docker, spec, created.container_id)


async def test_reattach_to_a_created_container_writes_its_stdin(harness: Harness) -> None:
    """A worker that stopped between create and start: the next one starts it, with stdin."""
    spec = stdin_spec(harness, ["cat"], "written by the second worker\n")
    container = await harness.runner._create(spec)
    assert (await container.show())["State"]["Status"] == "created"
    async with asyncio.timeout(RUN_DEADLINE):
        result = await harness.runner.attach(
            container.id, spec, cancel=asyncio.Event(), detach=asyncio.Event(), running_for=0.0
        )
    assert result.exit_code == 0
    assert result.stdout == "written by the second worker\n"
    await assert_removed(harness.docker, spec, container.id)


def test_the_pool_hands_the_jobs_stdin_to_the_runner() -> None:
    job = Job(image="busybox", cpu_shares=1024, memory_mb=16, timeout_seconds=5, stdin="in\n")
    assert spec_of(job).stdin == "in\n"
    assert (
        spec_of(Job(image="busybox", cpu_shares=1, memory_mb=16, timeout_seconds=5)).stdin is None
    )


async def test_stdin_and_stats_give_back_their_connections_and_sockets(harness: Harness) -> None:
    """Unread stdin, read stdin and the stats reader must keep no connection or socket."""
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not url.startswith("unix://"):
        pytest.skip("needs the engine on a unix socket")
    limit = 4
    connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"), limit=limit)
    client = aiodocker.Docker(url="unix://localhost", connector=connector)
    settings = harness.settings.model_copy(update={"engine_call_timeout_seconds": 5.0})
    runner = ContainerRunner(client, settings, harness.worker_id)

    async def one(attempt: int, command: list[str], script_stdin: str) -> None:
        spec = stdin_spec(harness, command, script_stdin, attempt=attempt)
        try:
            async with asyncio.timeout(20.0):  # a healthy run takes well under a second
                result = await runner.run(
                    spec,
                    cancel=asyncio.Event(),
                    detach=asyncio.Event(),
                    on_created=CreatedRecorder(harness.docker),
                )
        except (EngineError, TimeoutError) as exc:
            raise AssertionError(
                f"run {attempt} of a client with {limit} connections stalled: "
                f"earlier runs kept theirs ({exc!r})"
            ) from exc
        assert result.exit_code == 0

    try:
        await one(1, ["true"], "warm-up")
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        runs = 4 * limit
        for attempt in range(2, runs + 2):
            # Three in four leave their stdin unread: a leak there shows well past the slack.
            if attempt % 4:
                await one(attempt, ["true"], "x" * ONE_MIB)
            else:
                await one(attempt, ["wc", "-c"], "x" * ONE_MIB)
        gc.collect()
        after = len(os.listdir("/proc/self/fd"))
        # Kept-alive connections of the pool may stay open; one socket per run may not.
        assert after - before <= limit, f"{after - before} more open files after {runs} runs"
    finally:
        await client.close()
        await connector.close()


# -- resources ---------------------------------------------------------------------------


async def test_resources_of_a_job_that_uses_memory_and_cpu(harness: Harness) -> None:
    spec = harness.spec(MEMORY_AND_CPU, memory_mb=256)
    result, created = await run(harness, spec)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "50000000\n"
    report = result.resources
    assert report is not None
    assert report.peak_memory_bytes is not None and report.peak_memory_bytes > 50_000_000
    assert report.cpu_seconds is not None and report.cpu_seconds > 0.5
    # 2 s of burning and 2 s of sleep, plus the allocation.
    assert report.wall_seconds is not None and 4.0 <= report.wall_seconds < 10.0
    image = await harness.docker.images.inspect(harness.image)
    assert report.image_id == image["Id"]
    assert report.image_id is not None and report.image_id.startswith("sha256:")
    # Built here, never pushed or pulled: no registry digest.
    assert report.image_digest is None
    await assert_removed(harness.docker, spec, created.container_id)


async def test_resources_of_a_trivial_job(harness: Harness) -> None:
    spec = harness.spec("echo hi")
    result, _ = await run(harness, spec)
    report = result.resources
    assert report is not None
    assert report.wall_seconds is not None and 0.0 <= report.wall_seconds < 5.0
    assert report.image_id is not None and report.image_id.startswith("sha256:")
    # Sampled or not (it may end before the engine's first sample), never nonsense.
    assert report.cpu_seconds is None or report.cpu_seconds >= 0.0
    assert report.peak_memory_bytes is None or report.peak_memory_bytes > 0


async def test_resources_of_a_cancelled_job(harness: Harness) -> None:
    spec = harness.spec("sleep 600", timeout_seconds=600)
    cancel = asyncio.Event()
    recorder = CreatedRecorder(harness.docker)
    task = asyncio.create_task(run(harness, spec, cancel=cancel, recorder=recorder))
    try:
        async with asyncio.timeout(30.0):
            await recorder.created.wait()
        await asyncio.sleep(1.5)
        cancel.set()
        result, _ = await task
    finally:
        task.cancel()
    assert result.stop_reason is StopReason.cancelled
    report = result.resources
    assert report is not None
    assert report.wall_seconds is not None and 1.0 <= report.wall_seconds < 10.0
    # Running for 1.5 s: the engine sampled it at least once.
    assert report.peak_memory_bytes is not None and report.peak_memory_bytes > 0
    assert report.cpu_seconds is not None


# -- units -------------------------------------------------------------------------------


def test_engine_time_keeps_nanoseconds() -> None:
    parsed = parse_engine_time("2026-12-03T15:47:26.525918005Z")
    assert parsed is not None
    stamp, nanos = parsed
    assert stamp.isoformat() == "2026-12-03T15:47:26+00:00"
    assert nanos == 525918005


def test_engine_time_with_offset_and_short_fraction() -> None:
    parsed = parse_engine_time("2026-12-03T16:47:26.5+01:00")
    assert parsed is not None
    assert parsed[0].isoformat() == "2026-12-03T16:47:26+01:00"
    assert parsed[1] == 500_000_000


@pytest.mark.parametrize("text", [None, "", "0001-01-01T00:00:00Z", "yesterday"])
def test_engine_time_never_or_unreadable(text: str | None) -> None:
    assert parse_engine_time(text) is None


def test_wall_seconds_across_a_second_boundary() -> None:
    state = {
        "StartedAt": "2026-12-03T15:47:26.999999999Z",
        "FinishedAt": "2026-12-03T15:47:29.000000001Z",
    }
    assert wall_seconds(state) == pytest.approx(2.000000002, abs=1e-9)


def test_wall_seconds_of_a_container_that_never_finished() -> None:
    state = {"StartedAt": "2026-12-03T15:47:26Z", "FinishedAt": "0001-01-01T00:00:00Z"}
    assert wall_seconds(state) is None


def test_sampler_keeps_the_peak_and_the_last_cpu_time() -> None:
    sampler = StatsSampler()
    sampler.feed(
        {
            "memory_stats": {"usage": 4_000_000, "max_usage": 4_000_000},
            "cpu_stats": {"cpu_usage": {"total_usage": 40_000_000}},
        }
    )
    sampler.feed(
        {
            "memory_stats": {"usage": 700_000, "max_usage": 100_000_000},
            "cpu_stats": {"cpu_usage": {"total_usage": 1_500_000_000}},
        }
    )
    # What the engine sends once the container stopped: nothing to count.
    sampler.feed({"read": "0001-01-01T00:00:00Z", "memory_stats": {}, "cpu_stats": {}})
    sampler.feed({"memory_stats": {}, "cpu_stats": {"cpu_usage": {"total_usage": 0}}})
    assert sampler.samples == 2
    assert sampler.peak_memory_bytes == 100_000_000
    assert sampler.cpu_seconds == pytest.approx(1.5)


def test_sampler_without_a_high_water_mark_keeps_the_largest_usage() -> None:
    # cgroup v2: only the current usage is reported.
    sampler = StatsSampler()
    for usage in (5_000_000, 9_000_000, 2_000_000):
        sampler.feed({"memory_stats": {"usage": usage}, "cpu_stats": {}})
    assert sampler.peak_memory_bytes == 9_000_000
    assert sampler.cpu_seconds is None


def test_sampler_with_no_samples_reports_none() -> None:
    sampler = StatsSampler()
    assert (sampler.cpu_seconds, sampler.peak_memory_bytes) == (None, None)


class StubImages:
    def __init__(self, image: dict[str, Any] | None) -> None:
        self.image = image

    async def inspect(self, name: str) -> dict[str, Any]:
        if self.image is None:
            raise DockerError(404, f"No such image: {name}")
        return self.image


class StubDocker:
    def __init__(self, image: dict[str, Any] | None) -> None:
        self.images = StubImages(image)


@pytest.mark.parametrize(
    ("image", "digest"),
    [
        (
            {"RepoDigests": ["busybox@sha256:" + "a" * 64, "mirror/busybox@sha256:" + "b" * 64]},
            "busybox@sha256:" + "a" * 64,
        ),
        ({"RepoDigests": []}, None),
        ({"RepoDigests": None}, None),
        ({}, None),
        (None, None),  # removed since it ran
    ],
)
async def test_image_digest_is_the_first_registry_digest(
    image: dict[str, Any] | None, digest: str | None
) -> None:
    docker = cast(aiodocker.Docker, StubDocker(image))
    assert await image_digest(docker, "sha256:" + "c" * 64) == digest


@pytest.mark.parametrize(
    ("stop_reason", "exit_code", "oom_killed", "state"),
    [
        (StopReason.exited, 0, False, JobState.succeeded),
        (StopReason.exited, 3, False, JobState.failed),
        (StopReason.exited, 137, True, JobState.failed),
        (StopReason.timed_out, None, False, JobState.timed_out),
        (StopReason.cancelled, None, False, JobState.cancelled),
    ],
)
def test_result_of_passes_the_report_on_for_every_end(
    stop_reason: StopReason, exit_code: int | None, oom_killed: bool, state: JobState
) -> None:
    report = ResourceReport(
        wall_seconds=1.25,
        cpu_seconds=0.5,
        peak_memory_bytes=1234,
        image_id="sha256:" + "0" * 64,
        image_digest=None,
    )
    run_ = dataclasses.replace(
        container_run(stop_reason=stop_reason, exit_code=exit_code, oom_killed=oom_killed),
        resources=report,
    )
    job = Job(image="busybox", cpu_shares=1024, memory_mb=16, timeout_seconds=7)
    result = result_of(job, run_)
    assert result.state is state
    assert result.resources == report


def test_jobspec_stdin_defaults_to_none() -> None:
    spec = JobSpec(
        job_id=uuid.uuid4(),
        attempt=1,
        image="busybox",
        command=None,
        env={},
        working_dir=None,
        cpu_shares=1024,
        memory_mb=16,
        timeout_seconds=5,
    )
    assert spec.stdin is None


class CountingImages:
    """Image inspects by id, each answered from `answers` in turn, and counted."""

    def __init__(self, answers: list[dict[str, Any] | BaseException]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def inspect(self, name: str) -> dict[str, Any]:
        self.asked.append(name)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def digest_runner(images: CountingImages) -> ContainerRunner:
    docker = cast(aiodocker.Docker, StubDocker(None))
    docker.images = images  # type: ignore[assignment]
    return ContainerRunner(docker, Settings(), "test-digests")


async def test_the_runner_asks_an_images_digest_once() -> None:
    digest = "busybox@sha256:" + "a" * 64
    images = CountingImages([{"RepoDigests": [digest]}, {"RepoDigests": []}])
    runner = digest_runner(images)
    pulled, built = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    for _ in range(3):
        assert await runner._image_digest(pulled) == digest
        # "No digest" is an answer too: kept.
        assert await runner._image_digest(built) is None
    assert await runner._image_digest(None) is None
    assert images.asked == [pulled, built]


async def test_a_failed_digest_look_up_is_asked_again() -> None:
    digest = "busybox@sha256:" + "a" * 64
    images = CountingImages(
        [DockerError(404, "No such image"), TimeoutError(), {"RepoDigests": [digest]}]
    )
    runner = digest_runner(images)
    image = "sha256:" + "1" * 64
    assert await runner._image_digest(image) is None
    assert await runner._image_digest(image) is None
    assert await runner._image_digest(image) == digest
    assert await runner._image_digest(image) == digest
    assert len(images.asked) == 3


async def test_the_digest_cache_is_bounded() -> None:
    count = runner_module.DIGEST_CACHE_SIZE + 10
    images = CountingImages([{"RepoDigests": []} for _ in range(count + 1)])
    runner = digest_runner(images)
    ids = [f"sha256:{n:064x}" for n in range(count)]
    for image in ids:
        await runner._image_digest(image)
    assert len(runner._digests) == runner_module.DIGEST_CACHE_SIZE
    # The oldest went first: asking for it again asks the engine.
    await runner._image_digest(ids[0])
    assert len(images.asked) == count + 1
