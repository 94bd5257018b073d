"""Bad input of every kind gets a clean 4xx from a real `jobdock serve`, never a 5xx, and
changes nothing: request size (413), content type (415), JSON that would break the parser,
malformed ids and SQL metacharacters in filters (issue 5)."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.support.service import Service

MAX_REQUEST_BYTES = 256 * 1024
JSON = {"content-type": "application/json"}
JOB_ID = "5d10258b-554b-495e-80b2-acfecb23ee0b"  # a well-formed id no job has


class Case:
    """One bad request and the status it must get."""

    def __init__(self, name: str, status: int, method: str, path: str, **request: Any) -> None:
        self.name, self.status, self.method, self.path, self.request = (
            name,
            status,
            method,
            path,
            request,
        )

    def param(self) -> Any:
        return pytest.param(self, id=self.name)


def raw(
    name: str,
    status: int,
    content: bytes,
    content_type: str | None = "application/json",
    path: str = "/jobs",
) -> Case:
    headers = {"content-type": content_type} if content_type is not None else {}
    return Case(name, status, "POST", path, content=content, headers=headers)


def body(name: str, status: int, value: Any, path: str = "/jobs") -> Case:
    # json.dumps escapes every non-ASCII character, so lone surrogates reach the server.
    return raw(name, status, json.dumps(value).encode(), path=path)


async def chunks(size: int) -> AsyncIterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (no Content-Length)."""
    yield b'{"image": "busybox", "stdin": "'
    sent = 0
    while sent < size:
        yield b"x" * 65536
        sent += 65536
    yield b'"}'


STRING_FIELDS: dict[str, Any] = {
    "image": lambda s: {"image": s},
    "command": lambda s: {"image": "busybox", "command": ["echo", s]},
    "env-name": lambda s: {"image": "busybox", "env": {s: "x"}},
    "env-value": lambda s: {"image": "busybox", "env": {"A": s}},
    "working_dir": lambda s: {"image": "busybox", "working_dir": "/tmp/" + s},
    "label-key": lambda s: {"image": "busybox", "labels": {s: "x"}},
    "label-value": lambda s: {"image": "busybox", "labels": {"team": s}},
    "callback_url": lambda s: {"image": "busybox", "callback_url": "http://example.com/" + s},
    "stdin": lambda s: {"image": "busybox", "stdin": s},
}


def nested(depth: int) -> bytes:
    return b'{"image": "busybox", "labels": ' + b"[" * depth + b"]" * depth + b"}"


