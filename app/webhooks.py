"""Webhooks: when a job with a `callback_url` ends, POST it there, signed, with retries.

The body is the job exactly as `GET /jobs/{id}` returns it (`JobPublic` JSON). With
`JOBDOCK_WEBHOOK_SECRET` set, each request carries

    Jobdock-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, b"<t>." + body)>

(the scheme Stripe uses). A receiver recomputes the HMAC over the raw bytes it received,
compares it in constant time with a `v1` value, and rejects a `t` more than a few minutes
away from its own clock, so a captured request cannot be replayed later:
`verify_signature()` below does exactly that and may be copied as it is.

Any answer outside 2xx (redirects are not followed), a timeout or a network error is a
failed attempt; attempt n+1 follows after `webhook_backoff_seconds * 2**(n-1)` seconds
(capped at `webhook_backoff_max_seconds`, less up to half at random), until
`webhook_max_attempts`. Every attempt is recorded on the job (`callback_deliveries`).
Delivery is at least once: a worker that dies between the POST and recording it leaves
the attempt to be made again, so receivers should treat a job id they already handled
as done.

`WebhookDeliverer.run()` is a side loop of the worker pool; the queries are in
app.store.webhooks.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

import httpx

from app import __version__
from app.aio import finish_despite_cancel
from app.db import SessionFactory
from app.models import CallbackState, Job, JobPublic, WebhookDelivery, utc_now
from app.settings import Settings
from app.store import webhooks as store

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Jobdock-Signature"
JOB_ID_HEADER = "Jobdock-Job-Id"
ATTEMPT_HEADER = "Jobdock-Delivery-Attempt"
USER_AGENT = f"jobdock/{__version__}"
# A receiver accepts a signature at most this far from its own clock, either way.
DEFAULT_TOLERANCE_SECONDS = 300
# Deliveries in flight at once per deliverer, so one slow receiver holds up no other.
MAX_CONCURRENT_DELIVERIES = 8
# A claimed delivery is left to others this long past the request's own deadline.
CLAIM_MARGIN_SECONDS = 60.0

T = TypeVar("T")


# -- signing ---------------------------------------------------------------------------------


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(_key(secret), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The `Jobdock-Signature` value for `body` at `timestamp` (unix seconds, default now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether `header` (a `Jobdock-Signature` value) signs exactly `body` under `secret`,
    made within `tolerance_seconds` of `now` (unix seconds, default the current time).

    `body` must be the raw bytes received, before any JSON parsing. Several `v1` values
    (e.g. while a secret is being rotated) pass if any one matches.
    """
    if not header:
        return False
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = _digest(secret, timestamp, body)
    # Every candidate is compared, so the time taken does not tell which one matched.
    matches = [hmac.compare_digest(expected, candidate) for candidate in signatures]
    return any(matches)


# -- what is sent, and what follows an attempt -----------------------------------------------


def job_body(job: Job) -> bytes:
    """The body of a job's webhook: the job as GET /jobs/{id} shows it, as JSON."""
    return JobPublic.model_validate(job).model_dump_json().encode()


def retry_delay_seconds(attempt: int, settings: Settings) -> float:
    """The longest wait after failed attempt `attempt` (1-based), before jitter."""
    growth = float(2 ** min(attempt - 1, 62))
    return min(settings.webhook_backoff_max_seconds, settings.webhook_backoff_seconds * growth)


def next_state(
    delivery: WebhookDelivery, settings: Settings, now: datetime | None = None
) -> tuple[CallbackState, datetime | None]:
    """Where a webhook is after this attempt: delivered, due again at some time, or failed."""
    if delivery.error is None:
        return CallbackState.delivered, None
    if delivery.attempt >= settings.webhook_max_attempts:
        return CallbackState.failed, None
    # Jitter, so webhooks of many jobs failing together are not retried in waves.
    delay = retry_delay_seconds(delivery.attempt, settings) * random.uniform(0.5, 1.0)
    return CallbackState.pending, (now or utc_now()) + timedelta(seconds=delay)


# -- the deliverer ---------------------------------------------------------------------------


