"""The /jobs HTTP contract, against a real `jobdock serve` process with no workers running."""

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.service import Service

MAX_MEMORY_MB = 1024
MAX_TIMEOUT_SECONDS = 3600  # the service's default cap
DIGEST = "sha256:" + "0123456789abcdef" * 4

JsonBody = dict[str, Any]


async def _start(tmp_path_factory: pytest.TempPathFactory, name: str) -> Service:
    # No workers: every job stays queued, so states and counts are exactly what tests made.
    svc = Service(tmp_path_factory.mktemp(name), workers=0, max_memory_mb=MAX_MEMORY_MB)
    await svc.start()
    return svc


@pytest.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """A service for submit, get and cancel tests."""
    svc = await _start(tmp_path_factory, "api")
    yield svc
    await svc.close()


@pytest.fixture(scope="module")
async def rejecting(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    """A service that only ever receives bad input, so it must never hold a job."""
    svc = await _start(tmp_path_factory, "rejecting")
    yield svc
    await svc.close()


@pytest.fixture(scope="module")
async def listing(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Service, list[JsonBody]]]:
    """A service holding exactly 7 jobs, oldest first; the 2nd and 5th are cancelled."""
    svc = await _start(tmp_path_factory, "listing")
    jobs = [await svc.submit(image="busybox", command=["echo", str(n)]) for n in range(7)]
    for index in (1, 4):
        response = await svc.client.post(f"/jobs/{jobs[index]['id']}/cancel")
        assert response.status_code == 200, response.text
        jobs[index] = response.json()
    yield svc, jobs
    await svc.close()


