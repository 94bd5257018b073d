"""ContainerRunner against the real Docker engine, plus unit tests of OutputCapture.

Every container-level check reads what the engine and the kernel actually did: limits come
back from the container's own cgroup, hardening from `docker inspect` taken while the
container exists (inside on_created, since the runner removes it after the run).
"""

import asyncio
import contextlib
import json
import math
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiodocker.exceptions import DockerError

from app.errors import EngineError, EngineUnreachable, ImageNotFound
from app.models import AppliedLimits
from app.settings import MIB, Settings
from app.worker.runner import (
    LABEL_ATTEMPT,
    LABEL_JOB_ID,
    LABEL_WORKER,
    ContainerRun,
    ContainerRunner,
    JobSpec,
    LabelledContainer,
    OutputCapture,
    StopReason,
    create_docker_client,
)
from tests.conftest import job_containers

# Generous bound on any single run: a hung runner fails the test instead of hanging it.
RUN_DEADLINE = 60.0
OUTPUT_LIMIT = 256 * 1024
PIDS_LIMIT = 64


@dataclass
class Harness:
    docker: aiodocker.Docker
    image: str
    settings: Settings
    worker_id: str
    runner: ContainerRunner

    def spec(self, script: str | None, **overrides: Any) -> JobSpec:
        """A job running `sh -c script` (or the image's default command when None)."""
        fields: dict[str, Any] = {
            "job_id": uuid.uuid4(),
            "attempt": 1,
            "image": self.image,
            "command": None if script is None else ["sh", "-c", script],
            "env": {},
            "working_dir": None,
            "cpu_shares": 1024,
            "memory_mb": 64,
            "timeout_seconds": 30,
        }
        fields.update(overrides)
        return JobSpec(**fields)


@pytest.fixture
async def harness(docker: aiodocker.Docker, test_image: str) -> AsyncIterator[Harness]:
    settings = Settings(
        output_limit_bytes=OUTPUT_LIMIT,
        pids_limit=PIDS_LIMIT,
        pull_timeout_seconds=30.0,
        engine_call_timeout_seconds=30.0,
    )
    async with runner_harness(docker, test_image, settings, "test-runner") as made:
        yield made


@contextlib.asynccontextmanager
async def runner_harness(
    docker: aiodocker.Docker, image: str, settings: Settings, prefix: str
) -> AsyncIterator[Harness]:
    """A runner with its own worker id; removes whatever containers a failing test left."""
    worker_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
    yield Harness(
        docker=docker,
        image=image,
        settings=settings,
        worker_id=worker_id,
        runner=ContainerRunner(docker, settings, worker_id),
    )
    leftovers = await docker.containers.list(
        all=True, filters=json.dumps({"label": [f"{LABEL_WORKER}={worker_id}"]})
    )
    for container in leftovers:
        await container.delete(force=True)


@dataclass
class CreatedRecorder:
    """An on_created callback that keeps what it was told and inspects the container."""

    docker: aiodocker.Docker
    container_id: str | None = None
    limits: AppliedLimits | None = None
    inspect: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    created: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, container_id: str, limits: AppliedLimits) -> None:
        self.calls += 1
        self.container_id = container_id
        self.limits = limits
        self.inspect = await self.docker.containers.container(container_id).show()
        self.created.set()


async def run(
    harness: Harness,
    spec: JobSpec,
    *,
    cancel: asyncio.Event | None = None,
    recorder: CreatedRecorder | None = None,
) -> tuple[ContainerRun, CreatedRecorder]:
    recorder = recorder or CreatedRecorder(harness.docker)
    async with asyncio.timeout(RUN_DEADLINE):
        result = await harness.runner.run(
            spec, cancel=cancel or asyncio.Event(), detach=asyncio.Event(), on_created=recorder
        )
    assert recorder.calls == 1
    return result, recorder


async def assert_removed(docker: aiodocker.Docker, spec: JobSpec, container_id: str | None) -> None:
    assert await job_containers(docker, [spec.job_id]) == []
    assert container_id is not None
    with pytest.raises(DockerError) as info:
        await docker.containers.container(container_id).show()
    assert info.value.status == 404


async def wait_running(docker: aiodocker.Docker, container_id: str) -> None:
    """Bounded wait until the engine reports the container as running."""
    async with asyncio.timeout(30.0):
        while not (await docker.containers.container(container_id).show())["State"]["Running"]:
            await asyncio.sleep(0.05)


# -- outcomes ----------------------------------------------------------------------------


