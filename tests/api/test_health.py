"""/healthz and /readyz against a real process: database, schema and engine checks."""

from pathlib import Path

from app.api.health import head_revision
from app.db import create_engine, migrate
from tests.support.service import Service


async def test_ready_when_database_schema_and_engine_answer(tmp_path: Path) -> None:
    async with Service(tmp_path, workers=1) as svc:
        response = await svc.client.get("/readyz")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "status": "ready",
            "checks": {"database": "ok", "migrations": f"ok: at {head_revision()}", "engine": "ok"},
        }


async def test_an_api_only_node_needs_no_engine(tmp_path: Path) -> None:
    async with Service(tmp_path, command=("serve", "--no-workers")) as svc:
        checks = (await svc.client.get("/readyz")).json()["checks"]
        assert checks["engine"] == "skipped: this process runs no workers"


async def test_not_ready_without_the_docker_engine(tmp_path: Path) -> None:
    async with Service(tmp_path, workers=1, docker_host=f"unix://{tmp_path}/no-engine.sock") as svc:
        response = await svc.client.get("/readyz")
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "not ready"
        assert body["checks"]["engine"] == "the Docker engine does not answer"
        assert body["checks"]["database"] == "ok"
        # Liveness is another matter: the process is up.
        assert (await svc.client.get("/healthz")).status_code == 200


async def test_not_ready_while_the_schema_is_behind_the_code(tmp_path: Path) -> None:
    async with Service(tmp_path, command=("serve", "--no-workers")) as svc:
        engine = create_engine(svc.env["JOBDOCK_DATABASE_URL"])
        try:
            await migrate(engine, "downgrade", "-1")
            response = await svc.client.get("/readyz")
            assert response.status_code == 503, response.text
            migrations = response.json()["checks"]["migrations"]
            assert migrations.startswith("the schema is at "), migrations
            assert f"the code needs {head_revision()}: run `jobdock migrate`" in migrations
            await migrate(engine, "upgrade", "head")
            assert (await svc.client.get("/readyz")).status_code == 200
        finally:
            await engine.dispose()
