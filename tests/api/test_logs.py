"""GET /jobs/{id}/logs against real `jobdock` processes and the real engine.

Live output over server-sent events, resuming by offset or Last-Event-ID, stream filters,
the stored text, and an API replica serving the logs of a job a separate worker runs.
"""

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.support.databases import server_url
from tests.support.service import Service

JsonBody = dict[str, Any]


@pytest.fixture(scope="module")
async def svc(tmp_path_factory: pytest.TempPathFactory, test_image: str) -> AsyncIterator[Service]:
    """One service with workers; retries come quickly."""
    async with Service(
        tmp_path_factory.mktemp("logs"), workers=4, retry_backoff_seconds=0.2
    ) as started:
        yield started


def lines_with_sleeps(count: int, pause: float, stream: str = "") -> list[str]:
    """A shell command printing `line N` `count` times, `pause` seconds apart."""
    redirect = " >&2" if stream == "stderr" else ""
    return [
        "sh",
        "-c",
        f"for i in $(seq 1 {count}); do echo line $i{redirect}; sleep {pause}; done",
    ]


async def follow(
    api: Service,
    job_id: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stop: Callable[[ServerSentEvent], bool] = lambda event: False,
    on_event: Callable[[ServerSentEvent], Any] | None = None,
) -> list[ServerSentEvent]:
    """Follow a job's logs until the `end` event (or `stop` says so); every event, in order."""
    events = []
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=60.0) as client,
        aconnect_sse(
            client,
            "GET",
            f"/jobs/{job_id}/logs",
            params={"follow": "true", **(params or {})},
            headers=dict(headers or {}),
        ) as source,
    ):
        assert source.response.status_code == 200, await source.response.aread()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for event in source.aiter_sse():
            events.append(event)
            if on_event is not None:
                await on_event(event)
            if event.event == "end" or stop(event):
                break
    return events


def logs(events: list[ServerSentEvent]) -> list[JsonBody]:
    chunks: list[JsonBody] = []
    for event in events:
        if event.event == "log":
            chunk = event.json()
            assert event.id == str(chunk["seq"] + 1)
            chunks.append(chunk)
    return chunks


def text(chunks: list[JsonBody], stream: str = "stdout") -> str:
    return "".join(c["text"] for c in chunks if c["stream"] == stream)


def end_of(events: list[ServerSentEvent]) -> JsonBody:
    assert events and events[-1].event == "end", [e.event for e in events]
    body: JsonBody = events[-1].json()
    return body


async def test_output_arrives_while_the_job_runs_and_the_stream_ends_with_it(
    svc: Service, test_image: str
) -> None:
    job = await svc.submit(image=test_image, command=lines_with_sleeps(6, 0.5))
    states_at_first_line: list[str] = []

    async def check_state(event: ServerSentEvent) -> None:
        if event.event == "log" and not states_at_first_line:
            states_at_first_line.append((await svc.get(job["id"]))["state"])

    events = await follow(svc, job["id"], on_event=check_state)
    # The first line came while the job still had seconds of sleeping ahead.
    assert states_at_first_line == ["running"]
    done = await svc.get(job["id"])
    assert done["state"] == "succeeded"
    chunks = logs(events)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) > 1  # written as it came, not at the end
    assert {c["attempt"] for c in chunks} == {1}
    assert text(chunks) == done["stdout"] == "".join(f"line {n}\n" for n in range(1, 7))
    assert end_of(events) == {"state": "succeeded", "exit_code": 0, "error": None}


async def test_a_client_that_reconnects_with_its_last_id_misses_nothing(
    svc: Service, test_image: str
) -> None:
    job = await svc.submit(image=test_image, command=lines_with_sleeps(8, 0.3))
    first = await follow(svc, job["id"], stop=lambda event: event.id == "3")
    assert [e.event for e in first] == ["log"] * 3
    # Resume with the last id as the offset, while the job still runs.
    rest = await follow(svc, job["id"], params={"offset": first[-1].id})
    done = await svc.get(job["id"])
    chunks = logs(first) + logs(rest)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert text(chunks) == done["stdout"] == "".join(f"line {n}\n" for n in range(1, 9))
    assert end_of(rest)["state"] == "succeeded"

    # Last-Event-ID, as a browser's EventSource sends it, wins over the offset in the URL.
    resumed = await follow(
        svc, job["id"], params={"offset": "0"}, headers={"Last-Event-ID": first[1].id}
    )
    assert logs(resumed) == chunks[2:]
    assert end_of(resumed)["state"] == "succeeded"
    # A finished job's stream past its last chunk is only the end.
    past = await follow(svc, job["id"], params={"offset": str(len(chunks) + 5)})
    assert [e.event for e in past] == ["end"]


