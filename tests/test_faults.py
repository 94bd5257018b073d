"""Fault injection (issue 3): real `jobdock` processes, real engines, real faults.

The engine faults use a private dockerd that the test owns and may stop and start
(tests/support/engine.py); the machine's own engine is never stopped.
"""

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import httpx
import pytest
from aiodocker.exceptions import DockerError

from app.worker.runner import LABEL_ATTEMPT, LABEL_JOB_ID, LABEL_WORKER
from tests.conftest import containers_left, job_containers
from tests.support import engine as private
from tests.support.databases import server_url
from tests.support.engine import PrivateEngine
from tests.support.service import Service, job_ids

# uvicorn shuts down cleanly, then re-raises the signal it caught.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)
WAITING = {"queued", "running"}
# How long jobs are watched while the engine is down: many claim attempts and polls.
ENGINE_DOWN_SECONDS = 5.0
# Short leases, so that a dead worker's jobs are rescued within seconds.
FAST_LEASES: dict[str, Any] = {"lease_seconds": 3, "heartbeat_interval_seconds": 1}


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[PrivateEngine]:
    """A private Docker engine for this test only; stopped and removed whatever happens."""
    reason = private.unavailable()
    if reason is not None:
        pytest.skip(reason)
    async with PrivateEngine(log_dir=tmp_path) as started:
        yield started


@pytest.fixture
async def main_engine_jobs(docker: aiodocker.Docker) -> AsyncIterator[set[uuid.UUID]]:
    """Job ids whose containers on the main engine are removed after the test, if any remain."""
    ids: set[uuid.UUID] = set()
    yield ids
    for container_id in await job_containers(docker, ids):
        with contextlib.suppress(DockerError):
            await docker.containers.container(container_id).delete(force=True)


class ApiProbe:
    """Asks an API node for /healthz and /jobs over and over, and keeps every bad answer."""

    def __init__(self, service: Service, interval: float = 0.2) -> None:
        self.service = service
        self.interval = interval
        self.answers = 0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        while True:
            for path in ("/healthz", "/jobs?limit=5"):
                try:
                    response = await self.service.client.get(path, timeout=10.0)
                except httpx.HTTPError as exc:
                    self.failures.append(f"GET {path}: {exc!r}")
                    continue
                if response.status_code == 200:
                    self.answers += 1
                else:
                    self.failures.append(f"GET {path}: {response.status_code} {response.text}")
            await asyncio.sleep(self.interval)

    def assert_always_answered(self) -> None:
        assert self.failures == [], f"the API stopped answering: {self.failures[:5]}"
        assert self.answers > 0

    async def __aenter__(self) -> "ApiProbe":
        self._task = asyncio.create_task(self._probe())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class CreateEvents:
    """Records the engine's container `create` events, live, for the length of a block.

    Live, because the engine keeps only its last 256 events for `since` queries. The block
    ends with a marker container of its own: once its event arrives, every earlier one has.
    """

    def __init__(self, docker: aiodocker.Docker, image: str) -> None:
        self.docker = docker
        self.image = image
        self.events: list[dict[str, Any]] = []
        self._subscribed = asyncio.Event()
        self._seen: set[str] = set()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _record(self) -> None:
        filters = {"type": ["container"], "event": ["create"]}
        forever = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.docker._query(
            "events", params={"filters": json.dumps(filters)}, timeout=forever
        ) as response:
            self._subscribed.set()
            async for line in response.content:
                if line.strip():
                    event: dict[str, Any] = json.loads(line)
                    self.events.append(event)
                    self._seen.add(event["Actor"]["ID"])
                    self._arrived.set()

    async def _wait_for(self, container_id: str, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while container_id not in self._seen:
                assert self._task is not None and not self._task.done(), "the event stream ended"
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), timeout=1.0)

    def of_jobs(self, ids: set[uuid.UUID]) -> list[dict[str, str]]:
        """The labels of each create event of these jobs' containers."""
        wanted = {str(job_id) for job_id in ids}
        return [
            labels
            for event in self.events
            if (labels := event["Actor"]["Attributes"]).get(LABEL_JOB_ID) in wanted
        ]

    async def __aenter__(self) -> "CreateEvents":
        self._task = asyncio.create_task(self._record())
        subscribed = asyncio.create_task(self._subscribed.wait())
        await asyncio.wait([self._task, subscribed], return_when=asyncio.FIRST_COMPLETED)
        subscribed.cancel()
        if self._task.done():
            self._task.result()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        try:
            if exc_info[0] is None:
                marker = await self.docker.containers.create(
                    {"Image": self.image, "Cmd": ["true"], "NetworkDisabled": True},
                    name=f"jobdock-test-marker-{uuid.uuid4()}",
                )
                try:
                    await self._wait_for(marker.id)
                finally:
                    await marker.delete(force=True)
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def brief(job: dict[str, Any]) -> str:
    """What an assertion message needs of a job (pytest cuts long dicts short)."""
    keys = ("id", "state", "attempt", "exit_code", "error", "stdout", "stderr")
    return repr({key: job.get(key) for key in keys})


