"""app.store.webhooks and the WebhookDeliverer on a real database (SQLite, or PostgreSQL
with JOBDOCK_TEST_DATABASE_URL) and a real HTTP receiver on 127.0.0.1; no Docker."""

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlmodel import col

from app import store
from app.db import SessionFactory, create_engine, create_session_factory
from app.models import CallbackState, Job, JobCreate, JobState, WebhookDelivery, utc_now
from app.settings import Settings
from app.store import webhooks
from app.webhooks import (
    ATTEMPT_HEADER,
    JOB_ID_HEADER,
    SIGNATURE_HEADER,
    USER_AGENT,
    WebhookDeliverer,
    verify_signature,
)
from tests.support.receiver import Answer, Receiver
from tests.support.service import free_port
from tests.test_store import add_job, read

SECRET = "delivery-test-secret"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as receiver:
        yield receiver


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "webhook_secret": SecretStr(SECRET),
            "webhook_max_attempts": 3,
            "webhook_backoff_seconds": 0.01,
            "webhook_backoff_max_seconds": 0.05,
            "webhook_timeout_seconds": 1.0,
            "poll_interval_seconds": 0.05,
        }
    )


async def add_ended_job(session_factory: SessionFactory, url: str | None, **fields: Any) -> Job:
    """A finished job whose webhook is due now, as the store's terminal writes leave it."""
    now = utc_now()
    values: dict[str, Any] = {
        "command": ["echo", "hi"],
        "state": JobState.succeeded,
        "exit_code": 0,
        "stdout": "hi\n",
        "started_at": now,
        "finished_at": now,
        "callback_url": url,
        "callback_state": CallbackState.pending,
        "callback_next_at": now,
        **fields,
    }
    return await add_job(session_factory, **values)


async def claim(session_factory: SessionFactory, lease_seconds: float = 60.0) -> Job | None:
    async with session_factory() as session:
        return await webhooks.claim_due_delivery(session=session, lease_seconds=lease_seconds)


def delivery(attempt: int, status_code: int | None = 200, error: str | None = None) -> Any:
    return WebhookDelivery(
        attempt=attempt,
        attempted_at=utc_now(),
        status_code=status_code,
        error=error,
        duration_ms=3.5,
    )


async def wait_until(condition: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.02)


# -- the store ---------------------------------------------------------------------------


async def test_only_due_pending_webhooks_are_claimed(session_factory: SessionFactory) -> None:
    assert await claim(session_factory) is None
    later = await add_ended_job(
        session_factory, "http://127.0.0.1:9/a", callback_next_at=utc_now() + timedelta(hours=1)
    )
    await add_ended_job(session_factory, "http://127.0.0.1:9/b", callback_state=None)
    await add_ended_job(session_factory, "http://127.0.0.1:9/c", callback_state="delivered")
    await add_ended_job(session_factory, None, callback_state=None, callback_next_at=None)
    assert await claim(session_factory) is None
    due = await add_ended_job(session_factory, "http://127.0.0.1:9/d")
    claimed = await claim(session_factory, lease_seconds=60)
    assert claimed is not None and claimed.id == due.id
    assert claimed.stdout == "hi\n"
    assert claimed.callback_next_at is not None
    assert claimed.callback_next_at > utc_now() + timedelta(seconds=50)
    # Leased: nobody else takes it meanwhile.
    assert await claim(session_factory) is None
    assert (await read(session_factory, later.id)).callback_state is CallbackState.pending


async def test_the_oldest_due_webhook_is_claimed_first(session_factory: SessionFactory) -> None:
    now = utc_now()
    second = await add_ended_job(session_factory, "http://x.test/", callback_next_at=now)
    first = await add_ended_job(
        session_factory, "http://x.test/", callback_next_at=now - timedelta(seconds=5)
    )
    claimed = [await claim(session_factory), await claim(session_factory)]
    assert [job.id for job in claimed if job is not None] == [first.id, second.id]


