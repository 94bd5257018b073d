"""One job's container lifecycle on the Docker engine: create, start, wait, collect, remove.

A fresh run costs six engine calls: create (pulling the image only if the engine lacks
it), attach (the output, before the start), start, wait, inspect, delete. A job that runs
for more than a moment adds its stats stream, a job with stdin its own attach, and the
first run of an image the look-up of its registry digest.

The runner never touches the database: it reports what happened and the pool records it.
"""

import asyncio
import codecs
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypeVar, cast

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.stream import Stream as AttachStream

from app.aio import finish_despite_cancel
from app.errors import ContainerGone, EngineError, EngineUnreachable, ImageNotFound
from app.models import AppliedLimits, ResourceReport
from app.settings import MIB, Settings
from app.worker.resources import (
    StatsSampler,
    digest_of,
    follow_stats,
    resource_report,
    stop_sampling,
)
from app.worker.stdin import STDIN_CONFIG, attach_stdin, open_attach, write_stdin

logger = logging.getLogger(__name__)

LABEL_JOB_ID = "jobdock.job-id"
LABEL_ATTEMPT = "jobdock.attempt"
LABEL_WORKER = "jobdock.worker"
LABEL_INSTANCE = "jobdock.instance"

# aiodocker's status for "could not connect to the engine at all".
CANNOT_CONNECT = 900

# How long the output readers may lag behind the container's exit before we stop waiting.
LOG_DRAIN_SECONDS = 30.0

# How long a container runs before its stats stream is opened. A trivial job is over by
# then and never costs that engine call and connection. The engine samples about once a
# second anyway, so a longer job loses little: measured on Docker 20.10, jobs of 0.6 s
# and more kept their figures, while most of 0.3 s now get none (they used to).
STATS_DELAY_SECONDS = 0.25

# How many image ids' registry digests a runner remembers.
DIGEST_CACHE_SIZE = 256

T = TypeVar("T")
Stream = Literal["stdout", "stderr"]
STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")
# The stream numbers of the engine's multiplexed attach frames.
ATTACH_STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True)
class JobSpec:
    """What the runner needs to know of a job."""

    job_id: uuid.UUID
    attempt: int
    image: str
    command: list[str] | None
    env: dict[str, str]
    working_dir: str | None
    cpu_shares: int
    memory_mb: int
    timeout_seconds: int
    # Written to the container's stdin, which is then closed; None: stdin is empty.
    stdin: str | None = None
    # The hard CPU cap; None (jobs stored before it existed): the default_cpus setting.
    cpus: float | None = None


class StopReason(StrEnum):
    exited = "exited"
    timed_out = "timed_out"
    cancelled = "cancelled"


@dataclass
class ContainerRun:
    """What happened to one container."""

    stop_reason: StopReason
    exit_code: int | None
    oom_killed: bool
    stdout: str
    stderr: str
    output_truncated: bool
    limits: AppliedLimits
    # Wall time, CPU time and peak memory where the engine reported them; the image run.
    # (None only from runners that know nothing of it, like the tests' fakes.)
    resources: ResourceReport | None = None
    # The container's removal, still under way, from a runner made with
    # `defer_removal`: the result need not wait for it. None: removed already.
    removal: "asyncio.Task[None] | None" = None


@dataclass(frozen=True)
class LabelledContainer:
    container_id: str
    job_id: uuid.UUID
    attempt: int
    worker_id: str
    # The Jobdock database (installation) whose job this is; "" on unlabelled containers.
    instance: str = ""
    # When the engine created it, in seconds since the epoch (not part of its identity).
    created: float = field(default=0.0, compare=False)