async def wait_until_done(api: Service, count: int, timeout: float) -> None:
    """Until no job is queued or running any more (bounded, for many jobs at once)."""
    deadline = time.monotonic() + timeout
    while True:
        pending = 0
        for state in WAITING:
            page = (await api.client.get("/jobs", params={"state": state, "limit": 100})).json()
            pending += len(page["items"])
        if pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{pending}+ of {count} jobs still pending after {timeout} s")
        await asyncio.sleep(0.5)


async def wait_for_containers(
    engine: PrivateEngine, ids: set[uuid.UUID], *, state: str = "running", timeout: float = 30.0
) -> list[private.EngineContainer]:
    """Until each of these jobs has a container in `state` on the private engine."""
    wanted = {str(job_id) for job_id in ids}
    deadline = time.monotonic() + timeout
    while True:
        found = [
            c
            for c in await engine.job_containers()
            if c.labels.get(LABEL_JOB_ID) in wanted and c.state == state
        ]
        if {c.labels[LABEL_JOB_ID] for c in found} == wanted:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {len(ids)} containers {state} after {timeout} s")
        await asyncio.sleep(0.1)


async def wait_until_removed(engine: PrivateEngine, ids: set[uuid.UUID], timeout: float) -> None:
    wanted = {str(job_id) for job_id in ids}
    deadline = time.monotonic() + timeout
    while left := [c for c in await engine.job_containers() if c.labels[LABEL_JOB_ID] in wanted]:
        if time.monotonic() > deadline:
            raise AssertionError(f"containers left behind on the engine: {left}")
        await asyncio.sleep(0.2)


# -- the Docker engine goes away ----------------------------------------------------------


async def test_engine_stopped_while_jobs_are_queued_they_wait_and_run_when_it_is_back(
    tmp_path: Path, engine: PrivateEngine
) -> None:
    async with Service(tmp_path, docker_host=engine.docker_host, workers=2, **FAST_LEASES) as svc:
        # The service runs its jobs on the private engine.
        before = await svc.run(image=engine.image, command=["echo", "engine up"])
        assert before["state"] == "succeeded", brief(before)

        async with ApiProbe(svc) as probe:
            await engine.stop()
            jobs = [
                await svc.submit(image=engine.image, command=["sh", "-c", f"echo waited {n}"])
                for n in range(3)
            ]
            # Bounded watch: while no engine answers, the jobs wait; none is given up on.
            deadline = time.monotonic() + ENGINE_DOWN_SECONDS
            while time.monotonic() < deadline:
                for job in jobs:
                    now = await svc.get(job["id"])
                    assert now["state"] in WAITING, f"ended, engine down: {brief(now)}"
                await asyncio.sleep(0.2)

            await engine.start()
            finished = [await svc.wait(job["id"], timeout=120) for job in jobs]
        probe.assert_always_answered()

        for n, job in enumerate(finished):
            assert job["state"] == "succeeded", brief(job)
            assert job["stdout"] == f"waited {n}\n"
            assert job["error"] is None
            assert job["attempt"] == 1, brief(job)
        await wait_until_removed(engine, job_ids(*finished), timeout=30)


