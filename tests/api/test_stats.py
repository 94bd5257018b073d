"""GET /stats against real `jobdock serve` processes: jobs by state as the caller may see
them, the workers busy on every node, and this process's slots."""

from pathlib import Path
from typing import Any

from tests.api.test_auth import assert_unauthorized, bearer, create_key
from tests.support.databases import database_url_for
from tests.support.service import Service

ZERO = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "timed_out": 0, "cancelled": 0}


async def stats(svc: Service, **kwargs: Any) -> dict[str, Any]:
    response = await svc.client.get("/stats", **kwargs)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_every_state_is_counted_even_when_none(tmp_path: Path) -> None:
    # No workers: every job stays queued, so the counts are exactly what the test made.
    async with Service(tmp_path, workers=0) as svc:
        assert await stats(svc) == {
            "jobs": ZERO,
            "workers": {"active": 0, "slots": None, "busy": None},
        }
        jobs = [await svc.submit(image="busybox", command=["echo", str(n)]) for n in range(3)]
        batch = await svc.client.post(
            "/jobs/batch", json={"jobs": [{"image": "busybox"}, {"image": "busybox"}]}
        )
        assert batch.status_code == 202, batch.text
        cancelled = await svc.client.post(f"/jobs/{jobs[0]['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert await stats(svc) == {
            "jobs": {**ZERO, "queued": 4, "cancelled": 1},
            "workers": {"active": 0, "slots": None, "busy": None},
        }


async def test_running_jobs_their_workers_and_this_process_slots(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=3) as svc:
        done = await svc.run(image=test_image, command=["true"])
        assert done["state"] == "succeeded"
        failed = await svc.run(image=test_image, command=["sh", "-c", "exit 3"])
        assert failed["state"] == "failed"
        sleepers = [await svc.submit(image=test_image, command=["sleep", "60"]) for _ in range(2)]
        for job in sleepers:
            await svc.wait(job["id"], states={"running"})
        assert await stats(svc) == {
            "jobs": {**ZERO, "running": 2, "succeeded": 1, "failed": 1},
            # One worker (this process's pool) holds both running jobs, in two of its slots.
            "workers": {"active": 1, "slots": 3, "busy": 2},
        }
        for job in sleepers:
            assert (await svc.client.post(f"/jobs/{job['id']}/cancel")).status_code == 202
        for job in sleepers:
            await svc.wait(job["id"])
        body = await stats(svc)
        assert body["jobs"] == {**ZERO, "succeeded": 1, "failed": 1, "cancelled": 2}
        assert body["workers"]["active"] == 0


async def test_an_api_only_node_counts_the_workers_of_other_processes(
    tmp_path: Path, test_image: str
) -> None:
    async with (
        Service(tmp_path, command=["serve", "--no-workers"]) as api,
        Service(tmp_path, command=["worker"], workers=2),
    ):
        job = await api.submit(image=test_image, command=["sleep", "60"])
        await api.wait(job["id"], states={"running"})
        assert await stats(api) == {
            "jobs": {**ZERO, "running": 1},
            "workers": {"active": 1, "slots": None, "busy": None},
        }
        assert (await api.client.post(f"/jobs/{job['id']}/cancel")).status_code == 202
        await api.wait(job["id"])


async def test_a_tenant_counts_only_its_own_jobs(tmp_path: Path) -> None:
    async with Service(tmp_path, workers=0) as svc:
        url = await database_url_for(tmp_path)
        admin = create_key(url, "admin", "--admin")
        alice = create_key(url, "alice")
        bob = create_key(url, "bob")
        assert_unauthorized(await svc.client.get("/stats"))
        assert_unauthorized(await svc.client.get("/stats", headers=bearer("jdk_wrong")))
        for key, count in ((alice, 2), (bob, 1)):
            for _ in range(count):
                answer = await svc.client.post(
                    "/jobs", json={"image": "busybox"}, headers=bearer(key)
                )
                assert answer.status_code == 202, answer.text
        assert (await stats(svc, headers=bearer(alice)))["jobs"] == {**ZERO, "queued": 2}
        assert (await stats(svc, headers=bearer(bob)))["jobs"] == {**ZERO, "queued": 1}
        assert (await stats(svc, headers=bearer(admin)))["jobs"] == {**ZERO, "queued": 3}