BODY_CASES = [
    # size: 413, whether the length is declared or the body is chunked
    body("body-over-limit", 413, {"image": "busybox", "stdin": "x" * MAX_REQUEST_BYTES}),
    Case(
        "chunked-body-over-limit",
        413,
        "POST",
        "/jobs",
        content=chunks(MAX_REQUEST_BYTES),
        headers=JSON,
    ),
    body(
        "batch-over-limit",
        413,
        {"jobs": [{"image": "busybox", "stdin": "x" * 4096}] * 100},
        path="/jobs/batch",
    ),
    # content type: 415 for any body that is not JSON
    raw("text-plain", 415, b'{"image": "busybox"}', "text/plain"),
    raw("form-urlencoded", 415, b"image=busybox", "application/x-www-form-urlencoded"),
    raw("multipart", 415, b"--x\r\n\r\nbusybox\r\n--x--", "multipart/form-data; boundary=x"),
    raw("xml", 415, b"<job><image>busybox</image></job>", "application/xml"),
    raw("no-content-type", 415, b'{"image": "busybox"}', None),
    raw("json-lookalike-type", 415, b'{"image": "busybox"}', "application/jsonx"),
    raw("batch-text-plain", 415, b'{"jobs": []}', "text/plain", path="/jobs/batch"),
    # +json types are JSON: parsed, and refused for what they say
    raw("vendor-json-type-empty-object", 422, b"{}", "application/vnd.jobdock+json"),
    # JSON that would break the parser: 422 in FastAPI's shape, before pydantic
    raw("100k-deep-arrays", 422, b"[" * 100_000),
    raw("50k-deep-objects", 422, b'{"a":' * 50_000),
    raw("33-deep-labels", 422, nested(33)),
    raw("priority-5000-digits", 422, b'{"image": "busybox", "priority": ' + b"9" * 5000 + b"}"),
    raw("priority-minus-5000-digits", 422, b'{"image":"busybox","priority":-' + b"9" * 5000 + b"}"),
    raw("priority-1e999999", 422, b'{"image": "busybox", "priority": 1e999999}'),
    raw("memory-minus-1e999999", 422, b'{"image": "busybox", "memory_mb": -1e999999}'),
    raw("priority-NaN", 422, b'{"image": "busybox", "priority": NaN}'),
    raw("priority-Infinity", 422, b'{"image": "busybox", "priority": Infinity}'),
    raw("priority-1e308", 422, b'{"image": "busybox", "priority": 1e308}'),
    raw("invalid-utf8", 422, b'{"image": "busy\xffbox"}'),
    raw("utf16-body", 422, '{"image": "busybox"}'.encode("utf-16")),
    raw("raw-nul-in-string", 422, b'{"image": "busy\x00box"}'),
    raw("nul-between-tokens", 422, b'{"image": "busybox"}\x00'),
    raw("duplicate-key", 422, b'{"image": "busybox", "image": "evil"}'),
    raw("duplicate-nested-key", 422, b'{"image": "busybox", "env": {"A": "1", "A": "2"}}'),
    raw("trailing-garbage", 422, b'{"image": "busybox"} {"image": "busybox"}'),
    raw("empty-json", 422, b""),
    # booleans and strings are not JSON integers
    body("priority-true", 422, {"image": "busybox", "priority": True}),
    body("priority-string", 422, {"image": "busybox", "priority": "5"}),
    body("exit-codes-true", 422, {"image": "busybox", "retry_on_exit_codes": [True]}),
    # a NUL and a lone surrogate in every string field
    *(body(f"nul-in-{name}", 422, make("a\x00b")) for name, make in STRING_FIELDS.items()),
    *(body(f"surrogate-in-{name}", 422, make("a\ud800b")) for name, make in STRING_FIELDS.items()),
    *(
        body(f"low-surrogate-in-{name}", 422, make("\udc00"))
        for name, make in STRING_FIELDS.items()
    ),
    # batches
    body("batch-101-jobs", 422, {"jobs": [{"image": "busybox"}] * 101}, path="/jobs/batch"),
    body("batch-one-bad", 422, {"jobs": [{"image": "busybox"}, {"image": ""}]}, path="/jobs/batch"),
    body("batch-not-a-list", 422, {"jobs": {"image": "busybox"}}, path="/jobs/batch"),
    Case(
        "bad-idempotency-key",
        422,
        "POST",
        "/jobs",
        json={"image": "busybox"},
        headers={"Idempotency-Key": "has space"},
    ),
    # methods the API does not have
    Case("put-jobs", 405, "PUT", "/jobs", json={"image": "busybox"}),
    Case("patch-job", 405, "PATCH", f"/jobs/{JOB_ID}", json={"state": "succeeded"}),
]

MALFORMED_IDS = {
    "not-a-uuid": "not-a-uuid",
    "nul": "%00",
    "nul-in-uuid": JOB_ID[:8] + "%00" + JOB_ID[8:],
    "dot-dot-slash": "..%2f..%2fetc%2fpasswd",
    "dot-dot": "..",
    "invalid-utf8": "%ff%fe",
    "lone-surrogate": "%ed%a0%80",
    "sql": "1%27%20OR%20%271%27%3D%271",
    "uuid-with-suffix": JOB_ID + "x",
    "10k-chars": "x" * 10_000,
    "unknown-uuid": JOB_ID,
}
ID_ROUTES = [
    ("GET", "/jobs/{}"),
    ("GET", "/jobs/{}?wait=1"),
    ("GET", "/jobs/{}/logs"),
    ("GET", "/jobs/{}/logs?follow=true"),
    ("DELETE", "/jobs/{}"),
    ("POST", "/jobs/{}/cancel"),
]
ID_CASES = [
    Case(f"{method} {route.format('ID')} {name}", 404, method, route.format(raw_id))
    for name, raw_id in MALFORMED_IDS.items()
    for method, route in ID_ROUTES
]

SQL = ["' OR '1'='1", '"; DROP TABLE job; --', "%", "_", "\\", "*", "busybox' --", "'; --"]
# Filters that name nothing: an empty page, never a 5xx and never every job.
EMPTY_FILTERS = [
    *({"image": value} for value in SQL),
    *({"label": f"team:{value}"} for value in SQL),
    {"label": ["team:x", "team2:' OR 1=1"]},
]
FILTER_CASES = [
    *(Case(f"state-{value}", 422, "GET", "/jobs", params={"state": value}) for value in SQL),
    *(Case(f"cursor-{value}", 422, "GET", "/jobs", params={"cursor": value}) for value in SQL),
    *(
        Case(f"label-key-{value}", 422, "GET", "/jobs", params={"label": f"{value}:x"})
        for value in SQL
    ),
    Case("image-nul", 422, "GET", "/jobs", params={"image": "busybox\x00"}),
    Case("label-nul", 422, "GET", "/jobs", params={"label": "team:a\x00"}),
    Case("cursor-nul", 422, "GET", "/jobs", params={"cursor": "\x00"}),
    Case("state-nul", 422, "GET", "/jobs", params={"state": "queued\x00"}),
    Case("limit-sql", 422, "GET", "/jobs", params={"limit": "1; DROP TABLE job"}),
    Case("limit-huge", 422, "GET", "/jobs", params={"limit": "9" * 5000}),
    Case("created-after-sql", 422, "GET", "/jobs", params={"created_after": "' OR 1=1"}),
    Case("wait-nan", 422, "GET", f"/jobs/{JOB_ID}", params={"wait": "nan"}),
    Case("wait-huge", 422, "GET", f"/jobs/{JOB_ID}", params={"wait": "1e999999"}),
    Case("logs-offset-huge", 422, "GET", f"/jobs/{JOB_ID}/logs", params={"offset": "9" * 5000}),
    Case("logs-stream-sql", 422, "GET", f"/jobs/{JOB_ID}/logs", params={"stream": "' OR 1=1"}),
]

