"""Waiting, idempotency keys, labels and filters, batches, deletion, retention and
backpressure, through HTTP against real `jobdock` processes."""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.service import Service

JsonBody = dict[str, Any]
pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
async def queue(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """No workers: jobs stay queued. A small queue cap and a short idempotency TTL."""
    async with Service(
        tmp_path_factory.mktemp("queue"),
        workers=0,
        max_queued=1000,
        idempotency_ttl=2,
        stdin_max_bytes=1024,
        wait_max_seconds=3,
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
async def runner(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Service]:
    """Runs jobs; its fallback re-read is slow, so a prompt answer to ?wait= proves the
    wake-up came from the job's end, not from polling. Finished jobs are purged after 3 s."""
    async with Service(
        tmp_path_factory.mktemp("runner"),
        workers=2,
        poll_interval_seconds=30,
        retention=3,
        lease_seconds=2,
        heartbeat_interval_seconds=0.5,
    ) as svc:
        yield svc


def job(command: str = "echo hi", **fields: Any) -> JsonBody:
    return {"image": "jobdock-test-busybox:latest", "command": ["sh", "-c", command], **fields}


# -- ?wait= ------------------------------------------------------------------------------


async def test_wait_answers_when_the_job_ends(runner: Service) -> None:
    submitted = await runner.submit(**job("sleep 1; echo done"))
    started = time.monotonic()
    response = await runner.client.get(f"/jobs/{submitted['id']}", params={"wait": 25})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "succeeded"
    assert body["stdout"] == "done\n"
    # The fallback re-read comes every 30 s: an answer well before the wait's end was woken.
    assert elapsed < 20, f"wait answered after {elapsed:.1f} s, not at the job's end"


async def test_wait_on_a_finished_job_answers_at_once(runner: Service) -> None:
    finished = await runner.run(**job())
    response = await runner.client.get(f"/jobs/{finished['id']}", params={"wait": 25})
    assert response.json()["state"] == "succeeded"


async def test_wait_gives_up_after_the_seconds_asked(queue: Service) -> None:
    submitted = await queue.submit(**job())
    started = time.monotonic()
    response = await queue.client.get(f"/jobs/{submitted['id']}", params={"wait": 1})
    assert time.monotonic() - started >= 1.0
    assert response.status_code == 200
    assert response.json()["state"] == "queued"


async def test_wait_is_capped_by_the_service(queue: Service) -> None:
    submitted = await queue.submit(**job())
    started = time.monotonic()
    response = await queue.client.get(f"/jobs/{submitted['id']}", params={"wait": 3600})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert 3.0 <= elapsed < 20.0, f"a wait capped at 3 s took {elapsed:.1f} s"


async def test_wait_ends_when_the_job_is_cancelled(queue: Service) -> None:
    submitted = await queue.submit(**job())

    async def cancel_soon() -> None:
        await asyncio.sleep(0.5)
        assert (await queue.client.post(f"/jobs/{submitted['id']}/cancel")).status_code == 200

    canceller = asyncio.create_task(cancel_soon())
    response = await queue.client.get(f"/jobs/{submitted['id']}", params={"wait": 3})
    await canceller
    assert response.json()["state"] == "cancelled"


@pytest.mark.parametrize("wait", ["-1", "soon", "nan", "100000"])
async def test_a_bad_wait_is_422(queue: Service, wait: str) -> None:
    submitted = await queue.submit(**job())
    response = await queue.client.get(f"/jobs/{submitted['id']}", params={"wait": wait})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "wait"]


async def test_wait_on_an_unknown_job_is_404(queue: Service) -> None:
    response = await queue.client.get(f"/jobs/{uuid.uuid4()}", params={"wait": 5})
    assert response.status_code == 404


# -- Idempotency-Key ---------------------------------------------------------------------


async def test_the_same_key_and_body_return_the_first_job(queue: Service) -> None:
    key = f"order-{uuid.uuid4()}"
    first = await queue.client.post("/jobs", json=job("echo 1"), headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    # The same job spelled differently (defaults given, keys reordered) is the same request.
    again = await queue.client.post(
        "/jobs",
        json={"priority": 0, **job("echo 1"), "env": {}},
        headers={"Idempotency-Key": key},
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    page = (await queue.client.get("/jobs", params={"label": f"key:{key}"})).json()
    assert page["items"] == []  # labels are not keys: nothing else was made under it


async def test_the_same_key_with_another_body_is_422(queue: Service) -> None:
    key = f"order-{uuid.uuid4()}"
    first = await queue.client.post("/jobs", json=job("echo 1"), headers={"Idempotency-Key": key})
    other = await queue.client.post("/jobs", json=job("echo 2"), headers={"Idempotency-Key": key})
    assert other.status_code == 422, other.text
    error = other.json()["detail"][0]
    assert error["loc"] == ["header", "Idempotency-Key"]
    assert "used for a different request" in error["msg"] and first.json()["id"] in error["msg"]


async def test_concurrent_requests_with_one_key_make_one_job(queue: Service) -> None:
    key = f"burst-{uuid.uuid4()}"
    responses = await asyncio.gather(
        *(
            queue.client.post("/jobs", json=job("echo 1"), headers={"Idempotency-Key": key})
            for _ in range(8)
        )
    )
    assert sorted(r.status_code for r in responses) == [200] * 7 + [202]
    assert len({r.json()["id"] for r in responses}) == 1


async def test_a_key_expires(queue: Service) -> None:
    key = f"old-{uuid.uuid4()}"
    first = await queue.client.post("/jobs", json=job(), headers={"Idempotency-Key": key})
    await asyncio.sleep(2.5)  # the service's TTL is 2 s
    second = await queue.client.post("/jobs", json=job(), headers={"Idempotency-Key": key})
    assert second.status_code == 202, second.text
    assert second.json()["id"] != first.json()["id"]
    # And the new job now owns the key.
    third = await queue.client.post("/jobs", json=job(), headers={"Idempotency-Key": key})
    assert third.json()["id"] == second.json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\tkey"])
async def test_a_malformed_key_is_422(queue: Service, key: str) -> None:
    response = await queue.client.post("/jobs", json=job(), headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


# -- labels and filters ------------------------------------------------------------------


async def test_labels_filter_the_list(queue: Service) -> None:
    run = uuid.uuid4().hex[:8]
    a = await queue.submit(**job(labels={"run": run, "team": "ml", "kind": "nightly"}))
    b = await queue.submit(**job(labels={"run": run, "team": "ml", "kind": "adhoc"}))
    c = await queue.submit(**job(labels={"run": run, "team": "web", "k.io/x": "a:b"}))
    assert a["labels"] == {"run": run, "team": "ml", "kind": "nightly"}

    async def ids(*labels: str, **params: Any) -> list[str]:
        response = await queue.client.get(
            "/jobs", params={"label": [f"run:{run}", *labels], **params}
        )
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert await ids() == [c["id"], b["id"], a["id"]]
    assert await ids("team:ml") == [b["id"], a["id"]]
    assert await ids("team:ml", "kind:nightly") == [a["id"]]
    assert await ids("k.io/x:a:b") == [c["id"]]  # the value may hold ":"
    assert await ids("team:nobody") == []
    assert await ids("team:ml", limit=1) == [b["id"]]


async def test_image_and_time_filters(queue: Service) -> None:
    image = f"jobdock-filter-{uuid.uuid4().hex[:8]}:1"
    first = await queue.submit(image=image)
    await asyncio.sleep(0.05)
    second = await queue.submit(image=image)
    listed = (await queue.client.get("/jobs", params={"image": image})).json()["items"]
    assert [item["id"] for item in listed] == [second["id"], first["id"]]
    after = (
        await queue.client.get(
            "/jobs", params={"image": image, "created_after": first["created_at"]}
        )
    ).json()["items"]
    assert [item["id"] for item in after] == [second["id"]]
    before = (
        await queue.client.get(
            "/jobs", params={"image": image, "created_before": second["created_at"]}
        )
    ).json()["items"]
    assert [item["id"] for item in before] == [first["id"]]
    future = (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None).isoformat()
    none = (
        await queue.client.get("/jobs", params={"image": image, "created_after": future})
    ).json()["items"]
    assert none == []


@pytest.mark.parametrize(
    "params",
    [
        {"label": "nocolon"},
        {"label": ":value"},
        {"label": "bad key:x"},
        {"label": ["team:a", "team:b"]},
        {"created_after": "yesterday"},
        {"image": "x" * 300},
        {"label": "' OR 1=1 --:x"},
    ],
)
async def test_bad_filters_are_422(queue: Service, params: dict[str, Any]) -> None:
    response = await queue.client.get("/jobs", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"]


async def test_sql_in_a_label_value_is_just_text(queue: Service) -> None:
    value = "x' OR '1'='1"
    submitted = await queue.submit(**job(labels={"q": value}))
    listed = (await queue.client.get("/jobs", params={"label": f"q:{value}"})).json()["items"]
    assert [item["id"] for item in listed] == [submitted["id"]]
    assert (await queue.client.get("/jobs", params={"label": "q:x"})).json()["items"] == []


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"bad key": "x"}, "label key 'bad key' is not valid"),
        ({"a:b": "x"}, "label key 'a:b' is not valid"),
        ({"": "x"}, "label key '' is not valid"),
        ({"k": "v" * 256}, "at most 255"),
        ({f"k{n}": "v" for n in range(33)}, "at most 32"),
        ({"k": 1}, "valid string"),
    ],
)
async def test_bad_labels_are_422(queue: Service, labels: Any, message: str) -> None:
    response = await queue.client.post("/jobs", json=job(labels=labels))
    assert response.status_code == 422, response.text
    assert message in str(response.json()["detail"])


# -- batch -------------------------------------------------------------------------------


async def test_a_batch_queues_every_job_in_order(queue: Service) -> None:
    run = uuid.uuid4().hex[:8]
    jobs = [job(f"echo {n}", labels={"batch": run}) for n in range(5)]
    response = await queue.client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 202, response.text
    items = response.json()["items"]
    assert [item["command"][-1] for item in items] == [f"echo {n}" for n in range(5)]
    assert all(item["state"] == "queued" for item in items)
    listed = (await queue.client.get("/jobs", params={"label": f"batch:{run}"})).json()["items"]
    assert {item["id"] for item in listed} == {item["id"] for item in items}


@pytest.mark.parametrize(
    ("bad", "loc", "message"),
    [
        ({"image": "Not An Image"}, ["body", "jobs", 2, "image"], "not a valid Docker image"),
        ({"image": "busybox", "memory_mb": 10**6}, ["body", "jobs", 2, "memory_mb"], "at most"),
        ({"image": "busybox", "colour": "red"}, ["body", "jobs", 2, "colour"], "unknown field"),
    ],
)
async def test_a_batch_with_one_bad_job_queues_none(
    queue: Service, bad: JsonBody, loc: list[Any], message: str
) -> None:
    run = uuid.uuid4().hex[:8]
    jobs = [job(labels={"batch": run}) for _ in range(4)]
    jobs[2] = {**bad, "labels": {"batch": run}}
    response = await queue.client.post("/jobs/batch", json={"jobs": jobs})
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == loc
    assert message in error["msg"]
    listed = (await queue.client.get("/jobs", params={"label": f"batch:{run}"})).json()["items"]
    assert listed == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"jobs": []}, "at least 1"),
        ({"jobs": [job()] * 101}, "at most 100"),
        ({}, "Field required"),
        ({"jobs": [job()], "extra": 1}, "a batch has only the field 'jobs'"),
        ([job()], "valid dictionary"),
    ],
)
async def test_a_malformed_batch_is_422(queue: Service, body: Any, message: str) -> None:
    response = await queue.client.post("/jobs/batch", json=body)
    assert response.status_code == 422, response.text
    assert message in str(response.json()["detail"])


