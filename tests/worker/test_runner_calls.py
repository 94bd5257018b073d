"""How many Docker Engine API calls a job costs the runner, against the real engine.

A bare aiodocker loop makes five (create, start, wait, logs, delete). The runner's fresh
run of a trivial job makes six: create, attach (its output), start, wait, inspect (exit
status, OOM, wall time, image), delete. No image look-up before the create, no inspect
before the start, no log streams beside the attach, no stats stream for a job that is
over before it would be sampled, and the image's digest asked once per image.
"""

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiodocker
import pytest

from app.settings import Settings
from app.worker.runner import ContainerRunner, create_docker_client
from tests.worker.test_runner import RUN_DEADLINE, CreatedRecorder, Harness, runner_harness

MAX_CALLS = 6
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


class CountingClient:
    """A Docker client whose every request to the engine is written down."""

    def __init__(self) -> None:
        self.client = create_docker_client(Settings())
        self.calls: list[str] = []
        do_query = self.client._do_query

        # Every aiodocker request, hijacked attach streams included, goes through here.
        async def counted(path: Any, method: str, **kwargs: Any) -> Any:
            self.calls.append(f"{method} {CONTAINER_ID.sub('<id>', str(path))}")
            return await do_query(path, method, **kwargs)

        self.client._do_query = counted  # type: ignore[method-assign]


@pytest.fixture
async def counting(docker: aiodocker.Docker, test_image: str) -> AsyncIterator[CountingClient]:
    made = CountingClient()
    try:
        yield made
    finally:
        await made.client.close()


@pytest.fixture
async def harness(docker: aiodocker.Docker, test_image: str) -> AsyncIterator[Harness]:
    settings = Settings(engine_call_timeout_seconds=30.0)
    async with runner_harness(docker, test_image, settings, "test-calls") as made:
        yield made


async def test_a_trivial_job_makes_at_most_six_engine_calls(
    harness: Harness, counting: CountingClient
) -> None:
    runner = ContainerRunner(counting.client, harness.settings, harness.worker_id)
    job_id = uuid.uuid4()

    async def echo_hi(attempt: int) -> list[str]:
        counting.calls.clear()
        async with asyncio.timeout(RUN_DEADLINE):
            result = await runner.run(
                harness.spec("echo hi", job_id=job_id, attempt=attempt),
                cancel=asyncio.Event(),
                detach=asyncio.Event(),
                on_created=CreatedRecorder(harness.docker),
            )
        assert (result.exit_code, result.stdout, result.stderr) == (0, "hi\n", "")
        assert result.resources is not None and result.resources.image_id is not None
        return list(counting.calls)

    # The first run of a client asks for the engine's API version, and of a runner for
    # the image's digest: both once.
    await echo_hi(1)
    # A run on a busy machine may outlive the stats delay and open the stats stream:
    # the best of three counts.
    runs = []
    for attempt in range(2, 5):
        runs.append(await echo_hi(attempt))
        if len(runs[-1]) <= MAX_CALLS:
            break
    best = min(runs, key=len)
    assert len(best) <= MAX_CALLS, (
        f"a trivial job made {len(best)} engine calls (at most {MAX_CALLS} expected):\n"
        + "\n".join(best)
    )
    # The output came through the attach stream, made before the start.
    paths = [call.split("?")[0] for call in best]
    assert paths.index("POST containers/<id>/attach") < paths.index("POST containers/<id>/start")