async def send(svc: Service, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on its own connection: a server error must not break the shared client."""
    async with httpx.AsyncClient(base_url=svc.url, timeout=30.0) as client:
        try:
            return await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            pytest.fail(f"{method} {path}: the service dropped the connection ({exc!r})")


async def post_raw(svc: Service, content: str | bytes, content_type: str) -> httpx.Response:
    return await send(svc, "POST", "/jobs", content=content, headers={"content-type": content_type})


async def post_json(svc: Service, body: object) -> httpx.Response:
    # json.dumps escapes every non-ASCII character, so even lone surrogates reach the server.
    return await post_raw(svc, json.dumps(body), "application/json")


def validation_error(response: httpx.Response, loc: tuple[str | int, ...]) -> JsonBody:
    """The 422 entry about `loc`, in FastAPI's shape: [{"loc": [...], "msg": ..., ...}]."""
    assert response.status_code == 422, f"{response.status_code}: {response.text}"
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for entry in detail:
        assert isinstance(entry["msg"], str) and entry["msg"], entry
    matching = [entry for entry in detail if tuple(entry["loc"]) == loc]
    assert matching, f"no error at {list(loc)}: {detail}"
    error: JsonBody = matching[0]
    return error


async def listed(svc: Service, **params: str | int) -> JsonBody:
    response = await svc.client.get("/jobs", params=params)
    assert response.status_code == 200, response.text
    page: JsonBody = response.json()
    return page


async def stored_job_count(svc: Service) -> int:
    response = await send(svc, "GET", "/jobs", params={"limit": 100})
    assert response.status_code == 200, response.text
    items: list[JsonBody] = response.json()["items"]
    return len(items)


def _bad(body: object, loc: tuple[str | int, ...], msg: str, name: str) -> Any:
    return pytest.param(body, loc, msg, id=name)


IMAGE = ("body", "image")
COMMAND = ("body", "command")
ENV = ("body", "env")

BAD_BODIES = [
    # image
    _bad({}, IMAGE, "field required", "image-missing"),
    _bad({"command": ["true"]}, IMAGE, "field required", "image-missing-with-command"),
    _bad({"image": None}, IMAGE, "valid string", "image-null"),
    _bad({"image": 42}, IMAGE, "valid string", "image-not-a-string"),
    _bad({"image": ""}, IMAGE, "must not be empty", "image-empty"),
    _bad({"image": "a" * 256}, IMAGE, "at most 255 characters", "image-256-chars"),
    _bad({"image": "busy box"}, IMAGE, "no spaces", "image-with-space"),
    _bad({"image": " busybox"}, IMAGE, "no spaces", "image-leading-space"),
    _bad({"image": "busybox:1.36 "}, IMAGE, "no spaces", "image-trailing-space"),
    _bad({"image": "busybox\n"}, IMAGE, "not a valid docker image reference", "image-newline"),
    _bad(
        {"image": "busybox:\u00e9t\u00e9"}, IMAGE, "not a valid docker image", "image-unicode-tag"
    ),
    _bad({"image": "\ud800"}, IMAGE, "valid string", "image-lone-surrogate"),
    _bad({"image": "Busybox"}, IMAGE, "lowercase", "image-uppercase"),
    _bad({"image": "Team/app"}, IMAGE, "lowercase", "image-uppercase-namespace"),
    _bad({"image": "library/BusyBox:1.36"}, IMAGE, "lowercase", "image-uppercase-name"),
    _bad({"image": "busybox:"}, IMAGE, "not a valid docker image reference", "image-empty-tag"),
    # command
    _bad({"image": "busybox", "command": "echo hi"}, COMMAND, "valid list", "command-string"),
    _bad({"image": "busybox", "command": {"0": "sh"}}, COMMAND, "valid list", "command-object"),
    _bad({"image": "busybox", "command": [1, 2]}, (*COMMAND, 0), "valid string", "command-ints"),
    _bad(
        {"image": "busybox", "command": ["sh", ["-c"]]},
        (*COMMAND, 1),
        "valid string",
        "command-nested-list",
    ),
    _bad(
        {"image": "busybox", "command": ["echo", None]},
        (*COMMAND, 1),
        "valid string",
        "command-null-argument",
    ),
    _bad({"image": "busybox", "command": []}, COMMAND, "must not be empty", "command-empty"),
    _bad(
        {"image": "busybox", "command": ["echo"] * 257},
        COMMAND,
        "257 arguments; at most 256",
        "command-257-arguments",
    ),
    _bad(
        {"image": "busybox", "command": ["echo", "a\x00b"]},
        COMMAND,
        "argument 1 contains a nul byte",
        "command-nul-byte",
    ),
    # env
    _bad({"image": "busybox", "env": {"1ABC": "x"}}, ENV, "'1abc' is not a valid", "env-digit"),
    _bad({"image": "busybox", "env": {"MY-VAR": "x"}}, ENV, "not a valid variable", "env-dash"),
    _bad({"image": "busybox", "env": {"A=B": "x"}}, ENV, "not a valid variable", "env-equals"),
    _bad({"image": "busybox", "env": {"A B": "x"}}, ENV, "not a valid variable", "env-space"),
    _bad({"image": "busybox", "env": {"": "x"}}, ENV, "not a valid variable", "env-empty-name"),
    _bad({"image": "busybox", "env": {"FOO\n": "x"}}, ENV, "not a valid variable", "env-newline"),
    _bad({"image": "busybox", "env": {"A": 1}}, (*ENV, "A"), "valid string", "env-value-int"),
    _bad({"image": "busybox", "env": {"A": None}}, (*ENV, "A"), "valid string", "env-value-null"),
    _bad({"image": "busybox", "env": ["A=1"]}, ENV, "valid dictionary", "env-list"),
    _bad({"image": "busybox", "env": {"A": "x\x00y"}}, ENV, "contains a nul byte", "env-value-nul"),
    # cpu_shares
    _bad({"image": "busybox", "cpu_shares": 1}, ("body", "cpu_shares"), ">= 2", "cpu-1"),
    _bad({"image": "busybox", "cpu_shares": 0}, ("body", "cpu_shares"), ">= 2", "cpu-0"),
    _bad({"image": "busybox", "cpu_shares": -5}, ("body", "cpu_shares"), ">= 2", "cpu-negative"),
    _bad(
        {"image": "busybox", "cpu_shares": 262145},
        ("body", "cpu_shares"),
        "<= 262144",
        "cpu-262145",
    ),
    _bad(
        {"image": "busybox", "cpu_shares": "abc"},
        ("body", "cpu_shares"),
        "valid integer",
        "cpu-string",
    ),
    _bad(
        {"image": "busybox", "cpu_shares": 1.5},
        ("body", "cpu_shares"),
        "valid integer",
        "cpu-fraction",
    ),
    # memory_mb
    _bad({"image": "busybox", "memory_mb": 5}, ("body", "memory_mb"), ">= 6", "memory-5"),
    _bad({"image": "busybox", "memory_mb": 0}, ("body", "memory_mb"), ">= 6", "memory-0"),
    _bad(
        {"image": "busybox", "memory_mb": MAX_MEMORY_MB + 1},
        ("body", "memory_mb"),
        f"at most {MAX_MEMORY_MB}",
        "memory-above-cap",
    ),
    _bad(
        {"image": "busybox", "memory_mb": 10**30},
        ("body", "memory_mb"),
        f"at most {MAX_MEMORY_MB}",
        "memory-huge",
    ),
    _bad(
        {"image": "busybox", "memory_mb": "lots"},
        ("body", "memory_mb"),
        "valid integer",
        "memory-string",
    ),
    # timeout_seconds
    _bad({"image": "busybox", "timeout_seconds": 0}, ("body", "timeout_seconds"), ">= 1", "t-0"),
    _bad({"image": "busybox", "timeout_seconds": -1}, ("body", "timeout_seconds"), ">= 1", "t-neg"),
    _bad(
        {"image": "busybox", "timeout_seconds": MAX_TIMEOUT_SECONDS + 1},
        ("body", "timeout_seconds"),
        f"at most {MAX_TIMEOUT_SECONDS}",
        "timeout-above-cap",
    ),
    # working_dir
    _bad(
        {"image": "busybox", "working_dir": "tmp"},
        ("body", "working_dir"),
        "absolute path",
        "working-dir-relative",
    ),
    # fields a submitter must never set
    *(
        _bad({"image": "busybox", name: value}, ("body", name), "unknown field", f"extra-{name}")
        for name, value in {
            "privileged": True,
            "binds": ["/:/host"],
            "network_mode": "host",
            "cap_add": ["SYS_ADMIN"],
            "user": "root",
            "state": "succeeded",
            "id": str(uuid.uuid4()),
            "worker_id": "me",
            "attempt": 3,
            "attempts": [],
        }.items()
    ),
    # retries and priority
    _bad({"image": "busybox", "priority": 101}, ("body", "priority"), "<= 100", "priority-101"),
    _bad({"image": "busybox", "priority": -101}, ("body", "priority"), ">= -100", "priority--101"),
    _bad({"image": "busybox", "max_attempts": 0}, ("body", "max_attempts"), ">= 1", "attempts-0"),
    _bad(
        {"image": "busybox", "max_attempts": 11},
        ("body", "max_attempts"),
        "<= 10",
        "attempts-11",
    ),
    _bad(
        {"image": "busybox", "retry_on_exit_codes": [0]},
        ("body", "retry_on_exit_codes"),
        "1..255",
        "retry-code-0",
    ),
    _bad(
        {"image": "busybox", "retry_on_exit_codes": [256]},
        ("body", "retry_on_exit_codes"),
        "1..255",
        "retry-code-256",
    ),
    _bad(
        {"image": "busybox", "retry_on_exit_codes": []},
        ("body", "retry_on_exit_codes"),
        "must not be empty",
        "retry-codes-empty",
    ),
]

# The tolerance of pydantic's own messages: "greater than or equal to 2" is the msg for ">= 2".
_SPELLED = {">= ": "greater than or equal to ", "<= ": "less than or equal to "}


def _spelled(fragment: str) -> str:
    for short, words in _SPELLED.items():
        fragment = fragment.replace(short, words)
    return fragment


@pytest.mark.parametrize(("body", "loc", "message"), BAD_BODIES)
async def test_bad_input_answers_422_naming_the_problem_and_stores_nothing(
    rejecting: Service, body: object, loc: tuple[str | int, ...], message: str
) -> None:
    before = await stored_job_count(rejecting)
    response = await post_json(rejecting, body)
    stored = await stored_job_count(rejecting) - before
    error = validation_error(response, loc)
    assert _spelled(message) in error["msg"].lower(), error
    assert stored == 0


# (name, raw body, content type, a word the message must hold)
MALFORMED: list[tuple[str, str, str, str]] = [
    ("truncated-json", '{"image": "busybox", ', "application/json", "json"),
    ("python-not-json", "{'image': 'busybox'}", "application/json", "json"),
    ("json-array", '[{"image": "busybox"}]', "application/json", "dictionary"),
    ("json-string", '"busybox"', "application/json", "dictionary"),
    ("json-null", "null", "application/json", "dictionary"),
    ("empty-body", "", "application/json", "required"),
    # A body that is not JSON by its type answers 415: tests/api/test_bad_requests.py.
]


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
async def test_malformed_body_answers_422_and_stores_nothing(
    rejecting: Service, content: str, content_type: str, message: str
) -> None:
    before = await stored_job_count(rejecting)
    response = await post_raw(rejecting, content, content_type)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail and detail[0]["loc"][0] == "body", detail
    assert message in detail[0]["msg"].lower(), detail
    assert await stored_job_count(rejecting) == before


async def test_every_problem_of_one_body_is_reported(rejecting: Service) -> None:
    body = {"cpu_shares": 1, "memory_mb": 5, "timeout_seconds": 0, "privileged": True}
    response = await post_json(rejecting, body)
    for field in ("image", "cpu_shares", "memory_mb", "timeout_seconds", "privileged"):
        validation_error(response, ("body", field))


async def test_caps_are_named_together(rejecting: Service) -> None:
    response = await post_json(
        rejecting,
        {"image": "busybox", "memory_mb": MAX_MEMORY_MB * 2, "timeout_seconds": 10**6},
    )
    memory = validation_error(response, ("body", "memory_mb"))
    timeout = validation_error(response, ("body", "timeout_seconds"))
    assert str(MAX_MEMORY_MB) in memory["msg"]
    assert str(MAX_TIMEOUT_SECONDS) in timeout["msg"]


async def test_after_every_bad_input_no_job_is_stored(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A fresh service that sees every bad body and nothing else: the job count must stay 0.
    svc = await _start(tmp_path_factory, "all-bad-inputs")
    try:
        answers: dict[str, int] = {}
        for case in BAD_BODIES:
            body = case.values[0]
            answers[str(case.id)] = (await post_json(svc, body)).status_code
        for name, content, content_type, _ in MALFORMED:
            answers[name] = (await post_raw(svc, content, content_type)).status_code
        page = await listed(svc, limit=100)
        wrongly_answered = {name: code for name, code in answers.items() if code != 422}
        assert wrongly_answered == {}
        assert page["items"] == [], [item["image"] for item in page["items"]]
        assert page["next_cursor"] is None
    finally:
        await svc.close()


FULL_JOB: JsonBody = {
    "image": "busybox:1.36",
    "command": ["sh", "-c", "echo $GREETING"],
    "env": {"GREETING": "hello", "_UNDERSCORE_1": ""},
    "working_dir": "/tmp",
    "cpu_shares": 512,
    "memory_mb": 128,
    "timeout_seconds": 30,
}


async def test_submit_answers_202_with_the_queued_job_and_its_location(api: Service) -> None:
    response = await api.client.post("/jobs", json=FULL_JOB)
    assert response.status_code == 202, response.text
    job = response.json()
    assert {name: job[name] for name in FULL_JOB} == FULL_JOB
    assert job["state"] == "queued"
    assert uuid.UUID(job["id"]).version == 4
    assert job["exit_code"] is None
    assert job["stdout"] == ""
    assert job["stderr"] == ""
    assert job["output_truncated"] is False
    assert job["error"] is None
    assert job["attempt"] == 0
    assert job["cancel_requested"] is False
    assert job["limits"] is None
    assert job["created_at"]
    assert job["started_at"] is None
    assert job["finished_at"] is None

    location = response.headers["location"]
    assert location == f"/jobs/{job['id']}"
    fetched = await api.client.get(location)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == job


async def test_submit_fills_in_defaults(api: Service) -> None:
    job = await api.submit(image="busybox")
    assert job["command"] is None  # the image's own default command
    assert job["env"] == {}
    assert job["working_dir"] is None
    assert job["cpu_shares"] == 1024
    assert job["memory_mb"] == 256
    assert job["timeout_seconds"] == 300
    assert (await api.get(job["id"])) == job


async def test_explicit_nulls_mean_defaults(api: Service) -> None:
    job = await api.submit(
        image="busybox", command=None, cpu_shares=None, memory_mb=None, timeout_seconds=None
    )
    assert job["command"] is None
    assert (job["cpu_shares"], job["memory_mb"], job["timeout_seconds"]) == (1024, 256, 300)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"cpu_shares": 2}, id="cpu-2"),
        pytest.param({"cpu_shares": 262144}, id="cpu-262144"),
        pytest.param({"memory_mb": 6}, id="memory-6"),
        pytest.param({"memory_mb": MAX_MEMORY_MB}, id="memory-at-cap"),
        pytest.param({"timeout_seconds": 1}, id="timeout-1"),
        pytest.param({"priority": -100}, id="priority--100"),
        pytest.param({"priority": 100}, id="priority-100"),
        pytest.param({"max_attempts": 10}, id="attempts-10"),
        pytest.param({"max_attempts": 2, "retry_on_exit_codes": [1, 255]}, id="retry-codes"),
        pytest.param({"timeout_seconds": MAX_TIMEOUT_SECONDS}, id="timeout-at-cap"),
        pytest.param({"command": ["true"] * 256}, id="command-256-arguments"),
        pytest.param({"command": ["printf", "%s", ""]}, id="command-empty-argument"),
        pytest.param({"env": {"_": "x", "a1": "=", "LANG": "\u00e9"}}, id="env-edge-names"),
        pytest.param({"image": "a" * 255}, id="image-255-chars"),
        pytest.param({"image": "busybox:latest"}, id="image-tag"),
        pytest.param({"image": "library/busybox"}, id="image-namespace"),
        pytest.param({"image": "my-org/my_app__x.y"}, id="image-separators"),
        pytest.param({"image": "registry.example.com/team/app:v1_2-3"}, id="image-registry"),
        pytest.param({"image": "localhost/app"}, id="image-localhost"),
        pytest.param({"image": f"busybox@{DIGEST}"}, id="image-digest"),
        pytest.param(
            {"image": f"localhost:5000/team/app:1.2@{DIGEST}"}, id="image-host-port-tag-digest"
        ),
    ],
)
async def test_valid_edge_values_are_accepted(api: Service, fields: JsonBody) -> None:
    body = {"image": "busybox", **fields}
    response = await api.client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert {name: job[name] for name in body} == body
    assert (await api.get(job["id"]))["state"] == "queued"