# -- DELETE and retention ----------------------------------------------------------------


async def test_delete_removes_a_finished_job_only(queue: Service) -> None:
    submitted = await queue.submit(**job())
    url = f"/jobs/{submitted['id']}"
    refused = await queue.client.delete(url)
    assert refused.status_code == 409, refused.text
    assert "cancel it" in refused.json()["detail"]
    assert (await queue.get(submitted["id"]))["state"] == "queued"
    assert (await queue.client.post(f"{url}/cancel")).status_code == 200
    deleted = await queue.client.delete(url)
    assert deleted.status_code == 204 and deleted.content == b""
    assert (await queue.client.get(url)).status_code == 404
    assert (await queue.client.delete(url)).status_code == 404
    assert (await queue.client.delete("/jobs/not-a-uuid")).status_code == 404


async def test_delete_removes_the_logs(runner: Service) -> None:
    finished = await runner.run(**job("echo some output"))
    assert finished["stdout"] == "some output\n"
    assert (await runner.client.delete(f"/jobs/{finished['id']}")).status_code == 204
    logs = await runner.client.get(f"/jobs/{finished['id']}/logs")
    assert logs.status_code == 404


async def test_finished_jobs_are_purged_after_the_retention(runner: Service) -> None:
    finished = await runner.run(**job())
    deadline = time.monotonic() + 60
    while (await runner.client.get(f"/jobs/{finished['id']}")).status_code != 404:
        assert time.monotonic() < deadline, "a job finished 60 s ago was not purged (retention 3 s)"
        await asyncio.sleep(0.5)