async def test_engine_stopped_while_jobs_run_fails_them_naming_the_engine_or_retries(
    tmp_path: Path, engine: PrivateEngine
) -> None:
    async with Service(tmp_path, docker_host=engine.docker_host, workers=2, **FAST_LEASES) as svc:
        async with ApiProbe(svc) as probe:
            command = ["sh", "-c", "echo up; sleep 10; echo done"]
            once = await svc.submit(image=engine.image, command=command)
            twice = await svc.submit(image=engine.image, command=command, max_attempts=2)
            for job in (once, twice):
                await svc.wait(job["id"], states={"running"})
            await wait_for_containers(engine, job_ids(once, twice))

            await engine.stop()
            failed = await svc.wait(once["id"], timeout=60)
            assert failed["state"] == "failed", brief(failed)
            assert "Docker engine" in (failed["error"] or ""), brief(failed)

            # Back up: the job with an attempt left runs again; the stopped container of
            # the failed job is cleaned away; its terminal state never changes.
            await engine.start()
            retried = await svc.wait(twice["id"], timeout=120)
            await wait_until_removed(engine, job_ids(once, twice), timeout=30)
            assert await svc.get(once["id"]) == failed
            after = await svc.run(image=engine.image, command=["echo", "engine back"])
            assert after["state"] == "succeeded", brief(after)
            assert after["stdout"] == "engine back\n"
        probe.assert_always_answered()

    assert retried["state"] == "succeeded", brief(retried)
    assert retried["attempt"] == 2, brief(retried)
    assert retried["stdout"] == "up\ndone\n", brief(retried)
    [first] = retried["attempts"]
    assert first["attempt"] == 1 and first["state"] == "failed", first
    assert "Docker engine" in (first["error"] or ""), first


# -- several workers on one database -----------------------------------------------------


@pytest.mark.skipif(server_url() is None, reason="several worker nodes need PostgreSQL")
async def test_two_workers_run_200_jobs_each_exactly_once(
    tmp_path: Path,
    test_image: str,
    docker: aiodocker.Docker,
    main_engine_jobs: set[uuid.UUID],
) -> None:
    count = 200
    async with (
        Service(tmp_path, command=["serve", "--no-workers"]) as api,
        Service(tmp_path, command=["worker"], workers=4, worker_id="w1") as w1,
        Service(tmp_path, command=["worker"], workers=4, worker_id="w2") as w2,
        CreateEvents(docker, test_image) as events,
    ):
        submitted = await asyncio.gather(
            *(api.submit(image=test_image, command=["echo", f"job {n}"]) for n in range(count))
        )
        ids = job_ids(*submitted)
        main_engine_jobs.update(ids)
        assert len(ids) == count
        await wait_until_done(api, count, timeout=600)
        finished = [await api.get(job["id"]) for job in submitted]
        assert w1.process is not None and w1.process.poll() is None, w1.log()
        assert w2.process is not None and w2.process.poll() is None, w2.log()

    for n, job in enumerate(finished):
        assert job["state"] == "succeeded", brief(job)
        assert job["stdout"] == f"job {n}\n", brief(job)
        assert job["attempt"] == 1, brief(job)

    # Each job's container was created once, for attempt 1, and both workers took part.
    creates = events.of_jobs(ids)
    per_job = Counter(labels[LABEL_JOB_ID] for labels in creates)
    assert [job_id for job_id, n in per_job.items() if n != 1] == [], per_job.most_common(3)
    assert set(per_job) == {str(job_id) for job_id in ids}, f"{len(per_job)} of {count} created"
    assert {labels[LABEL_ATTEMPT] for labels in creates} == {"1"}
    per_worker = Counter(labels[LABEL_WORKER] for labels in creates)
    assert set(per_worker) == {"w1", "w2"}, per_worker
    assert await containers_left(docker, ids) == []


