"""API keys, tenants and quotas, through HTTP against real `jobdock serve` processes.

Keys are made with the real `jobdock keys` command on the service's database.
"""

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.auth import exposure_warning, is_loopback, warn_if_exposed
from app.db import create_engine, create_session_factory
from tests.support.databases import database_url_for
from tests.support.service import Service

JsonBody = dict[str, Any]


def jobdock(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real `jobdock` command, on the given database."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        env={**os.environ, "JOBDOCK_DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def create_key(database_url: str, name: str, *options: str) -> str:
    made = jobdock(database_url, "keys", "create", name, *options)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("jdk_") and len(key) > 40, made.stdout
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert isinstance(answer.json()["detail"], str)


async def test_open_without_keys_then_closed_once_a_key_exists(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=0) as svc:
        url = await database_url_for(tmp_path)
        # No key: open, as for local use; any Authorization header is ignored.
        assert (await svc.client.get("/jobs")).status_code == 200
        assert (await svc.client.get("/jobs", headers=bearer("jdk_nothing"))).status_code == 200
        assert (await svc.client.post("/jobs", json={"image": test_image})).status_code == 202
        assert "SECURITY WARNING" not in svc.log()  # loopback: no warning

        key = create_key(url, "alice")
        # A key created while the service runs takes effect at once.
        assert_unauthorized(await svc.client.get("/jobs"))
        assert_unauthorized(await svc.client.get("/jobs", headers=bearer("jdk_wrong")))
        assert_unauthorized(await svc.client.get("/jobs", headers={"Authorization": key}))
        assert_unauthorized(
            await svc.client.get("/jobs", headers={"Authorization": f"Basic {key}"})
        )
        assert_unauthorized(await svc.client.post("/jobs", json={"image": test_image}))
        assert_unauthorized(await svc.client.get(f"/jobs/{'0' * 32}"))
        assert_unauthorized(await svc.client.get(f"/jobs/{'0' * 32}/logs"))
        assert (await svc.client.get("/healthz")).status_code == 200
        # Every other route (/readyz, /metrics, where they exist) stays open too.
        assert (await svc.client.get("/readyz")).status_code != 401
        assert (await svc.client.get("/jobs", headers=bearer(key))).status_code == 200

        assert jobdock(url, "keys", "revoke", "alice").returncode == 0
        # The only key revoked: no key is left, so the service is open again...
        assert (await svc.client.get("/jobs")).status_code == 200
        create_key(url, "bob")
        # ...until another exists; the revoked key is refused.
        assert_unauthorized(await svc.client.get("/jobs", headers=bearer(key)))


@dataclass
class Tenants:
    svc: Service
    database_url: str
    alice: str
    bob: str
    root: str
    limited: str


@pytest.fixture(scope="module")
async def tenants(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Tenants]:
    workdir = tmp_path_factory.mktemp("auth")
    url = await database_url_for(workdir)
    keys = {
        "alice": create_key(url, "alice"),
        "bob": create_key(url, "bob"),
        "root": create_key(url, "root", "--admin"),
        "limited": create_key(url, "limited", "--max-queued", "1", "--max-running", "1"),
    }
    async with Service(workdir, workers=3) as svc:
        yield Tenants(svc=svc, database_url=url, **keys)


async def submit(t: Tenants, key: str, job: JsonBody, **headers: str) -> httpx.Response:
    return await t.svc.client.post("/jobs", json=job, headers={**bearer(key), **headers})


async def wait_for(t: Tenants, key: str, job_id: str, states: set[str]) -> JsonBody:
    deadline = time.monotonic() + 60
    while True:
        answer = await t.svc.client.get(f"/jobs/{job_id}", headers=bearer(key))
        assert answer.status_code == 200, answer.text
        job: JsonBody = answer.json()
        if job["state"] in states or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.1)