async def test_success_with_stdout(harness: Harness) -> None:
    spec = harness.spec("echo hello; echo world")
    result, created = await run(harness, spec)
    assert result.stop_reason is StopReason.exited
    assert result.exit_code == 0
    assert result.stdout == "hello\nworld\n"
    assert result.stderr == ""
    assert result.output_truncated is False
    assert result.oom_killed is False
    await assert_removed(harness.docker, spec, created.container_id)


async def test_image_default_command_runs_when_command_is_none(harness: Harness) -> None:
    spec = harness.spec(None)
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "hello from the default command\n"
    await assert_removed(harness.docker, spec, created.container_id)


async def test_stderr_is_kept_apart_from_stdout(harness: Harness) -> None:
    script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
    spec = harness.spec(script)
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "out1\nout2\nout3\n"
    assert result.stderr == "err1\nerr2\nerr3\n"
    await assert_removed(harness.docker, spec, created.container_id)


async def test_non_zero_exit_code_is_reported(harness: Harness) -> None:
    spec = harness.spec("echo failing >&2; exit 3")
    result, created = await run(harness, spec)
    assert result.stop_reason is StopReason.exited
    assert result.exit_code == 3
    assert result.stderr == "failing\n"
    assert result.oom_killed is False
    await assert_removed(harness.docker, spec, created.container_id)


async def test_env_and_working_dir_reach_the_process(harness: Harness) -> None:
    spec = harness.spec(
        'echo "$GREETING|$WITH_EQUALS"; pwd',
        env={"GREETING": "hello world", "WITH_EQUALS": "a=b=c"},
        working_dir="/srv/job",
    )
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "hello world|a=b=c\n/srv/job\n"
    await assert_removed(harness.docker, spec, created.container_id)


async def test_long_lines_and_utf8_output_survive_intact(harness: Harness) -> None:
    # The engine splits log lines longer than 16 KiB; the runner must glue them back.
    spec = harness.spec(
        r"head -c 40000 /dev/zero | tr '\0' y; echo; printf 'h\303\251 \342\202\254\n'"
    )
    result, _ = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "y" * 40000 + "\nhé €\n"
    assert result.output_truncated is False


async def test_unterminated_last_line_is_not_lost(harness: Harness) -> None:
    """Output that does not end in a newline, written as the container exits, is kept.

    Docker's log follower misses such a last line now and then (json-file, Docker 20.10),
    so one run proves little: the test runs several.
    """
    for attempt in range(1, 13):
        spec = harness.spec("head -c 8192 /dev/zero | tr '\\0' x", attempt=attempt)
        result, created = await run(harness, spec)
        assert result.exit_code == 0
        assert result.stdout == "x" * 8192, (
            f"run {attempt}: got {len(result.stdout)} of the 8192 bytes the job printed"
        )
        await assert_removed(harness.docker, spec, created.container_id)


# -- limits and hardening ----------------------------------------------------------------

CGROUP_SCRIPT = """
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  echo v2
  cat /sys/fs/cgroup/cpu.weight /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max
  cat /sys/fs/cgroup/memory.swap.max 2>/dev/null || echo unsupported
else
  echo v1
  cat /sys/fs/cgroup/cpu/cpu.shares /sys/fs/cgroup/memory/memory.limit_in_bytes
  cat /sys/fs/cgroup/pids/pids.max
  cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo unsupported
fi
"""


def cpu_weights_for_shares(shares: int) -> set[int]:
    """cpu.weight values that runtimes derive from CpuShares on cgroup v2.

    runc before 1.3 maps linearly; runc 1.3+ and recent crun use a quadratic fit in log2.
    """
    linear = 1 + ((shares - 2) * 9999) // 262142
    log = math.log2(shares)
    quadratic = math.ceil(10 ** ((log * log + 125 * log) / 612.0 - 7.0 / 34.0))
    return {linear, quadratic}


