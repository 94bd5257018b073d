"""app.client on its own: error messages, log-stream resumption and long polls, against
scripted HTTP answers (the end-to-end tests are in test_cli.py)."""

import itertools
import json
import time
from collections.abc import Callable

import httpx
import pytest

from app import client as client_module
from app.cli import job_exit_code
from app.client import (
    ClientError,
    EndEvent,
    JobdockClient,
    LogEvent,
    ServerUnreachable,
    error_message,
)

Handler = Callable[[httpx.Request], httpx.Response]


def scripted(handler: Handler) -> JobdockClient:
    return JobdockClient("http://jobdock.test", transport=httpx.MockTransport(handler))


def sse(*events: tuple[str, str | None, dict[str, object]]) -> httpx.Response:
    body = "".join(
        f"event: {name}\n"
        + (f"id: {event_id}\n" if event_id else "")
        + f"data: {json.dumps(data)}\n\n"
        for name, event_id, data in events
    )
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


def test_error_message_of_a_validation_error() -> None:
    answer = httpx.Response(
        422,
        json={
            "detail": [
                {"loc": ["body", "image"], "msg": "image is not valid", "type": "value_error"},
                {"loc": ["query", "limit"], "msg": "too big", "type": "less_than_equal"},
            ]
        },
    )
    assert error_message(answer) == "image: image is not valid; limit: too big"


def test_error_message_of_a_domain_error_and_of_backpressure() -> None:
    assert error_message(httpx.Response(404, json={"detail": "No job has this id"})) == (
        "No job has this id"
    )
    full = httpx.Response(503, json={"detail": "queue is full"}, headers={"Retry-After": "5"})
    assert error_message(full) == "queue is full (retry after 5 s)"


def test_error_message_of_a_body_that_is_not_json() -> None:
    assert error_message(httpx.Response(502, text="Bad Gateway")) == "HTTP 502: Bad Gateway"
    assert error_message(httpx.Response(500)) == "HTTP 500"


def test_errors_become_client_errors() -> None:
    with scripted(lambda request: httpx.Response(409, json={"detail": "finished"})) as api:
        with pytest.raises(ClientError) as raised:
            api.cancel("some-id")
    assert raised.value.status == 409
    assert raised.value.message == "finished"


def test_job_ids_stay_one_path_segment() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return httpx.Response(404, json={"detail": "No job has this id"})

    with scripted(handler) as api, pytest.raises(ClientError):
        api.get("../healthz")
    assert paths == ["/jobs/..%2Fhealthz"]


def test_follow_resumes_from_the_last_event_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RECONNECT_BASE_SECONDS", 0.0)
    offsets: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        offsets.append(request.url.params.get("offset"))
        assert request.url.params["follow"] == "true"
        if len(offsets) == 1:
            # The stream breaks (a restart, a proxy) before the job ends.
            return sse(
                ("log", "1", {"seq": 0, "attempt": 1, "stream": "stdout", "text": "one\n"}),
                ("log", "2", {"seq": 1, "attempt": 1, "stream": "stderr", "text": "two\n"}),
            )
        return sse(
            ("log", "3", {"seq": 2, "attempt": 1, "stream": "stdout", "text": "three\n"}),
            ("end", None, {"state": "failed", "exit_code": 3, "error": None}),
        )

    with scripted(handler) as api:
        events = list(api.follow_logs("job"))
    assert offsets == [None, "2"]
    assert events == [
        LogEvent(offset=1, stream="stdout", text="one\n"),
        LogEvent(offset=2, stream="stderr", text="two\n"),
        LogEvent(offset=3, stream="stdout", text="three\n"),
        EndEvent(state="failed", exit_code=3, error=None),
    ]


def test_follow_of_an_unreachable_service_fails_at_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    started = time.monotonic()
    with scripted(handler) as api, pytest.raises(ServerUnreachable) as raised:
        list(api.follow_logs("job"))
    assert time.monotonic() - started < 1
    assert "cannot reach Jobdock at http://jobdock.test" in raised.value.message


def test_follow_of_a_missing_job_is_the_server_message() -> None:
    with (
        scripted(lambda request: httpx.Response(404, json={"detail": "No job has this id"})) as api,
        pytest.raises(ClientError) as raised,
    ):
        list(api.follow_logs("job"))
    assert raised.value.message == "No job has this id"


def test_wait_long_polls_and_never_busy_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MIN_POLL_SECONDS", 0.2)
    seen: list[tuple[float, str | None]] = []
    states = iter(["queued", "running", "succeeded"])

    def handler(request: httpx.Request) -> httpx.Response:
        # A server that ignores ?wait= and answers at once.
        seen.append((time.monotonic(), request.url.params.get("wait")))
        return httpx.Response(200, json={"id": "job", "state": next(states)})

    with scripted(handler) as api:
        job = api.wait("job", chunk_seconds=7)
    assert job["state"] == "succeeded"
    assert [wait for _, wait in seen] == ["7", "7", "7"]
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(seen)]
    assert all(gap >= 0.19 for gap in gaps), gaps


@pytest.mark.parametrize(
    ("state", "exit_code", "expected"),
    [
        ("succeeded", 0, 0),
        ("failed", 3, 3),
        ("failed", 137, 137),
        ("failed", None, 1),
        ("timed_out", None, 124),
        ("timed_out", 137, 124),
        ("cancelled", None, 130),
        ("cancelled", 137, 130),
    ],
)
def test_exit_code_of_submit_wait(state: str, exit_code: int | None, expected: int) -> None:
    assert job_exit_code(state, exit_code) == expected
