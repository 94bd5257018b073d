"""Fixtures: the real Docker engine, the busybox test image, real SQLite files, a real service."""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import aiodocker
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import SessionFactory, create_engine, create_session_factory, upgrade_to_head
from app.settings import Settings
from app.worker.runner import LABEL_JOB_ID
from tests.support.databases import database_url_for, drop_created_databases
from tests.support.images import ensure_test_image
from tests.support.service import Service


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        await client.version()
    except Exception as exc:
        await client.close()
        pytest.fail(
            f"no Docker engine answers ({exc!r}); run `make engine` or `make test`, which start one"
        )
    yield client
    await client.close()


@pytest.fixture(scope="session")
async def test_image(docker: aiodocker.Docker) -> str:
    return await ensure_test_image(docker)


async def job_containers(docker: aiodocker.Docker, ids: Iterable[uuid.UUID]) -> list[str]:
    """Containers on the engine that carry the label of one of these jobs."""
    wanted = {str(i) for i in ids}
    listed = await docker.containers.list(all=True, filters=json.dumps({"label": [LABEL_JOB_ID]}))
    return [c.id for c in listed if (c["Labels"] or {}).get(LABEL_JOB_ID) in wanted]


async def containers_left(
    docker: aiodocker.Docker, ids: Iterable[uuid.UUID], within: float = 15.0
) -> list[str]:
    """The containers of these jobs still on the engine once `within` seconds have passed
    without all of them gone. A worker records a job's result before it removes the
    container, so the removal may end a moment after the job does."""
    ids = list(ids)
    deadline = asyncio.get_running_loop().time() + within
    while (left := await job_containers(docker, ids)) and (
        asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.05)
    return left


@pytest.fixture(scope="session", autouse=True)
async def _drop_test_databases() -> AsyncIterator[None]:
    yield
    await drop_created_databases()


@pytest.fixture
async def settings(tmp_path: Path) -> Settings:
    return Settings(
        database_url=await database_url_for(tmp_path),
        poll_interval_seconds=0.2,
        heartbeat_interval_seconds=0.5,
        lease_seconds=5.0,
    )


@pytest.fixture
async def db_engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url)
    await upgrade_to_head(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def session_factory(db_engine: AsyncEngine) -> SessionFactory:
    return create_session_factory(db_engine)


@pytest.fixture(scope="module")
async def service(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Service]:
    """One running service shared by a module's tests (SQLite file, 4 workers)."""
    async with Service(tmp_path_factory.mktemp("service"), workers=4, max_memory_mb=1024) as svc:
        yield svc