async def test_a_tenant_sees_only_its_own_jobs(tenants: Tenants, test_image: str) -> None:
    t, c = tenants, tenants.svc.client
    answer = await submit(t, t.alice, {"image": test_image, "command": ["echo", "from alice"]})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    running = await submit(t, t.alice, {"image": test_image, "command": ["sleep", "30"]})
    running_id = running.json()["id"]
    done = await wait_for(t, t.alice, job_id, {"succeeded"})
    assert done["stdout"] == "from alice\n"
    bob_job = (await submit(t, t.bob, {"image": test_image, "command": ["true"]})).json()["id"]

    bob = bearer(t.bob)
    # Another tenant's job does not exist for bob: 404, never 403.
    for answer in (
        await c.get(f"/jobs/{job_id}", headers=bob),
        await c.get(f"/jobs/{job_id}", params={"wait": "1"}, headers=bob),
        await c.get(f"/jobs/{job_id}/logs", headers=bob),
        await c.get(f"/jobs/{job_id}/logs", params={"follow": "true"}, headers=bob),
        await c.post(f"/jobs/{running_id}/cancel", headers=bob),
        await c.delete(f"/jobs/{job_id}", headers=bob),
    ):
        assert answer.status_code == 404, answer.text
        assert answer.json() == {"detail": f"no job has the id {answer.url.path.split('/')[2]}"}
    bob_list = {job["id"] for job in (await c.get("/jobs", headers=bob)).json()["items"]}
    assert bob_list == {bob_job}
    alice_list = {
        job["id"] for job in (await c.get("/jobs", headers=bearer(t.alice))).json()["items"]
    }
    assert {job_id, running_id} <= alice_list and bob_job not in alice_list

    # Alice still has it all.
    logs = await c.get(f"/jobs/{job_id}/logs", headers=bearer(t.alice))
    assert logs.status_code == 200 and logs.text == "from alice\n"
    # The admin sees every job, and may cancel and delete any.
    root = bearer(t.root)
    all_ids = {job["id"] for job in (await c.get("/jobs", headers=root)).json()["items"]}
    assert {job_id, running_id, bob_job} <= all_ids
    assert (await c.get(f"/jobs/{bob_job}", headers=root)).status_code == 200
    assert (await c.post(f"/jobs/{running_id}/cancel", headers=root)).status_code in (200, 202)
    assert (await wait_for(t, t.alice, running_id, {"cancelled"}))["state"] == "cancelled"
    assert (await c.delete(f"/jobs/{job_id}", headers=bearer(t.alice))).status_code == 204
    assert (await c.get(f"/jobs/{job_id}", headers=root)).status_code == 404