async def test_an_expired_claim_is_claimed_again_and_the_old_one_cannot_record(
    session_factory: SessionFactory,
) -> None:
    await add_ended_job(session_factory, "http://x.test/")
    old = await claim(session_factory, lease_seconds=0.05)
    assert old is not None
    await asyncio.sleep(0.1)
    new = await claim(session_factory)
    assert new is not None and new.id == old.id
    async with session_factory() as session:
        assert not await webhooks.record_delivery(
            session=session,
            job=old,
            delivery=delivery(1),
            state=CallbackState.delivered,
            next_at=None,
        )
        assert not await webhooks.release_delivery(session=session, job=old)
    async with session_factory() as session:
        assert await webhooks.record_delivery(
            session=session,
            job=new,
            delivery=delivery(1, 500, "the receiver answered HTTP 500"),
            state=CallbackState.pending,
            next_at=utc_now(),
        )
    job = await read(session_factory, new.id)
    assert job.callback_state is CallbackState.pending
    assert job.callback_deliveries is not None and len(job.callback_deliveries) == 1
    assert job.callback_deliveries[0]["status_code"] == 500


async def test_recorded_attempts_accumulate_until_delivered(
    session_factory: SessionFactory,
) -> None:
    added = await add_ended_job(session_factory, "http://x.test/")
    for attempt in (1, 2):
        job = await claim(session_factory)
        assert job is not None
        async with session_factory() as session:
            assert await webhooks.record_delivery(
                session=session,
                job=job,
                delivery=delivery(attempt, None, "cannot connect"),
                state=CallbackState.pending,
                next_at=utc_now() - timedelta(seconds=1),
            )
    job = await claim(session_factory)
    assert job is not None
    async with session_factory() as session:
        assert await webhooks.record_delivery(
            session=session,
            job=job,
            delivery=delivery(3, 204),
            state=CallbackState.delivered,
            next_at=None,
        )
    done = await read(session_factory, added.id)
    assert done.callback_state is CallbackState.delivered
    assert done.callback_next_at is None
    assert [d["attempt"] for d in done.callback_deliveries or []] == [1, 2, 3]
    assert [d["status_code"] for d in done.callback_deliveries or []] == [None, None, 204]
    assert await claim(session_factory) is None
    # The job itself is untouched.
    assert done.state is JobState.succeeded and done.stdout == "hi\n"


async def test_released_claims_are_due_at_once(session_factory: SessionFactory) -> None:
    await add_ended_job(session_factory, "http://x.test/")
    job = await claim(session_factory)
    assert job is not None
    async with session_factory() as session:
        assert await webhooks.release_delivery(session=session, job=job)
    again = await claim(session_factory)
    assert again is not None and again.id == job.id
    assert not again.callback_deliveries


async def test_a_queued_cancel_makes_the_webhook_due(
    session_factory: SessionFactory, settings: Settings
) -> None:
    async with session_factory() as session:
        job, _ = await store.create_job(
            session=session,
            job_in=JobCreate(image="busybox", callback_url="http://127.0.0.1:9/hook"),
            settings=settings,
        )
        plain, _ = await store.create_job(
            session=session, job_in=JobCreate(image="busybox"), settings=settings
        )
    assert job.callback_state is None
    async with session_factory() as session:
        await store.cancel_job(session=session, job_id=job.id)
        await store.cancel_job(session=session, job_id=plain.id)
    assert (await read(session_factory, plain.id)).callback_state is None
    claimed = await claim(session_factory)
    assert claimed is not None and claimed.id == job.id
    assert claimed.state is JobState.cancelled


async def test_concurrent_claims_from_two_processes_take_each_attempt_once(
    settings: Settings, session_factory: SessionFactory
) -> None:
    """Two engines stand for two worker processes; many claims race on both."""
    jobs = [await add_ended_job(session_factory, f"http://x.test/{n}") for n in range(30)]
    other_engine = create_engine(settings.database_url)
    try:
        other = create_session_factory(other_engine)
        taken: list[uuid.UUID] = []

        async def claimer(factory: SessionFactory) -> None:
            while (job := await claim(factory)) is not None:
                taken.append(job.id)

        await asyncio.gather(*(claimer(f) for _ in range(6) for f in (session_factory, other)))
    finally:
        await other_engine.dispose()
    assert Counter(taken) == Counter(job.id for job in jobs)