@dataclass
class OutputCapture:
    """Keeps the first `limit` bytes of a stream and notes whether more came."""

    limit: int
    parts: list[str] = field(default_factory=list)
    size: int = 0
    truncated: bool = False

    def feed(self, chunk: str) -> bool:
        """Store a chunk; False once the limit is passed and the rest can be dropped."""
        data = chunk.encode()
        room = self.limit - self.size
        if len(data) > room:
            self.parts.append(data[:room].decode(errors="ignore"))
            self.size = self.limit
            self.truncated = True
            return False
        self.parts.append(chunk)
        self.size += len(data)
        return True

    @property
    def text(self) -> str:
        # PostgreSQL text cannot hold NUL; a job's output may.
        return "".join(self.parts).replace("\x00", "\ufffd")


# What a run's output readers kept: stdout, stderr.
Outputs = tuple[OutputCapture, OutputCapture]
OnCreated = Callable[[str, AppliedLimits], Awaitable[None]]
# Called with each piece of output as it is kept (never anything past the cap).
OnOutput = Callable[[Stream, str], None]


class _DockerClient(aiodocker.Docker):
    """aiodocker leaves a connector it was handed open on close(); this client closes it."""

    async def close(self) -> None:
        await super().close()
        await self.connector.close()


def tmpfs_options(settings: Settings) -> str:
    """The mount options of a job's /tmp.

    exec: a job may run a script it wrote there. Mode 1777 lets any user write; runc resets
    the mode to 0755 when the job's working_dir is /tmp itself, so a numeric job_user also
    owns the mount's root.
    """
    options = f"rw,exec,nosuid,nodev,size={settings.tmp_size_mb}m,mode=1777"
    uid, _, gid = settings.job_user.partition(":")
    if not settings.allow_image_user and uid.isdigit() and (not gid or gid.isdigit()):
        options += f",uid={uid},gid={gid or uid}"
    return options


def engine_url(settings: Settings) -> str:
    return settings.docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def create_docker_client(settings: Settings) -> aiodocker.Docker:
    """One client for the whole process, its connection pool sized for the workers.

    Each running job holds up to five long requests: wait, its output (one attach stream,
    or two log streams for a re-attached job), the stats stream, and its stdin while that
    is being written.
    """
    url = engine_url(settings)
    timeout = aiohttp.ClientTimeout(total=None, connect=10.0)
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(
            path=url.removeprefix("unix://"), limit=settings.workers * 6 + 20
        )
        return _DockerClient(url="unix://localhost", connector=connector, timeout=timeout)
    return aiodocker.Docker(url=url, timeout=timeout)