async def test_cpu_shares_and_memory_limit_are_applied_in_the_cgroup(harness: Harness) -> None:
    spec = harness.spec(CGROUP_SCRIPT, cpu_shares=512, memory_mb=48)
    result, created = await run(harness, spec)
    assert result.exit_code == 0, result.stderr
    version, cpu, memory, pids, swap = result.stdout.split()
    if version == "v1":
        assert int(cpu) == 512
        assert int(memory) == 48 * MIB
        # memory+swap equals memory: no swap on top of the limit.
        assert swap == "unsupported" or int(swap) == 48 * MIB
    else:
        assert int(cpu) in cpu_weights_for_shares(512)
        assert int(memory) == 48 * MIB
        assert swap == "unsupported" or int(swap) == 0
    assert int(pids) == PIDS_LIMIT

    assert result.limits == AppliedLimits(
        cpu_shares=512,
        memory_bytes=48 * MIB,
        memory_swap_bytes=48 * MIB,
        pids_limit=PIDS_LIMIT,
        timeout_seconds=spec.timeout_seconds,
        output_limit_bytes=OUTPUT_LIMIT,
        network_mode="none",
        nano_cpus=10**9,
        read_only_rootfs=True,
        user="65534:65534",
    )
    # The callback is told the same limits the result carries.
    assert created.limits == result.limits
    host = created.inspect["HostConfig"]
    assert host["CpuShares"] == 512
    assert host["Memory"] == 48 * MIB
    assert host["MemorySwap"] == host["Memory"]
    await assert_removed(harness.docker, spec, created.container_id)


