"""A real `jobdock serve` process on loopback, for end-to-end tests."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.support.databases import database_url_for

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """Starts, stops and kills one Jobdock process; talks to it over HTTP.

    `command` is the `jobdock` command line: ("serve",) by default, ("serve", "--no-workers")
    for an API-only node, or ("worker",) for a worker without HTTP.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        command: Sequence[str] = ("serve",),
        api_key: str | None = None,
        **settings: Any,
    ) -> None:
        self.workdir = workdir
        self.command = list(command)
        self.serves_http = self.command[0] == "serve"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"service-{self.port}.log"
        self.settings = settings
        self.env = {
            **os.environ,
            "JOBDOCK_POLL_INTERVAL_SECONDS": "0.5",
            **{f"JOBDOCK_{name.upper()}": str(value) for name, value in settings.items()},
        }
        self.process: subprocess.Popen[bytes] | None = None
        # `api_key`: sent as `Authorization: Bearer` on every request of `client`.
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.client = httpx.AsyncClient(base_url=self.url, timeout=30.0, headers=headers)

    async def start(self, timeout: float = 30.0) -> None:
        if "database_url" not in self.settings:
            self.env["JOBDOCK_DATABASE_URL"] = await database_url_for(self.workdir)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", *self.command]
            + (["--port", str(self.port)] if self.serves_http else []),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jobdock exited at start:\n{self.log()}")
            if await self._ready():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"jobdock did not answer within {timeout} s:\n{self.log()}")

    async def _ready(self) -> bool:
        if not self.serves_http:
            return " ready (database " in self.log()
        try:
            return (await self.client.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"jobdock did not stop within {timeout} s")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def rss_bytes(self) -> int:
        assert self.process is not None
        rss: int = psutil.Process(self.process.pid).memory_info().rss
        return rss

    async def submit(self, **job: Any) -> dict[str, Any]:
        response = await self.client.post("/jobs", json=job)
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    async def get(self, job_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait(
        self,
        job_id: str,
        *,
        states: set[str] = TERMINAL,
        timeout: float = 120.0,
        poll_seconds: float = 0.1,
    ) -> dict[str, Any]:
        """Poll until the job reaches one of `states`; a bounded wait, not a timing check."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")
            await asyncio.sleep(poll_seconds)

    async def run(self, timeout: float = 120.0, **job: Any) -> dict[str, Any]:
        submitted = await self.submit(**job)
        return await self.wait(submitted["id"], timeout=timeout)

    async def __aenter__(self) -> "Service":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            await self.stop()
        await self.client.aclose()


def job_ids(*jobs: dict[str, Any]) -> set[uuid.UUID]:
    return {uuid.UUID(job["id"]) for job in jobs}