ALL_CASES = BODY_CASES + ID_CASES + FILTER_CASES


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """No workers: the one job stored here stays queued, so any change would show."""
    svc = Service(
        tmp_path_factory.mktemp("bad-requests"), workers=0, max_request_bytes=MAX_REQUEST_BYTES
    )
    await svc.start()
    await svc.submit(image="busybox", labels={"team": "ml"}, command=["echo", "kept"])
    yield svc
    await svc.close()


async def send(svc: Service, case: Case) -> httpx.Response:
    """One request on its own connection, so a dropped one shows up as a failure here."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=30.0) as client:
        try:
            return await client.request(case.method, case.path, **case.request)
        except httpx.TransportError as exc:
            pytest.fail(f"{case.name}: the service dropped the connection ({exc!r})")


def assert_clean(case: Case, response: httpx.Response) -> None:
    assert response.status_code == case.status, (
        f"{case.name}: {response.status_code} {response.text[:500]}"
    )
    assert response.headers["content-type"].startswith("application/json"), response.headers
    detail = response.json()["detail"]
    if response.status_code == 422:
        assert isinstance(detail, list) and detail, detail
        for entry in detail:
            assert isinstance(entry["loc"], list) and isinstance(entry["msg"], str), entry
    else:
        assert isinstance(detail, str) and detail, detail


async def stored(svc: Service) -> list[dict[str, Any]]:
    response = await svc.client.get("/jobs", params={"limit": 100})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


@pytest.mark.parametrize("case", [case.param() for case in ALL_CASES])
async def test_bad_request_gets_a_clean_4xx(service: Service, case: Case) -> None:
    if case.name == "chunked-body-over-limit":
        case.request["content"] = chunks(MAX_REQUEST_BYTES)  # a generator is used up once
    assert_clean(case, await send(service, case))


@pytest.mark.parametrize("params", EMPTY_FILTERS, ids=lambda p: json.dumps(p))
async def test_sql_metacharacters_in_filters_match_nothing(
    service: Service, params: dict[str, Any]
) -> None:
    response = await service.client.get("/jobs", params=params)
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "next_cursor": None}


async def test_413_is_decided_by_content_length_before_the_body_is_read(service: Service) -> None:
    # Announce a gigabyte and send none of it: the answer must come at once.
    reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
    try:
        writer.write(
            b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413 "), head


async def test_json_charset_and_plus_json_are_accepted(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    svc = Service(tmp_path_factory.mktemp("json-types"), workers=0)
    async with svc:
        for content_type in ("application/json; charset=utf-8", "application/vnd.x+json"):
            response = await svc.client.post(
                "/jobs", content=b'{"image": "busybox"}', headers={"content-type": content_type}
            )
            assert response.status_code == 202, (content_type, response.text)
        # A job with the largest stdin fits the default body limit, even escaped.
        stdin = "\u00e9" * (Settings().stdin_max_bytes // 2)
        response = await svc.client.post("/jobs", json={"image": "busybox", "stdin": stdin})
        assert response.status_code == 202, response.text[:300]


def test_default_body_limit_admits_the_largest_stdin_escaped() -> None:
    settings = Settings()
    # json.dumps escapes a 3-byte character as 6 bytes and a 4-byte one as 12.
    assert settings.max_request_bytes > 3 * settings.stdin_max_bytes


async def test_after_every_bad_request_the_jobs_are_unchanged(service: Service) -> None:
    before = await stored(service)
    assert len(before) == 1
    answers = {}
    for case in ALL_CASES:
        if case.name == "chunked-body-over-limit":
            case.request["content"] = chunks(MAX_REQUEST_BYTES)
        answers[case.name] = (await send(service, case)).status_code
    wrong = {
        name: code
        for name, code in answers.items()
        if code != next(c.status for c in ALL_CASES if c.name == name)
    }
    assert wrong == {}
    assert await stored(service) == before
    health = await service.client.get("/healthz")
    assert health.status_code == 200
    assert "Traceback" not in service.log()