async def test_get_unknown_job_is_404(api: Service) -> None:
    missing = uuid.uuid4()
    response = await api.client.get(f"/jobs/{missing}")
    assert response.status_code == 404
    assert str(missing) in response.json()["detail"]


@pytest.mark.parametrize("job_id", ["not-a-uuid", "1234", "0" * 33, "%00", "x" * 2000])
async def test_get_malformed_id_is_404(api: Service, job_id: str) -> None:
    response = await api.client.get(f"/jobs/{job_id}")
    assert response.status_code == 404, response.text
    assert "no job" in response.json()["detail"]


async def test_cancel_queued_job_then_again(api: Service) -> None:
    job = await api.submit(image="busybox", command=["echo", "never"])

    response = await api.client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["id"] == job["id"]
    assert cancelled["state"] == "cancelled"
    assert "cancel" in cancelled["error"]
    assert cancelled["finished_at"] is not None
    assert cancelled["exit_code"] is None
    assert await api.get(job["id"]) == cancelled

    again = await api.client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409, again.text
    assert "already finished" in again.json()["detail"]
    assert "cancelled" in again.json()["detail"]
    assert (await api.get(job["id"]))["state"] == "cancelled"


async def test_cancel_unknown_job_is_404(api: Service) -> None:
    missing = uuid.uuid4()
    response = await api.client.post(f"/jobs/{missing}/cancel")
    assert response.status_code == 404
    assert str(missing) in response.json()["detail"]
    response = await api.client.post("/jobs/not-a-uuid/cancel")
    assert response.status_code == 404
    assert "not-a-uuid" in response.json()["detail"]


