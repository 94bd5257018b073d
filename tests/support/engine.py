"""A second, private Docker engine owned by one test: it can be stopped and started at will.

The machine's own engine is never touched. The private one gets its own socket, data root,
exec root (and so its own managed containerd), pid file and an empty daemon config, all in
one short temporary directory (unix socket paths must stay under ~100 characters), and
no network but loopback for its containers, like the main engine.

Starting a dockerd needs root: `unavailable()` says why a test cannot have one.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import psutil

from app.worker.runner import LABEL_JOB_ID
from tests.support.images import BUSYBOX, ensure_test_image

DOCKERD = "dockerd"
# Containers still running when the engine stops get this long before they are killed.
SHUTDOWN_TIMEOUT_SECONDS = 1


@dataclass(frozen=True)
class EngineContainer:
    id: str
    state: str
    labels: dict[str, str]


def unavailable() -> str | None:
    """Why no private engine can be started here, or None if one can."""
    if os.geteuid() != 0:
        return "starting a private Docker engine (dockerd) needs root"
    if shutil.which(DOCKERD) is None:
        return "dockerd is not installed (Debian package docker.io)"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (Debian package busybox-static): no test image"
    return None


def _unescape_mount_point(raw: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    for code in ("040", "011", "012", "134"):
        raw = raw.replace(f"\\{code}", chr(int(code, 8)))
    return raw


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    mounts = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = _unescape_mount_point(line.split()[4])
            if point.startswith(prefix) or point == str(root):
                mounts.append(point)
    return mounts


class PrivateEngine:
    """A dockerd of its own in a temporary directory; `close()` removes every trace."""

    def __init__(self, *, log_dir: Path | None = None) -> None:
        # Short on purpose: the sockets of dockerd and its containerd live under it.
        self.root = Path(tempfile.mkdtemp(prefix="jd-engine-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.data_root = self.root / "data"
        self.exec_root = self.root / "exec"
        self.pidfile = self.root / "docker.pid"
        self.config_file = self.root / "daemon.json"
        self.config_file.write_text("{}\n")
        self.log_path = (log_dir or self.root) / f"dockerd-{self.root.name}.log"
        self.docker_host = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self.image: str | None = None

    def command(self) -> list[str]:
        return [
            DOCKERD,
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
            "--host",
            self.docker_host,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "--pidfile",
            str(self.pidfile),
            "--config-file",
            str(self.config_file),
            "--shutdown-timeout",
            str(SHUTDOWN_TIMEOUT_SECONDS),
        ]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> aiodocker.Docker:
        """A new client of this engine; the caller closes it."""
        return aiodocker.Docker(url=self.docker_host)

    async def start(self, timeout: float = 60.0) -> None:
        """Start dockerd (again, on the same data root) and wait until it answers."""
        if self.running:
            raise RuntimeError("the private engine is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        async with self.client() as docker:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"dockerd exited at start:\n{self.log()[-4000:]}")
                try:
                    await docker.version()
                    break
                except (aiodocker.DockerError, OSError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"dockerd did not answer within {timeout} s:\n{self.log()[-4000:]}"
                        ) from None
                    await asyncio.sleep(0.05)
            if self.image is None:
                self.image = await ensure_test_image(docker)

    async def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM dockerd and wait for it (and its containerd); SIGKILL only if it hangs.

        Like `systemctl stop docker`: running containers are stopped (SIGTERM, then SIGKILL
        after SHUTDOWN_TIMEOUT_SECONDS) and stay on the data root, stopped.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                break
            await asyncio.sleep(0.05)
        await self._kill_leftovers(timeout=10.0)

    def _leftovers(self) -> list[psutil.Process]:
        """Processes of this engine still alive: its containerd, shims, container inits.

        Found by their command line naming this engine's own temporary directory, which
        nothing but this engine's processes can name.
        """
        found = []
        marker = str(self.root)
        for process in psutil.process_iter(["cmdline"]):
            cmdline: Iterable[str] = process.info.get("cmdline") or ()
            if process.pid != os.getpid() and any(marker in part for part in cmdline):
                found.append(process)
        return found

    async def _kill_leftovers(self, timeout: float) -> None:
        """Wait for this engine's processes to end by themselves; kill those that hang."""
        deadline = time.monotonic() + timeout
        while (leftovers := self._leftovers()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for process in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

    async def close(self) -> None:
        """Stop the engine and remove its directory, mounts included; safe to call twice."""
        try:
            await self.stop()
        finally:
            for point in sorted(_mounts_under(self.root), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
            shutil.rmtree(self.root, ignore_errors=True)

    async def job_containers(self) -> list[EngineContainer]:
        """Every container on this engine that carries Jobdock's job label, in any state."""
        async with self.client() as docker:
            listed = await docker.containers.list(
                all=True, filters=json.dumps({"label": [LABEL_JOB_ID]})
            )
        return [
            EngineContainer(id=c.id, state=str(c["State"]), labels=dict(c["Labels"] or {}))
            for c in listed
        ]

    async def remove_container(self, container_id: str) -> None:
        """Remove a container of this engine, killing it first; absent is fine."""
        async with self.client() as docker:
            try:
                await docker.containers.container(container_id).delete(force=True)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise

    async def __aenter__(self) -> "PrivateEngine":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
