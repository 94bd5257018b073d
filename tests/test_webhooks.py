"""Webhooks end to end: a real `jobdock serve` process, the real Docker engine, and a real
HTTP receiver on 127.0.0.1 that the service POSTs finished jobs to."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.webhooks import ATTEMPT_HEADER, JOB_ID_HEADER, SIGNATURE_HEADER, verify_signature
from tests.support.receiver import Receiver
from tests.support.service import Service, free_port

SECRET = "e2e-webhook-secret"
MAX_ATTEMPTS = 3
SETTLED = {"delivered", "failed"}


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
async def hooked(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Service]:
    """One worker (so a job can be kept queued behind another), short webhook backoff."""
    async with Service(
        tmp_path_factory.mktemp("webhooks"),
        workers=1,
        webhook_secret=SECRET,
        webhook_max_attempts=MAX_ATTEMPTS,
        webhook_backoff_seconds=0.05,
        webhook_backoff_max_seconds=0.2,
        webhook_timeout_seconds=2,
        poll_interval_seconds=0.2,
    ) as service:
        yield service


async def settled(service: Service, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll until the job's webhook is delivered or given up; a bounded wait."""
    deadline = time.monotonic() + timeout
    while True:
        job = await service.get(job_id)
        if job["callback_state"] in SETTLED:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"webhook of {job_id} still {job['callback_state']}: {job}")
        await asyncio.sleep(0.1)


async def test_a_succeeded_jobs_webhook_arrives_once_and_signed(
    hooked: Service, receiver: Receiver, test_image: str
) -> None:
    url = receiver.script("succeeded", 200)
    job = await hooked.run(
        image=test_image, command=["sh", "-c", "echo hi"], callback_url=url, labels={"a": "b"}
    )
    assert job["state"] == "succeeded"
    assert job["callback_url"] == url
    job = await settled(hooked, job["id"])
    assert job["callback_state"] == "delivered"
    [attempt] = job["callback_deliveries"]
    assert attempt["attempt"] == 1
    assert attempt["status_code"] == 200
    assert attempt["error"] is None
    assert attempt["duration_ms"] >= 0
    assert attempt["attempted_at"] >= job["finished_at"]

    [request] = receiver.requests(url)
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("jobdock/")
    assert request.headers[JOB_ID_HEADER] == job["id"]
    assert request.headers[ATTEMPT_HEADER] == "1"
    header = request.headers[SIGNATURE_HEADER]
    assert verify_signature(SECRET, header, request.body)
    timestamp = int(header.split(",")[0].removeprefix("t="))
    assert abs(timestamp - request.at) < 60

    body = json.loads(request.body)
    assert body["id"] == job["id"]
    assert body["state"] == "succeeded"
    assert body["exit_code"] == 0
    assert body["stdout"] == "hi\n"
    assert body["labels"] == {"a": "b"}
    # The body is the job as GET /jobs/{id} shows it, as it was before this attempt.
    assert body["callback_state"] == "pending"
    assert body["callback_deliveries"] == []
    assert set(body) == set(job)

    # A tampered body, another secret, or the same request replayed later all fail.
    assert not verify_signature(SECRET, header, request.body.replace(b"succeeded", b"failed!!!"))
    assert not verify_signature(SECRET, header, request.body + b"\n")
    assert not verify_signature("not-the-secret", header, request.body)
    assert not verify_signature(SECRET, header, request.body, now=timestamp + 301)
    assert verify_signature(SECRET, header, request.body, now=timestamp + 299)

    # Delivered means done: nothing more arrives.
    await asyncio.sleep(0.5)
    assert len(receiver.requests(url)) == 1


