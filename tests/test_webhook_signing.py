"""Webhook signatures and the retry schedule, without a database or a network."""

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from app.models import CallbackState, WebhookDelivery
from app.settings import Settings
from app.webhooks import next_state, retry_delay_seconds, sign, verify_signature

SECRET = "s3cret-for-tests"
BODY = b'{"id":"0a9c","state":"succeeded","stdout":"hi\\n"}'
T = 1_800_000_000


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, BODY, T) == f"t={T},v1={expected}"


def test_a_fresh_signature_verifies() -> None:
    assert verify_signature(SECRET, sign(SECRET, BODY, T), BODY, now=T + 10)
    assert verify_signature(SECRET.encode(), sign(SECRET, BODY, T), BODY, now=T)
    # Without `now`, against the current clock.
    assert verify_signature(SECRET, sign(SECRET, BODY), BODY)


@pytest.mark.parametrize(
    "tampered",
    [
        BODY.replace(b"succeeded", b"failed\x20\x20\x20"),
        BODY + b" ",
        BODY[:-1],
        b"",
    ],
)
def test_a_tampered_body_fails(tampered: bytes) -> None:
    assert not verify_signature(SECRET, sign(SECRET, BODY, T), tampered, now=T)


def test_another_secret_fails() -> None:
    assert not verify_signature("other", sign(SECRET, BODY, T), BODY, now=T)


def test_an_old_or_future_timestamp_fails() -> None:
    header = sign(SECRET, BODY, T)
    assert verify_signature(SECRET, header, BODY, now=T + 300)
    assert not verify_signature(SECRET, header, BODY, now=T + 301)
    assert not verify_signature(SECRET, header, BODY, now=T - 301)
    assert verify_signature(SECRET, header, BODY, tolerance_seconds=3600, now=T + 3000)
    assert not verify_signature(SECRET, header, BODY, tolerance_seconds=5, now=T + 6)


def test_a_replayed_signature_with_a_new_timestamp_fails() -> None:
    """The timestamp is signed: moving it forward to pass the window breaks the HMAC."""
    digest = sign(SECRET, BODY, T).split("v1=")[1]
    assert not verify_signature(SECRET, f"t={T + 1000},v1={digest}", BODY, now=T + 1000)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"t={T}",
        "v1=abc",
        f"t=-{T},v1=abc",
        f"t={T}.5,v1=abc",
        "t=１２３,v1=abc",  # noqa: RUF001 - full-width digits are not a timestamp
        f"t={T},v1=",
        f"t={T},v0=abc",
    ],
)
def test_malformed_headers_fail(header: str | None) -> None:
    assert not verify_signature(SECRET, header, BODY, now=T)


def test_any_matching_v1_passes_and_spaces_are_tolerated() -> None:
    good = sign(SECRET, BODY, T).split("v1=")[1]
    assert verify_signature(SECRET, f"t={T}, v1={'0' * 64}, v1={good}", BODY, now=T)


def _failed(attempt: int) -> WebhookDelivery:
    return WebhookDelivery(
        attempt=attempt,
        attempted_at=datetime.now(UTC),
        status_code=500,
        error="the receiver answered HTTP 500",
        duration_ms=1.0,
    )


def test_the_retry_schedule_doubles_up_to_its_cap() -> None:
    settings = Settings(webhook_backoff_seconds=1.0, webhook_backoff_max_seconds=10.0)
    assert [retry_delay_seconds(n, settings) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert retry_delay_seconds(1000, settings) == 10


def test_next_state_after_an_attempt() -> None:
    settings = Settings(
        webhook_max_attempts=3, webhook_backoff_seconds=4.0, webhook_backoff_max_seconds=60.0
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ok = _failed(1).model_copy(update={"status_code": 204, "error": None})
    assert next_state(ok, settings, now) == (CallbackState.delivered, None)
    for attempt, longest in [(1, 4.0), (2, 8.0)]:
        state, next_at = next_state(_failed(attempt), settings, now)
        assert state is CallbackState.pending
        assert next_at is not None
        # Jitter takes off up to half.
        assert now + timedelta(seconds=longest / 2) <= next_at <= now + timedelta(seconds=longest)
    assert next_state(_failed(3), settings, now) == (CallbackState.failed, None)
    # Attempts above a lowered limit also end it.
    assert next_state(_failed(7), settings, now) == (CallbackState.failed, None)