async def test_idempotency_keys_are_per_tenant(tenants: Tenants, test_image: str) -> None:
    t = tenants
    first = await submit(t, t.alice, {"image": test_image}, **{"Idempotency-Key": "same"})
    other = await submit(
        t, t.bob, {"image": test_image, "command": ["true"]}, **{"Idempotency-Key": "same"}
    )
    assert first.status_code == 202 and other.status_code == 202, other.text
    assert first.json()["id"] != other.json()["id"]
    again = await submit(t, t.alice, {"image": test_image}, **{"Idempotency-Key": "same"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


async def test_quotas_answer_429_and_limit_running_jobs(tenants: Tenants, test_image: str) -> None:
    t, c = tenants, tenants.svc.client
    sleeper = {"image": test_image, "command": ["sleep", "30"]}
    first = (await submit(t, t.limited, sleeper)).json()["id"]
    await wait_for(t, t.limited, first, {"running"})
    # max_running 1: the second waits in the queue although workers are free.
    second = await submit(t, t.limited, {"image": test_image, "command": ["echo", "2"]})
    assert second.status_code == 202, second.text
    second_id = second.json()["id"]
    await asyncio.sleep(1.5)
    assert (await c.get(f"/jobs/{second_id}", headers=bearer(t.limited))).json()[
        "state"
    ] == "queued"
    # max_queued 1: one more is refused with 429 and Retry-After, alone or in a batch.
    for answer in (
        await submit(t, t.limited, sleeper),
        await c.post("/jobs/batch", json={"jobs": [sleeper]}, headers=bearer(t.limited)),
    ):
        assert answer.status_code == 429, answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        assert "at most 1" in answer.json()["detail"]
    # Other tenants are not held up by this one's quota.
    free = (await submit(t, t.bob, {"image": test_image, "command": ["true"]})).json()["id"]
    assert (await wait_for(t, t.bob, free, {"succeeded"}))["state"] == "succeeded"

    assert (await c.post(f"/jobs/{first}/cancel", headers=bearer(t.limited))).status_code == 202
    ended = await wait_for(t, t.limited, first, {"cancelled"})
    started = await wait_for(t, t.limited, second_id, {"succeeded"})
    assert started["started_at"] >= ended["finished_at"]


async def test_keys_are_stored_hashed(tenants: Tenants) -> None:
    engine = create_engine(tenants.database_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT * FROM api_keys"))).all()
    finally:
        await engine.dispose()
    stored = " ".join(str(value) for row in rows for value in row)
    for key in (tenants.alice, tenants.bob, tenants.root, tenants.limited):
        assert key not in stored and key.removeprefix("jdk_") not in stored
        assert hashlib.sha256(key.encode()).hexdigest() in stored


async def test_keys_command_lists_and_revokes(tenants: Tenants) -> None:
    url = tenants.database_url
    listed = jobdock(url, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("alice", "bob", "root", "limited"):
        assert name in listed.stdout
    assert "jdk_" not in listed.stdout and "admin" in listed.stdout
    taken = jobdock(url, "keys", "create", "alice")
    assert taken.returncode == 1 and "already exists" in taken.stderr
    assert jobdock(url, "keys", "revoke", "nobody").returncode == 1

    key = create_key(url, "short-lived")
    assert (await tenants.svc.client.get("/jobs", headers=bearer(key))).status_code == 200
    revoked = jobdock(url, "keys", "revoke", "short-lived")
    assert revoked.returncode == 0, revoked.stderr
    assert_unauthorized(await tenants.svc.client.get("/jobs", headers=bearer(key)))
    assert "short-lived" in jobdock(url, "keys", "list").stdout


async def test_client_commands_send_the_api_key(tenants: Tenants, test_image: str) -> None:
    url = tenants.database_url
    base = ["--url", tenants.svc.url]
    refused = jobdock(url, "ls", *base)
    assert refused.returncode == 1 and "API key" in refused.stderr
    submitted = jobdock(
        url,
        "submit",
        test_image,
        *base,
        "--wait",
        "--",
        "echo",
        "cli",
        **{"JOBDOCK_API_KEY": tenants.bob},
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "cli" in submitted.stdout
    listed = jobdock(url, "ls", *base, "--api-key", tenants.bob)
    assert listed.returncode == 0, listed.stderr


@pytest.mark.parametrize(
    ("host", "exposed"),
    [
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("::1", False),
        ("[::1]", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.168.1.10", True),
        ("jobs.example.com", True),
    ],
)
def test_the_exposure_warning(host: str, exposed: bool) -> None:
    assert is_loopback(host) is not exposed
    warning = exposure_warning(host, keys_configured=False)
    assert (warning is not None) is exposed
    if warning is not None:
        assert "anyone who can reach this port can run containers" in warning
    assert exposure_warning(host, keys_configured=True) is None


async def test_warn_if_exposed_reads_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    url = await database_url_for(tmp_path)
    create_key(url, "someone")  # also migrates the database
    engine = create_engine(url)
    try:
        async with create_session_factory(engine)() as session:
            assert await warn_if_exposed(session, "0.0.0.0") is None
            await session.execute(text("UPDATE api_keys SET revoked_at = created_at"))
            await session.commit()
            assert await warn_if_exposed(session, "0.0.0.0") is not None
            assert await warn_if_exposed(session, "127.0.0.1") is None
    finally:
        await engine.dispose()
    assert "SECURITY WARNING" in capsys.readouterr().err
    assert any(r.levelname == "WARNING" and "SECURITY" in r.message for r in caplog.records)