async def test_a_receiver_failing_twice_gets_it_on_the_third_attempt(
    hooked: Service, receiver: Receiver, test_image: str
) -> None:
    url = receiver.script("flaky", 500, 500, 200)
    job = await hooked.run(image=test_image, command=["sh", "-c", "exit 3"], callback_url=url)
    assert job["state"] == "failed"
    job = await settled(hooked, job["id"])
    assert job["callback_state"] == "delivered"
    deliveries = job["callback_deliveries"]
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert [d["status_code"] for d in deliveries] == [500, 500, 200]
    assert [d["error"] for d in deliveries] == [
        "the receiver answered HTTP 500 Internal Server Error",
        "the receiver answered HTTP 500 Internal Server Error",
        None,
    ]
    assert deliveries[0]["attempted_at"] < deliveries[1]["attempted_at"]
    requests = receiver.requests(url)
    assert [r.headers[ATTEMPT_HEADER] for r in requests] == ["1", "2", "3"]
    for request in requests:
        assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], request.body)
        assert json.loads(request.body)["state"] == "failed"
    # Each attempt's body shows the attempts before it.
    assert len(json.loads(requests[2].body)["callback_deliveries"]) == 2


async def test_a_receiver_that_never_says_2xx_is_given_up_after_the_limit(
    hooked: Service, receiver: Receiver, test_image: str
) -> None:
    url = receiver.script("broken", 503)
    job = await hooked.run(image=test_image, command=["true"], callback_url=url)
    job = await settled(hooked, job["id"])
    assert job["callback_state"] == "failed"
    assert [d["status_code"] for d in job["callback_deliveries"]] == [503] * MAX_ATTEMPTS
    await asyncio.sleep(0.5)
    assert len(receiver.requests(url)) == MAX_ATTEMPTS


async def test_a_closed_port_is_recorded_as_a_network_error(
    hooked: Service, test_image: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    job = await hooked.run(image=test_image, command=["true"], callback_url=url)
    job = await settled(hooked, job["id"])
    assert job["callback_state"] == "failed"
    assert len(job["callback_deliveries"]) == MAX_ATTEMPTS
    for delivery in job["callback_deliveries"]:
        assert delivery["status_code"] is None
        assert delivery["error"].startswith("cannot connect to the receiver")


async def test_a_cancelled_queued_job_delivers_too(
    hooked: Service, receiver: Receiver, test_image: str
) -> None:
    blocker = await hooked.submit(image=test_image, command=["sleep", "60"])
    await hooked.wait(blocker["id"], states={"running"})
    url = receiver.script("cancelled", 204)
    queued = await hooked.submit(image=test_image, command=["true"], callback_url=url)
    try:
        response = await hooked.client.post(f"/jobs/{queued['id']}/cancel")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "cancelled"
        job = await settled(hooked, queued["id"])
    finally:
        await hooked.client.post(f"/jobs/{blocker['id']}/cancel")
        await hooked.wait(blocker["id"])
    assert job["callback_state"] == "delivered"
    assert [d["status_code"] for d in job["callback_deliveries"]] == [204]
    [request] = receiver.requests(url)
    assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], request.body)
    body = json.loads(request.body)
    assert body["state"] == "cancelled"
    assert body["started_at"] is None


async def test_a_job_without_a_callback_url_has_no_webhook(
    hooked: Service, test_image: str
) -> None:
    job = await hooked.run(image=test_image, command=["true"])
    assert job["callback_url"] is None
    assert job["callback_state"] is None
    assert job["callback_deliveries"] == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/hook",
        "file:///etc/passwd",
        "http://",
        "127.0.0.1:8080/hook",
        "https://user:password@127.0.0.1/hook",
        "https://token@127.0.0.1/hook",
        "not a url",
        "",
        "http://127.0.0.1/" + "x" * 2048,
        "http:///path-without-host",
        "http:/127.0.0.1/one-slash",
        "http://127.0.0.1/trailing-newline\n",
        "http://127.0.0.1/a space",
    ],
)
async def test_bad_callback_urls_are_refused(hooked: Service, test_image: str, url: str) -> None:
    response = await hooked.client.post("/jobs", json={"image": test_image, "callback_url": url})
    assert response.status_code == 422, response.text


async def test_the_service_warns_once_when_webhooks_are_unsigned(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=1) as service:
        job = await service.run(image=test_image, command=["true"])
        assert job["state"] == "succeeded"
    log = service.log()
    assert log.count("JOBDOCK_WEBHOOK_SECRET is not set") == 1