# -- backpressure and caps ---------------------------------------------------------------


async def test_a_full_queue_answers_503_with_retry_after(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    async with Service(tmp_path_factory.mktemp("full"), workers=0, max_queued=3) as svc:
        queued = [await svc.submit(**job()) for _ in range(3)]
        full = await svc.client.post("/jobs", json=job())
        assert full.status_code == 503, full.text
        assert full.headers["Retry-After"] == "5"
        assert "the queue is full" in full.json()["detail"]
        assert (await svc.client.post("/jobs/batch", json={"jobs": [job()]})).status_code == 503
        assert (await svc.client.post(f"/jobs/{queued[0]['id']}/cancel")).status_code == 200
        # One slot is free again: a single job fits, a batch of two does not.
        two = await svc.client.post("/jobs/batch", json={"jobs": [job(), job()]})
        assert two.status_code == 503
        assert (await svc.client.post("/jobs", json=job())).status_code == 202
        listed = (await svc.client.get("/jobs", params={"state": "queued"})).json()["items"]
        assert len(listed) == 3


async def test_stdin_beyond_the_cap_is_422(queue: Service) -> None:
    response = await queue.client.post("/jobs", json=job("cat", stdin="x" * 1025))
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "stdin"]
    assert "at most 1024 bytes" in error["msg"]
    assert len(response.content) < 2000  # the 422 does not echo the whole input back