class WebhookDeliverer:
    """Claims due webhooks and POSTs them, several at once, until cancelled.

    `wake()` after a job reaches a terminal state in this process; otherwise due
    deliveries (from other processes, and retries) are found every poll interval.
    `on_recorded(job_id)` is called after each attempt is written to the job.
    """

    def __init__(
        self,
        *,
        session_factory: SessionFactory,
        settings: Settings,
        on_recorded: Callable[[uuid.UUID], None] | None = None,
        concurrency: int = MAX_CONCURRENT_DELIVERIES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._sessions = session_factory
        self._settings = settings
        self._on_recorded = on_recorded
        self.concurrency = concurrency
        self._transport = transport
        self._wakeup = asyncio.Event()
        self._warned_unsigned = False
        secret = settings.webhook_secret
        self._secret = secret.get_secret_value().encode() if secret is not None else None
        self._lease_seconds = settings.webhook_timeout_seconds + CLAIM_MARGIN_SECONDS

    def wake(self) -> None:
        """A job just ended here: look for due webhooks now rather than at the next poll."""
        self._wakeup.set()

    def client(self) -> httpx.AsyncClient:
        """The HTTP client of one run: its own connections, no redirects, no cookies kept."""
        return httpx.AsyncClient(
            timeout=self._settings.webhook_timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            transport=self._transport,
        )

    async def run(self) -> None:
        """Deliver due webhooks until cancelled; in-flight attempts are then abandoned and
        their claims given back, so another worker makes them at once."""
        if self._secret is None and not self._warned_unsigned:
            self._warned_unsigned = True
            logger.warning(
                "JOBDOCK_WEBHOOK_SECRET is not set: webhooks are sent without a signature"
            )
        slots = asyncio.Semaphore(self.concurrency)
        in_flight: set[asyncio.Task[None]] = set()
        async with self.client() as client:
            try:
                while True:
                    await slots.acquire()
                    self._wakeup.clear()
                    try:
                        job = await self._claim()
                    except Exception:
                        slots.release()
                        # The database is away: in-flight attempts go on, claiming waits.
                        logger.exception("cannot claim a due webhook; trying again")
                        await asyncio.sleep(self._settings.poll_interval_seconds)
                        continue
                    except BaseException:
                        slots.release()
                        raise
                    if job is None:
                        slots.release()
                        await self._idle()
                        continue
                    task = asyncio.create_task(
                        self._deliver(client, job), name=f"jobdock-webhook-{job.id}"
                    )
                    in_flight.add(task)

                    def _done(done: "asyncio.Task[None]") -> None:
                        in_flight.discard(done)
                        slots.release()

                    task.add_done_callback(_done)
            finally:
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def deliver_due(self) -> int:
        """Make every attempt due now, one after another; how many were made (for tests and
        one-off use; the pool uses `run()`)."""
        made = 0
        async with self.client() as client:
            while (job := await self._claim()) is not None:
                await self._deliver(client, job)
                made += 1
        return made

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._wakeup.wait(), timeout=self._settings.poll_interval_seconds
            )

    async def _claim(self) -> Job | None:
        """Claim one due delivery; a claim that committed while this was cancelled is given
        back rather than left to its lease."""

        async def claim() -> Job | None:
            async with self._sessions() as session:
                return await store.claim_due_delivery(
                    session=session, lease_seconds=self._lease_seconds
                )

        task = asyncio.ensure_future(claim())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            job = None
            with contextlib.suppress(Exception):
                job = await task
            if job is not None:
                await self._release(job)
            raise

    async def _deliver(self, client: httpx.AsyncClient, job: Job) -> None:
        try:
            delivery = await self.attempt(client, job)
        except asyncio.CancelledError:
            await finish_despite_cancel(self._release(job))
            raise
        state, next_at = next_state(delivery, self._settings)
        try:
            written = await finish_despite_cancel(self._record(job, delivery, state, next_at))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("job %s: webhook attempt %d not recorded", job.id, delivery.attempt)
            return
        if not written:
            logger.warning("job %s: webhook attempt dropped, its claim had expired", job.id)
            return
        if state is CallbackState.delivered:
            logger.info("job %s: webhook delivered (attempt %d)", job.id, delivery.attempt)
        else:
            logger.warning(
                "job %s: webhook attempt %d of %d failed: %s%s",
                job.id,
                delivery.attempt,
                self._settings.webhook_max_attempts,
                delivery.error,
                "; giving up" if state is CallbackState.failed else "",
            )
        if self._on_recorded is not None:
            self._on_recorded(job.id)

    async def attempt(self, client: httpx.AsyncClient, job: Job) -> WebhookDelivery:
        """POST the job to its callback_url once; what happened, never raising for the
        receiver's faults. The response body is not read."""
        number = len(job.callback_deliveries or []) + 1
        body = job_body(job)
        headers = {
            "Content-Type": "application/json",
            JOB_ID_HEADER: str(job.id),
            ATTEMPT_HEADER: str(number),
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        timeout = self._settings.webhook_timeout_seconds
        attempted_at = utc_now()
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        try:
            if job.callback_url is None:
                raise ValueError("the job has no callback_url")
            # httpx's timeout bounds each read; this bounds the whole exchange.
            async with (
                asyncio.timeout(timeout),
                client.stream("POST", job.callback_url, content=body, headers=headers) as response,
            ):
                status_code = response.status_code
            if not response.is_success:
                error = f"the receiver answered HTTP {status_code}"
                if response.reason_phrase:
                    error += f" {response.reason_phrase}"
                if response.is_redirect:
                    error += " (redirects are not followed)"
        except (TimeoutError, httpx.TimeoutException):
            error = f"no answer within {timeout:g} s"
        except httpx.ConnectError as exc:
            error = f"cannot connect to the receiver: {exc or type(exc).__name__}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc or 'no detail'}"
        except Exception as exc:
            # An invalid URL and the like: recorded, so it ends in `failed`, not a loop.
            error = f"cannot send: {exc!r}"
        return WebhookDelivery(
            attempt=number,
            attempted_at=attempted_at,
            status_code=status_code,
            error=error,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _record(
        self,
        job: Job,
        delivery: WebhookDelivery,
        state: CallbackState,
        next_at: datetime | None,
    ) -> bool:
        async with self._sessions() as session:
            return await store.record_delivery(
                session=session, job=job, delivery=delivery, state=state, next_at=next_at
            )

    async def _release(self, job: Job) -> None:
        try:
            async with self._sessions() as session:
                await store.release_delivery(session=session, job=job)
        except Exception:
            logger.exception(
                "job %s: webhook claim not given back; retried after its lease", job.id
            )