async def test_list_is_newest_first_without_output(listing: tuple[Service, list[JsonBody]]) -> None:
    svc, jobs = listing
    page = await listed(svc)
    assert [item["id"] for item in page["items"]] == [job["id"] for job in reversed(jobs)]
    assert page["next_cursor"] is None
    for item in page["items"]:
        assert "stdout" not in item
        assert "stderr" not in item
        assert item["image"] == "busybox"
        assert item["state"] in ("queued", "cancelled")


async def test_cursor_walks_every_job_once(listing: tuple[Service, list[JsonBody]]) -> None:
    svc, jobs = listing
    seen: list[str] = []
    sizes: list[int] = []
    params: dict[str, str | int] = {"limit": 3}
    while True:
        page = await listed(svc, **params)
        sizes.append(len(page["items"]))
        seen.extend(item["id"] for item in page["items"])
        if page["next_cursor"] is None:
            break
        assert isinstance(page["next_cursor"], str)
        params = {"limit": 3, "cursor": page["next_cursor"]}
        assert len(sizes) <= len(jobs), "pagination does not end"
    assert sizes == [3, 3, 1]
    assert seen == [job["id"] for job in reversed(jobs)]


async def test_limit_bounds(listing: tuple[Service, list[JsonBody]]) -> None:
    svc, jobs = listing
    one = await listed(svc, limit=1)
    assert [item["id"] for item in one["items"]] == [jobs[-1]["id"]]
    assert one["next_cursor"] is not None
    assert len((await listed(svc, limit=100))["items"]) == len(jobs)
    for bad in (0, 101, -1):
        response = await svc.client.get("/jobs", params={"limit": bad})
        error = validation_error(response, ("query", "limit"))
        assert ("1" if bad < 1 else "100") in error["msg"]
    response = await svc.client.get("/jobs", params={"limit": "many"})
    assert "valid integer" in validation_error(response, ("query", "limit"))["msg"]