async def test_container_is_hardened(harness: Harness) -> None:
    script = "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; grep -c : /proc/net/dev"
    spec = harness.spec(script)
    result, created = await run(harness, spec)
    assert result.exit_code == 0, result.stderr

    host = created.inspect["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert not host.get("CapAdd")
    assert "no-new-privileges" in (host["SecurityOpt"] or [])
    assert host["Init"] is True
    assert host["PidsLimit"] == PIDS_LIMIT
    assert host["Privileged"] is False
    assert host["AutoRemove"] is False
    assert not host.get("Binds")
    assert not host.get("Mounts")
    assert host["MemorySwap"] == host["Memory"] == spec.memory_mb * MIB
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["LogConfig"]["Config"]["max-size"] == str(harness.settings.engine_log_max_bytes)
    assert created.inspect["NetworkSettings"]["Networks"].keys() <= {"none"}

    # ... and the kernel agrees: no capabilities, no privilege gain, loopback only.
    status = dict(line.split(":\t") for line in result.stdout.splitlines()[:2])
    assert int(status["CapEff"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert result.stdout.splitlines()[2] == "1"  # one interface line in /proc/net/dev: lo
    await assert_removed(harness.docker, spec, created.container_id)


async def test_container_carries_the_job_labels(harness: Harness) -> None:
    spec = harness.spec("true", attempt=3)
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    labels = created.inspect["Config"]["Labels"]
    assert labels[LABEL_JOB_ID] == str(spec.job_id)
    assert labels[LABEL_ATTEMPT] == "3"
    assert labels[LABEL_WORKER] == harness.worker_id
    assert created.inspect["Name"] == f"/jobdock-{spec.job_id}-3"
    await assert_removed(harness.docker, spec, created.container_id)


# -- stopping ----------------------------------------------------------------------------


async def test_timeout_kills_the_container(harness: Harness) -> None:
    spec = harness.spec("echo started; sleep 600", timeout_seconds=1)
    # Returning well within the deadline means the 600 s sleep was killed.
    result, created = await run(harness, spec)
    assert result.stop_reason is StopReason.timed_out
    assert result.exit_code is None
    assert result.stdout == "started\n"
    await assert_removed(harness.docker, spec, created.container_id)


async def test_cancel_while_running_kills_the_container(harness: Harness) -> None:
    spec = harness.spec("echo started; sleep 600", timeout_seconds=600)
    cancel = asyncio.Event()
    recorder = CreatedRecorder(harness.docker)
    task = asyncio.create_task(run(harness, spec, cancel=cancel, recorder=recorder))
    try:
        async with asyncio.timeout(30.0):
            await recorder.created.wait()
        assert recorder.container_id is not None
        await wait_running(harness.docker, recorder.container_id)
        assert not task.done()
        cancel.set()
        result, _ = await task
    finally:
        task.cancel()
    assert result.stop_reason is StopReason.cancelled
    assert result.exit_code is None
    await assert_removed(harness.docker, spec, recorder.container_id)


async def test_out_of_memory_is_reported(harness: Harness) -> None:
    spec = harness.spec(
        "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived", memory_mb=16
    )
    result, created = await run(harness, spec)
    assert result.stop_reason is StopReason.exited
    assert result.oom_killed is True
    assert result.exit_code != 0
    assert "survived" not in result.stdout
    assert result.limits.memory_bytes == 16 * MIB
    await assert_removed(harness.docker, spec, created.container_id)


async def test_huge_output_is_capped_at_the_limit(harness: Harness) -> None:
    spec = harness.spec("head -c 52428800 /dev/zero | tr '\\0' x")
    result, created = await run(harness, spec)
    assert result.stop_reason is StopReason.exited
    assert result.exit_code == 0
    assert len(result.stdout) == OUTPUT_LIMIT
    assert result.stdout == "x" * OUTPUT_LIMIT
    assert result.output_truncated is True
    assert result.stderr == ""
    assert result.limits.output_limit_bytes == OUTPUT_LIMIT
    await assert_removed(harness.docker, spec, created.container_id)


async def test_output_exactly_at_the_limit_is_not_truncated(harness: Harness) -> None:
    spec = harness.spec(f"head -c {OUTPUT_LIMIT} /dev/zero | tr '\\0' z")
    result, _ = await run(harness, spec)
    assert result.stdout == "z" * OUTPUT_LIMIT
    assert result.output_truncated is False


# -- engine errors -----------------------------------------------------------------------


async def test_unknown_image_raises_image_not_found(harness: Harness) -> None:
    image = "jobdock-no-such-image:1"
    spec = harness.spec("true", image=image)
    recorder = CreatedRecorder(harness.docker)
    with pytest.raises(ImageNotFound) as info:
        async with asyncio.timeout(RUN_DEADLINE):
            await harness.runner.run(
                spec, cancel=asyncio.Event(), detach=asyncio.Event(), on_created=recorder
            )
    assert image in info.value.message
    assert isinstance(info.value, EngineError)
    assert recorder.calls == 0
    assert await job_containers(harness.docker, [spec.job_id]) == []


async def test_unreachable_engine_raises_engine_unreachable(harness: Harness) -> None:
    client = create_docker_client(Settings(docker_host="unix:///nonexistent.sock"))
    try:
        runner = ContainerRunner(client, harness.settings, harness.worker_id)
        spec = harness.spec("true")
        recorder = CreatedRecorder(harness.docker)
        with pytest.raises(EngineUnreachable):
            async with asyncio.timeout(RUN_DEADLINE):
                await runner.run(
                    spec, cancel=asyncio.Event(), detach=asyncio.Event(), on_created=recorder
                )
        assert recorder.calls == 0
        with pytest.raises(EngineUnreachable):
            await runner.list_job_containers()
        # Removal is best effort: it logs, it does not raise.
        await runner.remove_container("no-such-container")
    finally:
        await client.close()
        await client.connector.close()  # see test_closing_the_docker_client_...


async def test_engine_that_does_not_answer_raises_engine_error_naming_the_deadline(
    harness: Harness, tmp_path: Path
) -> None:
    # An "engine" that accepts connections and never answers.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    path = tmp_path / "silent.sock"
    server = await asyncio.start_unix_server(silent, path=str(path))
    client = create_docker_client(Settings(docker_host=f"unix://{path}"))
    settings = harness.settings.model_copy(update={"engine_call_timeout_seconds": 1.0})
    runner = ContainerRunner(client, settings, harness.worker_id)
    try:
        with pytest.raises(EngineError) as info:
            async with asyncio.timeout(RUN_DEADLINE):
                await runner.run(
                    harness.spec("true"),
                    cancel=asyncio.Event(),
                    detach=asyncio.Event(),
                    on_created=CreatedRecorder(harness.docker),
                )
        assert "did not answer within 1 s" in info.value.message, info.value.message
        assert not isinstance(info.value, (EngineUnreachable, ImageNotFound))
    finally:
        await client.close()
        await client.connector.close()
        server.close()
        await server.wait_closed()


async def test_closing_the_docker_client_closes_its_connection_pool() -> None:
    # The service closes its client with docker.close() at shutdown (app.main).
    client = create_docker_client(Settings())
    await client.version()
    await client.close()
    closed = client.connector.closed
    if not closed:
        await client.connector.close()  # the test itself must not leak sockets
    assert closed, "Docker.close() left the connector of create_docker_client open"


async def test_truncated_runs_give_back_their_engine_connections(harness: Harness) -> None:
    """A run past the output cap must not keep a connection, or the pool runs dry."""
    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not url.startswith("unix://"):
        pytest.skip("needs the engine on a unix socket")
    limit = 4
    connector = aiohttp.UnixConnector(path=url.removeprefix("unix://"), limit=limit)
    client = aiodocker.Docker(url="unix://localhost", connector=connector)
    settings = harness.settings.model_copy(
        update={"output_limit_bytes": 1024, "engine_call_timeout_seconds": 5.0}
    )
    runner = ContainerRunner(client, settings, harness.worker_id)
    try:
        # Twice as many runs as connections: any per-run leak exhausts the pool.
        for attempt in range(1, 2 * limit + 1):
            spec = harness.spec("head -c 2000000 /dev/zero | tr '\\0' x; echo", attempt=attempt)
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
                    f"earlier truncated runs kept theirs ({exc!r})"
                ) from exc
            assert result.output_truncated is True
            assert result.stdout == "x" * 1024
    finally:
        await client.close()
        await connector.close()


async def test_leftover_container_with_the_same_name_is_replaced(harness: Harness) -> None:
    spec = harness.spec("echo fresh run")
    leftover = await harness.docker.containers.create(
        {
            "Image": harness.image,
            "Cmd": ["sleep", "600"],
            "Labels": {
                LABEL_JOB_ID: str(spec.job_id),
                LABEL_ATTEMPT: str(spec.attempt),
                LABEL_WORKER: harness.worker_id,
            },
            "HostConfig": {"NetworkMode": "none"},
        },
        name=f"jobdock-{spec.job_id}-{spec.attempt}",
    )
    await leftover.start()
    result, created = await run(harness, spec)
    assert result.exit_code == 0
    assert result.stdout == "fresh run\n"
    assert created.container_id != leftover.id
    await assert_removed(harness.docker, spec, leftover.id)
    await assert_removed(harness.docker, spec, created.container_id)


async def test_list_job_containers_finds_labelled_containers(harness: Harness) -> None:
    job_id = uuid.uuid4()
    labelled = await harness.docker.containers.create(
        {
            "Image": harness.image,
            "Cmd": ["true"],
            "Labels": {
                LABEL_JOB_ID: str(job_id),
                LABEL_ATTEMPT: "2",
                LABEL_WORKER: harness.worker_id,
            },
            "HostConfig": {"NetworkMode": "none"},
        }
    )
    garbled = await harness.docker.containers.create(
        {
            "Image": harness.image,
            "Cmd": ["true"],
            "Labels": {LABEL_JOB_ID: "not-a-uuid", LABEL_WORKER: harness.worker_id},
            "HostConfig": {"NetworkMode": "none"},
        }
    )
    found = await harness.runner.list_job_containers()
    assert (
        LabelledContainer(
            container_id=labelled.id, job_id=job_id, attempt=2, worker_id=harness.worker_id
        )
        in found
    )
    assert garbled.id not in {c.container_id for c in found}

    await harness.runner.remove_container(labelled.id)
    assert labelled.id not in {c.container_id for c in await harness.runner.list_job_containers()}
    # Absent is fine.
    await harness.runner.remove_container(labelled.id)


# -- OutputCapture -----------------------------------------------------------------------


def test_capture_keeps_everything_up_to_the_limit() -> None:
    capture = OutputCapture(limit=10)
    assert capture.feed("abcde") is True
    assert capture.feed("fghij") is True
    assert capture.text == "abcdefghij"
    assert capture.size == 10
    assert capture.truncated is False


def test_capture_cuts_at_the_byte_limit_and_notes_truncation() -> None:
    capture = OutputCapture(limit=10)
    assert capture.feed("abcdefgh") is True
    assert capture.feed("ijklmn") is False
    assert capture.text == "abcdefghij"
    assert capture.truncated is True
    # Anything after the cap is dropped.
    assert capture.feed("more") is False
    assert capture.text == "abcdefghij"


def test_capture_counts_bytes_not_characters() -> None:
    capture = OutputCapture(limit=6)
    assert capture.feed("ééé") is True  # 3 characters, 6 bytes
    assert capture.feed("a") is False
    assert capture.text == "ééé"
    assert capture.truncated is True


def test_capture_never_splits_a_multibyte_character() -> None:
    capture = OutputCapture(limit=5)
    # "a" + "é" (2 bytes) + "€" (3 bytes) = 6 bytes: the cut falls inside "€".
    assert capture.feed("aé€") is False
    assert capture.text == "aé"
    assert len(capture.text.encode()) <= 5
    assert "\ufffd" not in capture.text
    assert capture.truncated is True


def test_capture_replaces_nul() -> None:
    capture = OutputCapture(limit=1024)
    capture.feed("a\x00b")
    capture.feed("\x00")
    assert capture.text == "a\ufffdb\ufffd"
    assert "\x00" not in capture.text