# -- the deliverer -----------------------------------------------------------------------


async def test_a_delivery_is_signed_over_the_exact_body(
    session_factory: SessionFactory, hook_settings: Settings, receiver: Receiver
) -> None:
    url = receiver.script("ok", 204)
    job = await add_ended_job(session_factory, url, labels={"team": "ml"})
    recorded: list[uuid.UUID] = []
    deliverer = WebhookDeliverer(
        session_factory=session_factory, settings=hook_settings, on_recorded=recorded.append
    )
    assert await deliverer.deliver_due() == 1
    [request] = receiver.requests(url)
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == USER_AGENT
    assert request.headers[JOB_ID_HEADER] == str(job.id)
    assert request.headers[ATTEMPT_HEADER] == "1"
    assert verify_signature(SECRET, request.headers[SIGNATURE_HEADER], request.body)
    body = json.loads(request.body)
    assert body["id"] == str(job.id)
    assert body["state"] == "succeeded"
    assert body["stdout"] == "hi\n"
    assert body["labels"] == {"team": "ml"}
    assert "stdin" not in body
    stored = await read(session_factory, job.id)
    assert stored.callback_state is CallbackState.delivered
    [attempt] = stored.callback_deliveries or []
    assert attempt["status_code"] == 204 and attempt["error"] is None
    assert attempt["duration_ms"] >= 0
    assert recorded == [job.id]