async def test_state_filter(listing: tuple[Service, list[JsonBody]]) -> None:
    svc, jobs = listing
    cancelled = await listed(svc, state="cancelled")
    assert [item["id"] for item in cancelled["items"]] == [jobs[4]["id"], jobs[1]["id"]]
    queued = await listed(svc, state="queued")
    expected = [job["id"] for job in reversed(jobs) if job["state"] == "queued"]
    assert len(expected) == 5
    assert [item["id"] for item in queued["items"]] == expected
    assert (await listed(svc, state="running"))["items"] == []

    first = await listed(svc, state="queued", limit=3)
    assert first["next_cursor"] is not None
    rest = await listed(svc, state="queued", limit=3, cursor=first["next_cursor"])
    assert [item["id"] for item in first["items"] + rest["items"]] == expected
    assert rest["next_cursor"] is None


async def test_unknown_state_is_422(listing: tuple[Service, list[JsonBody]]) -> None:
    svc, _ = listing
    response = await svc.client.get("/jobs", params={"state": "exploded"})
    error = validation_error(response, ("query", "state"))
    assert "queued" in error["msg"]


def _cursor(created_at: str, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("garbage", id="garbage"),
        pytest.param("garbage!!", id="garbage-punctuation"),
        pytest.param("\u00e9", id="non-ascii"),
        pytest.param(base64.urlsafe_b64encode(b'{"a": 1}').decode(), id="json-object"),
        pytest.param(_cursor("yesterday", uuid.uuid4().hex), id="bad-date"),
        pytest.param(_cursor("2024-01-01T00:00:00", uuid.uuid4().hex), id="naive-date"),
        pytest.param(_cursor("2024-01-01T00:00:00+00:00", "nope"), id="bad-id"),
        pytest.param(_cursor("0001-01-01T00:00:00+05:00", uuid.uuid4().hex), id="year-1-east"),
        pytest.param(_cursor("9999-12-31T23:59:59-05:00", uuid.uuid4().hex), id="year-9999-west"),
    ],
)
async def test_bad_cursor_is_422(listing: tuple[Service, list[JsonBody]], cursor: str) -> None:
    svc, _ = listing
    response = await send(svc, "GET", "/jobs", params={"cursor": cursor})
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["query", "cursor"]
    assert "cursor" in error["msg"]


async def test_overlong_cursor_is_422(listing: tuple[Service, list[JsonBody]]) -> None:
    svc, _ = listing
    response = await svc.client.get("/jobs", params={"cursor": "a" * 513})
    assert "512" in validation_error(response, ("query", "cursor"))["msg"]


async def test_openapi_names_every_operation(api: Service) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    operations = {
        path: {method: op["operationId"] for method, op in methods.items()}
        for path, methods in spec["paths"].items()
    }
    assert operations["/jobs"] == {"post": "submit_job", "get": "list_jobs"}
    assert operations["/jobs/{job_id}"] == {"get": "get_job", "delete": "delete_job"}
    assert operations["/jobs/batch"] == {"post": "submit_jobs"}
    assert operations["/jobs/{job_id}/logs"] == {"get": "get_job_logs"}
    assert operations["/jobs/{job_id}/cancel"] == {"post": "cancel_job"}
    submit = spec["paths"]["/jobs"]["post"]
    assert "202" in submit["responses"]
    schemas = spec["components"]["schemas"]
    assert schemas["JobCreate"]["required"] == ["image"]
    assert schemas["JobCreate"]["additionalProperties"] is False