async def test_wait_works_across_processes_on_postgresql(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> None:
    if not os.environ.get("JOBDOCK_TEST_DATABASE_URL"):
        pytest.skip("needs PostgreSQL (JOBDOCK_TEST_DATABASE_URL): an API node and a worker")
    workdir = tmp_path_factory.mktemp("replicas")
    api = Service(workdir, command=("serve", "--no-workers"), poll_interval_seconds=30)
    await api.start()
    worker = Service(
        workdir, command=("worker",), database_url=api.env["JOBDOCK_DATABASE_URL"], workers=1
    )
    try:
        await worker.start()
        submitted = await api.submit(**job("sleep 1; echo across"))
        started = time.monotonic()
        response = await api.client.get(f"/jobs/{submitted['id']}", params={"wait": 25})
        elapsed = time.monotonic() - started
        assert response.json()["state"] == "succeeded"
        assert response.json()["stdout"] == "across\n"
        assert elapsed < 20, f"the API node answered after {elapsed:.1f} s: no NOTIFY woke it"
    finally:
        await worker.close()
        await api.close()


async def test_many_waiters_leave_the_database_pool_to_other_requests(tmp_path: Path) -> None:
    """More callers waiting on `?wait=` than the service has pooled connections (60): a
    waiter holds none while it waits, so a submission and a read still answer at once (on
    PostgreSQL they would otherwise wait for the waiters, or for the pool's 30 s timeout)."""
    async with Service(tmp_path, workers=0, wait_max_seconds=8) as svc:
        submitted = await svc.submit(**job())
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=svc.url, timeout=30, limits=limits) as client:

            async def wait_on_it() -> int:
                response = await client.get(f"/jobs/{submitted['id']}", params={"wait": 8})
                return response.status_code

            waiters = [asyncio.create_task(wait_on_it()) for _ in range(80)]
            await asyncio.sleep(1.5)  # all of them waiting by now
            assert not any(waiter.done() for waiter in waiters)

            async def other_requests() -> None:
                posted = await client.post("/jobs", json=job())
                assert posted.status_code == 202, posted.text
                got = await client.get(f"/jobs/{posted.json()['id']}")
                assert got.status_code == 200, got.text

            # Well inside the 8 s the waiters hold on.
            await asyncio.wait_for(other_requests(), 4)
            assert not any(waiter.done() for waiter in waiters)
            assert await asyncio.gather(*waiters) == [200] * 80