async def test_without_a_secret_deliveries_are_unsigned(
    session_factory: SessionFactory,
    hook_settings: Settings,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = receiver.script("unsigned", 200)
    await add_ended_job(session_factory, url)
    settings = hook_settings.model_copy(update={"webhook_secret": None})
    deliverer = WebhookDeliverer(session_factory=session_factory, settings=settings)
    task = asyncio.create_task(deliverer.run())
    try:
        [request] = await receiver.wait_for(url, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert SIGNATURE_HEADER not in request.headers
    assert "WEBHOOK_SECRET is not set" in caplog.text


@pytest.mark.parametrize(
    ("answer", "status_code", "error"),
    [
        (Answer(500), 500, "the receiver answered HTTP 500 Internal Server Error"),
        (Answer(404), 404, "the receiver answered HTTP 404 Not Found"),
        (
            Answer(302, location="http://127.0.0.1:9/elsewhere"),
            302,
            "the receiver answered HTTP 302 Found (redirects are not followed)",
        ),
        (Answer(200, delay=3.0), None, "no answer within 1 s"),
    ],
)
async def test_failed_attempts_say_why(
    session_factory: SessionFactory,
    hook_settings: Settings,
    receiver: Receiver,
    answer: Answer,
    status_code: int | None,
    error: str,
) -> None:
    url = receiver.script(f"fails-{answer.status}-{answer.delay}", answer)
    job = await add_ended_job(session_factory, url)
    settings = hook_settings.model_copy(update={"webhook_max_attempts": 1})
    deliverer = WebhookDeliverer(session_factory=session_factory, settings=settings)
    assert await deliverer.deliver_due() == 1
    stored = await read(session_factory, job.id)
    assert stored.callback_state is CallbackState.failed
    [attempt] = stored.callback_deliveries or []
    assert attempt["status_code"] == status_code
    assert attempt["error"] == error
    # Redirects are not followed: only the receiver's own path was asked.
    assert len(receiver.requests(url)) == 1


async def test_a_closed_port_is_a_network_error(
    session_factory: SessionFactory, hook_settings: Settings
) -> None:
    job = await add_ended_job(session_factory, f"http://127.0.0.1:{free_port()}/hook")
    deliverer = WebhookDeliverer(session_factory=session_factory, settings=hook_settings)
    # Three attempts with a few milliseconds of backoff between them.
    await wait_until(lambda: _deliver_and_check(deliverer, session_factory, job.id))
    stored = await read(session_factory, job.id)
    assert stored.callback_state is CallbackState.failed
    attempts = stored.callback_deliveries or []
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    for attempt in attempts:
        assert attempt["status_code"] is None
        assert attempt["error"].startswith("cannot connect to the receiver: ")


async def _deliver_and_check(
    deliverer: WebhookDeliverer, session_factory: SessionFactory, job_id: uuid.UUID
) -> bool:
    await deliverer.deliver_due()
    return (await read(session_factory, job_id)).callback_state is CallbackState.failed


async def test_a_slow_receiver_does_not_hold_up_the_others(
    session_factory: SessionFactory, hook_settings: Settings, receiver: Receiver
) -> None:
    slow = receiver.script("slow", Answer(200, delay=0.9))
    fast = receiver.script("fast", 200)
    slow_job = await add_ended_job(session_factory, slow)
    fast_jobs = [await add_ended_job(session_factory, fast) for _ in range(5)]
    deliverer = WebhookDeliverer(session_factory=session_factory, settings=hook_settings)
    task = asyncio.create_task(deliverer.run())
    try:
        await receiver.wait_for(fast, 5, timeout=0.8)
        assert not receiver.requests(slow) or len(receiver.requests(slow)) == 1
        for job in fast_jobs:
            await wait_until(lambda job=job: _is(session_factory, job.id, CallbackState.delivered))
        await wait_until(lambda: _is(session_factory, slow_job.id, CallbackState.delivered))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _is(session_factory: SessionFactory, job_id: uuid.UUID, state: CallbackState) -> bool:
    return (await read(session_factory, job_id)).callback_state is state


async def test_stopping_gives_in_flight_claims_back(
    session_factory: SessionFactory, hook_settings: Settings, receiver: Receiver
) -> None:
    url = receiver.script("hangs", Answer(200, delay=5.0))
    job = await add_ended_job(session_factory, url)
    deliverer = WebhookDeliverer(session_factory=session_factory, settings=hook_settings)
    task = asyncio.create_task(deliverer.run())
    await receiver.wait_for(url, 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    stored = await read(session_factory, job.id)
    assert stored.callback_state is CallbackState.pending
    assert not stored.callback_deliveries
    assert stored.callback_next_at is not None and stored.callback_next_at <= utc_now()


async def test_two_deliverers_deliver_each_webhook_once(
    settings: Settings,
    session_factory: SessionFactory,
    hook_settings: Settings,
    receiver: Receiver,
) -> None:
    """Two deliverers on two engines (as two worker processes) share 40 due webhooks."""
    url = receiver.script("shared", Answer(200, delay=0.02))
    jobs = [await add_ended_job(session_factory, url) for _ in range(40)]
    other_engine = create_engine(settings.database_url)
    deliverers = [
        WebhookDeliverer(session_factory=session_factory, settings=hook_settings),
        WebhookDeliverer(
            session_factory=create_session_factory(other_engine), settings=hook_settings
        ),
    ]
    tasks = [asyncio.create_task(d.run()) for d in deliverers]
    try:
        await receiver.wait_for(url, len(jobs))

        async def all_delivered() -> bool:
            async with session_factory() as session:
                states = await session.execute(
                    select(col(Job.callback_state)).where(col(Job.id).in_([j.id for j in jobs]))
                )
                return all(s is CallbackState.delivered for (s,) in states)

        await wait_until(all_delivered)
        # Anything more would have arrived by now: every deliverer polls every 50 ms.
        await asyncio.sleep(0.3)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await other_engine.dispose()
    arrived = Counter(r.headers[JOB_ID_HEADER] for r in receiver.requests(url))
    assert arrived == Counter(str(job.id) for job in jobs)
    assert all(r.headers[ATTEMPT_HEADER] == "1" for r in receiver.requests(url))