class ContainerRunner:
    """Drives jobs through one Docker engine."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        settings: Settings,
        worker_id: str,
        instance_id: str = "",
        *,
        defer_removal: bool = False,
    ) -> None:
        self._docker = docker
        # Hand a finished container's removal back as `ContainerRun.removal` rather than
        # finishing it before the result is returned (the pool records the result first).
        self._defer_removal = defer_removal
        self._settings = settings
        self._worker_id = worker_id
        self._instance_id = instance_id
        # Containers' stdin writers, from their start until _supervise takes them over.
        self._stdin_writers: dict[str, asyncio.Task[None]] = {}
        # Registry digests by image id (None: the image has none), oldest first.
        self._digests: dict[str, str | None] = {}

    async def run(
        self,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        on_created: OnCreated,
        on_output: OnOutput | None = None,
    ) -> ContainerRun:
        """Run the job to its end. Raises ImageNotFound, EngineUnreachable or EngineError.

        Setting `cancel` kills the container. Setting `detach`, then cancelling the task,
        leaves the container running for a later `attach`.
        """
        with self._engine_errors():
            return await self._run(
                spec, cancel=cancel, detach=detach, on_created=on_created, on_output=on_output
            )

    async def _engine_accepts_connections(self) -> bool:
        """Whether a new connection to a local engine's socket is accepted."""
        url = engine_url(self._settings)
        if not url.startswith("unix://"):
            return True
        try:
            async with asyncio.timeout(5):
                _, writer = await asyncio.open_unix_connection(url.removeprefix("unix://"))
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def engine_answers(self) -> bool:
        try:
            await self._call(self._docker.version())
        except (DockerError, aiohttp.ClientError, OSError):
            return False
        return True

    @contextlib.contextmanager
    def _engine_errors(self) -> Iterator[None]:
        """Turn aiodocker's and aiohttp's exceptions into Jobdock's engine errors."""
        try:
            yield
        except DockerError as exc:
            if exc.status == CANNOT_CONNECT:
                raise EngineUnreachable(f"Docker engine unreachable: {exc.message}") from exc
            raise EngineError(f"Docker engine error ({exc.status}): {exc.message}") from exc
        except TimeoutError as exc:
            # Before OSError, of which TimeoutError is a subclass.
            raise EngineError(
                "Docker engine did not answer within "
                f"{self._settings.engine_call_timeout_seconds:g} s"
            ) from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise EngineUnreachable(f"Docker engine unreachable: {exc}") from exc

    async def _run(
        self,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        on_created: OnCreated,
        on_output: OnOutput | None = None,
    ) -> ContainerRun:
        config = self._container_config(spec)
        container = await self._create(spec, config)

        async def start(tasks: list[asyncio.Task[Any]]) -> "asyncio.Task[Outputs] | None":
            if "User" in config:
                # The engine applies what it was asked to create, or refuses the create.
                limits = self._applied_limits(
                    {"HostConfig": config["HostConfig"], "Config": {"User": config["User"]}},
                    spec,
                )
            else:
                # Only the engine knows the image's own USER.
                limits = self._applied_limits(await self._call(container.show()), spec)
            await on_created(container.id, limits)
            # Attached before the start, so no byte is missed; the stream ends when the
            # container's stdio closes, so it has all the output.
            stream = await self._call(open_attach(container, stdout=True, stderr=True))
            reader = asyncio.create_task(self._read_attached(stream, on_output), name="attach")
            tasks.append(reader)
            try:
                await self._start(container, spec.stdin)
            except BaseException:
                # A reader cancelled before its first step would never close it.
                await stream.close()
                raise
            return reader

        return await self._supervise(
            container,
            spec,
            cancel,
            detach,
            start,
            timeout=spec.timeout_seconds,
            on_output=on_output,
        )

    async def attach(
        self,
        container_id: str,
        spec: JobSpec,
        *,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        running_for: float,
        on_output: OnOutput | None = None,
    ) -> ContainerRun:
        """Take over a job container that an earlier worker started, and see it to its end.

        The output is read from the container's start, so nothing is lost; the timeout
        counts from when the job started, not from now.
        """
        container = self._docker.containers.container(container_id)

        async def start(tasks: list[asyncio.Task[Any]]) -> "asyncio.Task[Outputs] | None":
            info = await self._call(container.show())
            if info["State"]["Status"] == "created":
                # The earlier worker stopped between create and start: stdin is still
                # unwritten (it is attached before the start), so it is written now.
                await self._start(container, spec.stdin)
            # The output is read from the logs, from the container's start.
            return None

        remaining = max(0.0, spec.timeout_seconds - running_for)
        with self._engine_errors():
            return await self._supervise(
                container, spec, cancel, detach, start, timeout=remaining, on_output=on_output
            )

    async def _supervise(
        self,
        container: DockerContainer,
        spec: JobSpec,
        cancel: asyncio.Event,
        detach: asyncio.Event,
        start: Callable[[list[asyncio.Task[Any]]], Awaitable["asyncio.Task[Outputs] | None"]],
        *,
        timeout: float,
        on_output: OnOutput | None = None,
    ) -> ContainerRun:
        """Wait for a container, collect its output, and remove it, unless told to detach.

        `start` starts the container if needed, adding its tasks to the list, and returns
        the reader of an attach stream made before the start, if any; without one the
        output is followed in the container's logs. `on_output` sees the output as the
        readers read it; the final reading of followed logs may be longer (see
        `_complete`)."""
        tasks: list[asyncio.Task[Any]] = []
        run: ContainerRun | None = None
        try:
            attached = await start(tasks)
            sampler = StatsSampler()
            # Opened only after STATS_DELAY_SECONDS: a job over by then never opens it.
            sampling = asyncio.create_task(
                follow_stats(self._docker, container.id, sampler, delay=STATS_DELAY_SECONDS),
                name="stats",
            )
            tasks.append(sampling)
            followers = []
            if attached is None:
                followers = [
                    asyncio.create_task(
                        self._capture(container, stream, on_output), name=f"log-{stream}"
                    )
                    for stream in STREAMS
                ]
                tasks.extend(followers)
            stop_reason, status = await self._wait(container, timeout, cancel, tasks)
            # Past the exit the engine has no more figures; the reader must not delay us.
            await stop_sampling(sampling)
            info = await self._call(container.show())
            state = info["State"]
            if state.get("RemovalInProgress") or state.get("Dead"):
                # Someone removes it under us (`docker rm -f`): its kill is not the job's.
                raise ContainerGone()
            stdout, stderr = await self._collect(container, attached, followers)
            exit_code = status.get("StatusCode", state.get("ExitCode"))
            if (
                stop_reason is StopReason.exited
                and (exit_code or 0) >= 128
                and not await self._engine_accepts_connections()
            ):
                # A stopping engine shuts its socket first, then signals the containers,
                # while connections already open still answer: the job did not fail by
                # itself, so say so.
                raise EngineUnreachable(
                    "Docker engine unreachable: it shut down while the job ran and stopped "
                    f"its container (exit code {exit_code})"
                )
            run = ContainerRun(
                stop_reason=stop_reason,
                exit_code=None if stop_reason is not StopReason.exited else exit_code,
                oom_killed=bool(state.get("OOMKilled")),
                stdout=stdout.text,
                stderr=stderr.text,
                output_truncated=stdout.truncated or stderr.truncated,
                limits=self._applied_limits(info, spec),
                resources=resource_report(
                    info, sampler, await self._image_digest(info.get("Image"))
                ),
            )
            return run
        except DockerError as exc:
            if await self._is_gone(container, exc):
                raise ContainerGone() from exc
            raise
        finally:
            if (writer := self._stdin_writers.pop(container.id, None)) is not None:
                tasks.append(writer)
            for task in tasks:
                task.cancel()
            if detach.is_set():
                await asyncio.gather(*tasks, return_exceptions=True)
            elif run is not None and self._defer_removal:
                run.removal = asyncio.create_task(
                    self._cleanup(container, tasks), name=f"remove-{container.id[:12]}"
                )
            else:
                await finish_despite_cancel(self._cleanup(container, tasks))

    async def _start(self, container: DockerContainer, stdin: str | None) -> None:
        """Start a container; a job's stdin is attached first, then written beside it.

        The writer is never waited for (a program may exit without reading its input):
        _supervise cancels it when the container's run ends.
        """
        if not stdin:
            await self._call(container.start())
            return
        stream = await self._call(attach_stdin(container))
        try:
            await self._call(container.start())
        except BaseException:
            await stream.close()
            raise
        self._stdin_writers[container.id] = asyncio.create_task(
            write_stdin(stream, stdin.encode(), container.id), name="stdin"
        )

    async def _image_digest(self, image_id: str | None) -> str | None:
        """The image's first registry digest, asked of the engine once per image id.

        An image id names its content, so what is found (a digest, or that there is none)
        is kept; a failed look-up is not.
        """
        if not image_id:
            return None
        if image_id in self._digests:
            return self._digests[image_id]
        try:
            image = await self._call(self._docker.images.inspect(image_id))
        except (DockerError, TimeoutError, aiohttp.ClientError, OSError) as exc:
            logger.debug("no digest for image %s: %r", image_id, exc)
            return None
        digest = digest_of(image)
        if len(self._digests) >= DIGEST_CACHE_SIZE:
            del self._digests[next(iter(self._digests))]
        self._digests[image_id] = digest
        return digest

    async def _is_gone(self, container: DockerContainer, error: DockerError) -> bool:
        """Whether an engine error means someone removed the container under us."""
        if error.status == 404:
            return True
        if error.status != 409:
            return False
        # 409 "dead or marked for removal": look again to tell that from other conflicts.
        try:
            state = (await self._call(container.show()))["State"]
        except DockerError as again:
            return again.status == 404
        return bool(state.get("Dead") or state.get("RemovalInProgress"))

    async def _cleanup(self, container: DockerContainer, tasks: list[asyncio.Task[Any]]) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.remove_container(container.id)

    async def _call(self, call: Awaitable[T]) -> T:
        """A short engine call, with a deadline aiodocker does not set by itself."""
        async with asyncio.timeout(self._settings.engine_call_timeout_seconds):
            return await call

    async def _pull(self, image: str) -> None:
        logger.info("pulling image %s", image)
        try:
            async with asyncio.timeout(self._settings.pull_timeout_seconds):
                await self._docker.images.pull(image)
        except DockerError as exc:
            raise ImageNotFound(
                f"image {image!r} is not on the Docker engine and could not be pulled: "
                f"{exc.message}"
            ) from exc
        except TimeoutError as exc:
            raise ImageNotFound(
                f"image {image!r} could not be pulled within "
                f"{self._settings.pull_timeout_seconds:g} s"
            ) from exc

    def _container_config(self, spec: JobSpec) -> dict[str, Any]:
        settings = self._settings
        memory = spec.memory_mb * MIB
        fsize = settings.ulimit_fsize_mb * MIB
        nofile = settings.ulimit_nofile
        config: dict[str, Any] = {
            "Image": spec.image,
            "Env": [f"{name}={value}" for name, value in spec.env.items()],
            "Labels": {
                LABEL_JOB_ID: str(spec.job_id),
                LABEL_ATTEMPT: str(spec.attempt),
                LABEL_WORKER: self._worker_id,
                LABEL_INSTANCE: self._instance_id,
            },
            "Tty": False,
            "OpenStdin": False,
            "AttachStdin": False,
            "NetworkDisabled": True,
            "HostConfig": {
                "CpuShares": spec.cpu_shares,
                "Memory": memory,
                # Equal to Memory: no swap on top of the limit.
                "MemorySwap": memory,
                "PidsLimit": settings.pids_limit,
                "NetworkMode": "none",
                "CapDrop": ["ALL"],
                "SecurityOpt": ["no-new-privileges"],
                # An init reaps zombies that would otherwise use up the pids limit.
                "Init": True,
                "Privileged": False,
                # A hard CPU cap, beside the relative CpuShares.
                "NanoCpus": round((spec.cpus or settings.default_cpus) * 1e9),
                "ReadonlyRootfs": settings.read_only_rootfs,
                "Tmpfs": {"/tmp": tmpfs_options(settings)},
                "Ulimits": [
                    {"Name": "nofile", "Soft": nofile, "Hard": nofile},
                    {"Name": "fsize", "Soft": fsize, "Hard": fsize},
                ],
                # Private namespaces, named where the engine has a daemon-wide default; no
                # Binds, Mounts, Devices, CapAdd, PidMode, UsernsMode or UTSMode is ever set,
                # and Docker's default ReadonlyPaths/MaskedPaths (/proc/kcore, ...) stay.
                "IpcMode": "private",
                # On cgroup v1 Docker 20.10 would share the host's cgroup namespace.
                "CgroupnsMode": "private",
                # Removed explicitly once output and exit status are read.
                "AutoRemove": False,
                "LogConfig": {
                    "Type": "json-file",
                    "Config": {"max-size": str(settings.engine_log_max_bytes), "max-file": "1"},
                },
            },
        }
        if spec.stdin:
            config.update(STDIN_CONFIG)
        if spec.command is not None:
            config["Cmd"] = spec.command
        if spec.working_dir is not None:
            config["WorkingDir"] = spec.working_dir
        if not settings.allow_image_user:
            config["User"] = settings.job_user
        return config

    async def _create(self, spec: JobSpec, config: dict[str, Any] | None = None) -> DockerContainer:
        name = f"jobdock-{spec.job_id}-{spec.attempt}"
        if config is None:
            config = self._container_config(spec)
        try:
            return await self._create_or_pull(config, name)
        except DockerError as exc:
            if exc.status != 409:
                raise
        # A container of this very attempt is left over from a crash: it never ran to a
        # recorded result, so replace it.
        logger.warning("replacing leftover container %s", name)
        await self.remove_container(name)
        return await self._create_or_pull(config, name)

    async def _create_or_pull(self, config: dict[str, Any], name: str) -> DockerContainer:
        """Create the container; if the engine lacks its image (404), pull it and retry.

        The image is not looked up first: when it is there, which is nearly always, that
        would be one more engine call for every job.
        """
        try:
            return await self._call(self._docker.containers.create(config, name=name))
        except DockerError as exc:
            if exc.status != 404:
                raise
        await self._pull(config["Image"])
        return await self._call(self._docker.containers.create(config, name=name))

    def _applied_limits(self, info: dict[str, Any], spec: JobSpec) -> AppliedLimits:
        """The limits the engine applied, read from the container's inspect."""
        host = info["HostConfig"]
        return AppliedLimits(
            cpu_shares=host["CpuShares"],
            memory_bytes=host["Memory"],
            memory_swap_bytes=host["MemorySwap"],
            pids_limit=host.get("PidsLimit") or 0,
            timeout_seconds=spec.timeout_seconds,
            output_limit_bytes=self._settings.output_limit_bytes,
            network_mode=host["NetworkMode"],
            nano_cpus=host.get("NanoCpus") or 0,
            read_only_rootfs=bool(host.get("ReadonlyRootfs")),
            user=info["Config"].get("User") or "",
        )

    async def _wait(
        self,
        container: DockerContainer,
        timeout: float,
        cancel: asyncio.Event,
        tasks: list[asyncio.Task[Any]],
    ) -> tuple[StopReason, dict[str, Any]]:
        exited = asyncio.create_task(container.wait(), name="wait")
        cancelled = asyncio.create_task(cancel.wait(), name="cancel")
        tasks.extend((exited, cancelled))
        await asyncio.wait(
            (exited, cancelled), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if exited.done():
            return StopReason.exited, exited.result()
        reason = StopReason.cancelled if cancelled.done() else StopReason.timed_out
        await self._kill(container)
        async with asyncio.timeout(self._settings.engine_call_timeout_seconds):
            status = await exited
        return reason, status

    async def _kill(self, container: DockerContainer) -> None:
        try:
            await self._call(container.kill())
        except DockerError as exc:
            # 409: it stopped by itself meanwhile; 404: it is gone already.
            if exc.status not in (404, 409):
                raise

    async def _collect(
        self,
        container: DockerContainer,
        attached: "asyncio.Task[Outputs] | None",
        followers: list["asyncio.Task[OutputCapture]"],
    ) -> Outputs:
        """The output of a container that has stopped, once its readers are done.

        An attach stream ends when the container's stdio closes, so it has everything;
        should it not end within LOG_DRAIN_SECONDS, or fail, the stored logs are read.
        """
        if attached is not None:
            await asyncio.wait([attached], timeout=LOG_DRAIN_SECONDS)
            if not attached.done():
                failure: object = "it did not end"
            elif attached.cancelled():
                failure = "it was cancelled"
            elif (failure := attached.exception()) is None:
                return attached.result()
            logger.warning(
                "output of container %s: attach stream failed (%s), reading its logs",
                container.id,
                failure,
            )
            attached.cancel()
            stdout, stderr = [await self._complete(container, stream, None) for stream in STREAMS]
            return stdout, stderr
        done, _ = await asyncio.wait(followers, timeout=LOG_DRAIN_SECONDS)
        stdout, stderr = [
            await self._complete(container, stream, task.result() if task in done else None)
            for stream, task in zip(STREAMS, followers, strict=True)
        ]
        return stdout, stderr

    async def _read_attached(self, stream: AttachStream, on_output: OnOutput | None) -> Outputs:
        """Read an attach stream of stdout and stderr to its end; store only up to the cap.

        Each stream is decoded apart, incrementally: a character may be split across
        frames. Past the cap the rest is read and dropped (see `_capture`).
        """
        captures = {name: OutputCapture(self._settings.output_limit_bytes) for name in STREAMS}
        decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in STREAMS
        }
        try:
            while (message := await stream.read_out()) is not None:
                name = ATTACH_STREAMS.get(message.stream)
                if name is None or captures[name].truncated:
                    continue
                self._keep(captures[name], name, decoders[name].decode(message.data), on_output)
            for name in STREAMS:
                if not captures[name].truncated:
                    self._keep(captures[name], name, decoders[name].decode(b"", True), on_output)
        finally:
            await stream.close()
        return captures["stdout"], captures["stderr"]

    @staticmethod
    def _keep(
        capture: OutputCapture, stream: Stream, text: str, on_output: OnOutput | None
    ) -> None:
        """Store a piece of output, and pass on what was kept."""
        if not text or capture.truncated:
            return
        kept = len(capture.parts)
        capture.feed(text)
        if on_output is not None:
            for part in capture.parts[kept:]:
                on_output(stream, part)

    async def _complete(
        self, container: DockerContainer, stream: Stream, followed: OutputCapture | None
    ) -> OutputCapture:
        """What the follower saw, unless the engine stored more.

        Docker's follow stream can miss the last unterminated line a container writes as it
        exits (seen on Docker 20.10 with json-file). Once the container has stopped, the
        same call streams what the engine stored and ends, so a stream that did not reach
        the cap is read once more and the longer reading wins.
        """
        if followed is not None and followed.truncated:
            return followed
        stored = await self._capture(container, stream)
        if followed is None or stored.size > followed.size:
            return stored
        return followed

    async def _capture(
        self, container: DockerContainer, stream: Stream, on_output: OnOutput | None = None
    ) -> OutputCapture:
        """Read one stream to its end as it is written; store only up to the cap.

        Past the cap the rest is read and dropped: leaving the stream early would leak
        its connection (aiodocker never releases the response of an abandoned log
        stream), and after enough truncated jobs the connection pool runs dry.
        """
        capture = OutputCapture(self._settings.output_limit_bytes)
        chunks = cast(
            AsyncGenerator[str, None],
            container.log(follow=True, stdout=stream == "stdout", stderr=stream == "stderr"),
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if not capture.truncated:
                    kept = len(capture.parts)
                    capture.feed(chunk)
                    if on_output is not None:
                        for part in capture.parts[kept:]:
                            on_output(stream, part)
        return capture

    async def remove_container(self, container_id: str) -> None:
        """Remove a container, killing it first if needed; absent is fine."""
        try:
            await self._call(self._docker.containers.container(container_id).delete(force=True))
        except DockerError as exc:
            # 409 "removal already in progress": another removal (ours) is on it.
            if exc.status != 404 and not (exc.status == 409 and "in progress" in exc.message):
                logger.warning("could not remove container %s: %s", container_id, exc.message)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.warning("could not remove container %s: %r", container_id, exc)

    async def list_job_containers(self) -> list[LabelledContainer]:
        """Every container on this engine that carries Jobdock's labels."""
        with self._engine_errors():
            listed = await self._call(
                self._docker.containers.list(
                    all=True, filters=json.dumps({"label": [LABEL_JOB_ID]})
                )
            )
        found = []
        for container in listed:
            labels = container["Labels"] or {}
            try:
                found.append(
                    LabelledContainer(
                        container_id=container.id,
                        job_id=uuid.UUID(labels[LABEL_JOB_ID]),
                        attempt=int(labels.get(LABEL_ATTEMPT, "0")),
                        worker_id=labels.get(LABEL_WORKER, ""),
                        instance=labels.get(LABEL_INSTANCE, ""),
                        created=float(container["Created"]),
                    )
                )
            except (KeyError, ValueError):
                continue
        return found