async def test_stream_filters_one_stream(svc: Service, test_image: str) -> None:
    script = "echo out1; echo err1 >&2; sleep 0.4; echo out2; echo err2 >&2; printf tail >&2"
    job = await svc.submit(image=test_image, command=["sh", "-c", script])
    events = await follow(svc, job["id"], params={"stream": "stderr"})
    done = await svc.get(job["id"])
    chunks = logs(events)
    assert {c["stream"] for c in chunks} == {"stderr"}
    # The unterminated last line is there too.
    assert text(chunks, "stderr") == done["stderr"] == "err1\nerr2\ntail"
    assert end_of(events)["state"] == "succeeded"

    everything = logs(await follow(svc, job["id"]))
    assert text(everything, "stdout") == done["stdout"] == "out1\nout2\n"
    assert text(everything, "stderr") == done["stderr"]
    for stream in ("stdout", "stderr"):
        response = await svc.client.get(f"/jobs/{job['id']}/logs", params={"stream": stream})
        assert response.status_code == 200
        assert response.text == done[stream]


async def test_without_follow_the_stored_text_of_the_latest_attempt(
    svc: Service, test_image: str
) -> None:
    script = "echo hello; sleep 0.4; printf 'no newline, \\xc3\\xa9'"
    done = await svc.run(image=test_image, command=["sh", "-c", script])
    assert done["state"] == "succeeded"
    response = await svc.client.get(f"/jobs/{done['id']}/logs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.text == done["stdout"] == "hello\nno newline, é"
    next_offset = response.headers["Jobdock-Next-Offset"]
    chunks = logs(await follow(svc, done["id"]))
    assert next_offset == str(len(chunks))

    # From the resume point on there is nothing more; from chunk 1 on, the rest.
    again = await svc.client.get(f"/jobs/{done['id']}/logs", params={"offset": next_offset})
    assert (again.text, again.headers["Jobdock-Next-Offset"]) == ("", next_offset)
    rest = await svc.client.get(f"/jobs/{done['id']}/logs", params={"offset": "1"})
    assert rest.text == text(chunks[1:])


async def test_a_retried_job_is_followed_through_its_attempts(
    svc: Service, test_image: str
) -> None:
    job = await svc.submit(
        image=test_image,
        command=["sh", "-c", "sleep 0.3; echo try; exit 3"],
        max_attempts=2,
    )
    events = await follow(svc, job["id"])
    chunks = logs(events)
    assert [(c["attempt"], c["text"]) for c in chunks] == [(1, "try\n"), (2, "try\n")]
    assert end_of(events) == {"state": "failed", "exit_code": 3, "error": None}
    # Without follow: the latest attempt only.
    response = await svc.client.get(f"/jobs/{job['id']}/logs")
    assert response.text == "try\n"
    assert response.headers["Jobdock-Next-Offset"] == "2"


async def test_a_job_cancelled_while_followed_ends_the_stream_with_its_output(
    svc: Service, test_image: str
) -> None:
    job = await svc.submit(image=test_image, command=lines_with_sleeps(100, 0.2))
    cancelled: list[int] = []

    async def cancel_at_second_line(event: ServerSentEvent) -> None:
        if event.event == "log" and event.id == "2" and not cancelled:
            response = await svc.client.post(f"/jobs/{job['id']}/cancel")
            cancelled.append(response.status_code)

    events = await follow(svc, job["id"], on_event=cancel_at_second_line)
    assert cancelled == [202]
    done = await svc.get(job["id"])
    end = end_of(events)
    assert (end["state"], end["error"]) == ("cancelled", done["error"])
    chunks = logs(events)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert text(chunks) == done["stdout"]
    assert done["stdout"].startswith("line 1\nline 2\n")


async def test_a_job_re_attached_after_a_restart_has_its_output_stored_once(
    tmp_path: Path, test_image: str
) -> None:
    # No grace at shutdown: the job's container is left running, and the next service on
    # the same database re-attaches to it and reads its output from the start again.
    first = Service(tmp_path, workers=2, shutdown_grace_seconds=0)
    async with first:
        job = await first.submit(image=test_image, command=lines_with_sleeps(12, 0.3))
        before = await follow(first, job["id"], stop=lambda event: event.id == "2")
        await first.stop()
    assert [e.event for e in before] == ["log", "log"]
    async with Service(tmp_path, workers=2) as second:
        events = await follow(second, job["id"], params={"offset": before[-1].id})
        done = await second.get(job["id"])
    assert "re-attached to its container" in second.log()
    assert done["state"] == "succeeded" and done["attempt"] == 1
    chunks = logs(before) + logs(events)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert text(chunks) == done["stdout"] == "".join(f"line {n}\n" for n in range(1, 13))


async def test_a_queued_job_is_followed_from_before_it_starts(
    tmp_path: Path, test_image: str
) -> None:
    # No workers: the job stays queued, and the stream waits (with no output) meanwhile.
    async with Service(tmp_path, workers=0) as api:
        job = await api.submit(image=test_image, command=["echo", "hi"])
        with pytest.raises(httpx.ReadTimeout):
            async with (
                httpx.AsyncClient(base_url=api.url, timeout=1.5) as client,
                aconnect_sse(
                    client, "GET", f"/jobs/{job['id']}/logs", params={"follow": "true"}
                ) as source,
            ):
                async for event in source.aiter_sse():
                    raise AssertionError(f"an event for a queued job: {event}")
        cancelled = await api.client.post(f"/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        events = await follow(api, job["id"])
        assert end_of(events)["state"] == "cancelled"
        assert logs(events) == []


async def test_unknown_jobs_and_bad_parameters(svc: Service) -> None:
    for job_id in (str(uuid.uuid4()), "not-a-job"):
        for follow_ in ("false", "true"):
            response = await svc.client.get(f"/jobs/{job_id}/logs", params={"follow": follow_})
            assert response.status_code == 404, response.text
            assert response.headers["content-type"] == "application/json"
            assert job_id in response.json()["detail"]
    job_id = str(uuid.uuid4())
    bad: list[dict[str, str]] = [
        {"stream": "both"},
        {"offset": "-1"},
        {"offset": "x"},
        {"offset": str(2**31)},
        {"follow": "maybe"},
    ]
    for params in bad:
        response = await svc.client.get(f"/jobs/{job_id}/logs", params=params)
        assert response.status_code == 422, (params, response.text)
    for last_event_id in ("abc", "-1", str(2**31)):
        response = await svc.client.get(
            f"/jobs/{job_id}/logs", headers={"Last-Event-ID": last_event_id}
        )
        assert response.status_code == 422, response.text


async def test_the_operation_is_documented(svc: Service) -> None:
    spec = (await svc.client.get("/openapi.json")).json()
    operation = spec["paths"]["/jobs/{job_id}/logs"]["get"]
    assert operation["operationId"] == "get_job_logs"
    assert {"200", "404", "422"} <= set(operation["responses"])
    assert set(operation["responses"]["200"]["content"]) == {"text/plain", "text/event-stream"}
    names = {p["name"] for p in operation["parameters"]}
    assert {"job_id", "follow", "stream", "offset", "Last-Event-ID"} <= names


@pytest.mark.skipif(server_url() is None, reason="an API replica and a worker need PostgreSQL")
async def test_an_api_replica_serves_live_logs_of_a_job_another_process_runs(
    tmp_path: Path, test_image: str
) -> None:
    async with (
        Service(tmp_path, command=["serve", "--no-workers"]) as api,
        Service(tmp_path, command=["worker"], workers=2, worker_id="logs-worker"),
    ):
        job = await api.submit(image=test_image, command=lines_with_sleeps(6, 0.5, "stderr"))
        states_at_first_line: list[str] = []

        async def check_state(event: ServerSentEvent) -> None:
            if event.event == "log" and not states_at_first_line:
                states_at_first_line.append((await api.get(job["id"]))["state"])

        events = await follow(api, job["id"], on_event=check_state)
        done = await api.get(job["id"])
    assert states_at_first_line == ["running"]
    chunks = logs(events)
    assert len(chunks) > 1
    assert text(chunks, "stderr") == done["stderr"] == "".join(f"line {n}\n" for n in range(1, 7))
    assert end_of(events) == {"state": "succeeded", "exit_code": 0, "error": None}
    assert json.loads(events[0].data)["attempt"] == 1