async def test_a_killed_workers_jobs_are_rescued_by_another_worker_after_its_lease(
    tmp_path: Path,
    engine: PrivateEngine,
    test_image: str,
    docker: aiodocker.Docker,
    main_engine_jobs: set[uuid.UUID],
) -> None:
    # The victim runs its jobs on the private engine; the survivor, on the main engine,
    # cannot see their containers, so it can only find the jobs by their expired leases.
    async with Service(tmp_path, command=["serve", "--no-workers"]) as api:
        victim = Service(
            tmp_path,
            command=["worker"],
            workers=3,
            worker_id="victim",
            docker_host=engine.docker_host,
            **FAST_LEASES,
        )
        async with victim:
            lost = [
                await api.submit(image=test_image, command=["sh", "-c", f"echo {n}; sleep 15"])
                for n in range(2)
            ]
            again = await api.submit(
                image=test_image, command=["sh", "-c", "echo 2; sleep 15"], max_attempts=2
            )
            jobs = [*lost, again]
            main_engine_jobs.update(job_ids(*jobs))
            for job in jobs:
                await api.wait(job["id"], states={"running"})
            containers = await wait_for_containers(engine, job_ids(*jobs))
            assert {c.labels[LABEL_WORKER] for c in containers} == {"victim"}
            await victim.stop(signal.SIGKILL)
        try:
            # Its containers outlive it, on an engine no other worker serves.
            await wait_for_containers(engine, job_ids(*jobs))
            for job in jobs:
                assert (await api.get(job["id"]))["state"] == "running"

            async with Service(
                tmp_path, command=["worker"], workers=2, worker_id="survivor", **FAST_LEASES
            ) as survivor:
                rescued = [await api.wait(job["id"], timeout=60) for job in lost]
                retried = await api.wait(again["id"], timeout=90)
            assert "survivor" in survivor.log()
        finally:
            for container in await engine.job_containers():
                await engine.remove_container(container.id)

    # Out of attempts: ended as lost. An attempt left: run again, by the survivor.
    for job in rescued:
        assert job["state"] == "failed", brief(job)
        assert "lost with its worker" in (job["error"] or ""), brief(job)
        assert job["exit_code"] is None, brief(job)
    assert retried["state"] == "succeeded", brief(retried)
    assert retried["attempt"] == 2, brief(retried)
    assert retried["stdout"] == "2\n", brief(retried)
    [first] = retried["attempts"]
    assert first["attempt"] == 1 and "lost with its worker" in (first["error"] or ""), first
    assert await containers_left(docker, job_ids(retried)) == []


# -- a graceful stop ----------------------------------------------------------------------


async def test_sigterm_claims_nothing_new_and_loses_no_running_job(
    tmp_path: Path,
    test_image: str,
    docker: aiodocker.Docker,
    main_engine_jobs: set[uuid.UUID],
) -> None:
    async with CreateEvents(docker, test_image) as events:
        async with Service(tmp_path, workers=2, shutdown_grace_seconds=1) as svc:
            running = [
                await svc.submit(
                    image=test_image, command=["sh", "-c", f"hostname; sleep 5; echo job {n}"]
                )
                for n in range(2)
            ]
            queued = await svc.submit(image=test_image, command=["echo", "after the restart"])
            main_engine_jobs.update(job_ids(*running, queued))
            for job in running:
                await svc.wait(job["id"], states={"running"})
            while len(containers := await job_containers(docker, job_ids(*running))) < 2:
                await asyncio.sleep(0.05)
            assert (await svc.get(queued["id"]))["state"] == "queued"
            assert await svc.stop(signal.SIGTERM, timeout=60) in STOPPED_BY_SIGTERM

        async with Service(tmp_path, workers=0) as idle:
            # No claim after SIGTERM; the running jobs ended in the grace or wait for a worker.
            left = await idle.get(queued["id"])
            assert left["state"] == "queued", brief(left)
            assert left["attempt"] == 0 and left["started_at"] is None, brief(left)
            for job in running:
                now = await idle.get(job["id"])
                assert now["state"] in {"running", "succeeded"}, f"lost at SIGTERM: {brief(now)}"

        async with Service(tmp_path, workers=2) as again:
            finished = [await again.wait(job["id"], timeout=60) for job in [*running, queued]]

    short_ids = {container[:12] for container in containers}
    for n, job in enumerate(finished[:2]):
        assert job["state"] == "succeeded", brief(job)
        assert job["attempt"] == 1, brief(job)
        hostname, output = job["stdout"].splitlines()
        # The container started before SIGTERM ran to its end: the job was not run again.
        assert hostname in short_ids, brief(job)
        assert output == f"job {n}"
    assert finished[2]["state"] == "succeeded", brief(finished[2])
    assert finished[2]["stdout"] == "after the restart\n"

    ids = job_ids(*finished)
    per_job = Counter(labels[LABEL_JOB_ID] for labels in events.of_jobs(ids))
    assert per_job == Counter({str(job_id): 1 for job_id in ids})
    assert await containers_left(docker, ids) == []
