"""app.api.hot answers plain GET /jobs/{id} and POST /jobs ahead of FastAPI's routing: every
answer must be the one the routes give. Each case here is sent to two apps on databases in
the same state, one with the hot path and one without (every request through the router),
and the answers compared: status, headers, body (ids and instants aside, which differ)."""

import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from app.api import hot
from app.auth import hash_key
from app.db import create_engine, create_session_factory, upgrade_to_head
from app.main import create_app
from app.settings import Settings
from app.store import keys as key_store
from tests.support.databases import database_url_for

IMAGE = "busybox:latest"
KEY = "jd_hot_routes_test_key"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
INSTANT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")


@asynccontextmanager
async def serving(
    tmp_path: Path,
    name: str,
    *,
    hot_path: bool,
    with_key: bool,
    root_path: str = "",
    **settings: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    directory = tmp_path / name
    directory.mkdir()
    url = await database_url_for(directory)
    if with_key:
        engine = create_engine(url)
        await upgrade_to_head(engine)
        async with create_session_factory(engine)() as session:
            await key_store.create_key(session=session, name="caller", key_hash=hash_key(KEY))
        await engine.dispose()
    app = create_app(
        Settings(database_url=url, allowed_images=["busybox*"], **settings), run_workers=False
    )
    if not hot_path:
        app.user_middleware = [
            m for m in app.user_middleware if cast(Any, m.cls) is not hot.HotRoutes
        ]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def _normalized(text: str) -> str:
    return INSTANT.sub("<instant>", UUID.sub("<id>", text))


def _answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], Any]:
    headers = [(k, _normalized(v)) for k, v in response.headers.items() if k != "content-length"]
    try:
        body: Any = json.loads(_normalized(response.text))
    except ValueError:
        body = response.text
    return response.status_code, headers, body


def job(**fields: Any) -> dict[str, Any]:
    return {"image": IMAGE, "command": ["echo", "hi"], **fields}


async def first_job_id(client: httpx.AsyncClient) -> str:
    """The id of a job submitted with a key (so it takes the route, in both apps)."""
    response = await client.post("/jobs", json=job(), headers={"Idempotency-Key": "first"})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


RAW_POSTS: dict[str, bytes] = {
    "valid": json.dumps(job(labels={"team": "ml"}, env={"A": "b"}, priority=3)).encode(),
    "every field": json.dumps(
        job(
            working_dir="/tmp",
            cpu_shares=512,
            cpus=0.5,
            memory_mb=64,
            timeout_seconds=30,
            max_attempts=2,
            retry_on_exit_codes=[75],
            callback_url="https://example.com/hook",
            stdin="input\n",
        )
    ).encode(),
    "no image": b'{"command": ["true"]}',
    "unknown field": json.dumps(job(colour="red")).encode(),
    "empty command": json.dumps(job(command=[])).encode(),
    "wrong type": json.dumps(job(priority="high")).encode(),
    "number as string": json.dumps(job(priority="3")).encode(),
    "image not allowed": json.dumps(job(image="alpine")).encode(),
    "over the memory cap": json.dumps(job(memory_mb=10**6)).encode(),
    "lone surrogate": b'{"image": "busybox:latest", "command": ["echo", "\\ud800"]}',
    "escaped unicode": b'{"image": "busybox:latest", "command": ["echo", "\\u00e9\\ud83d\\ude00"]}',
    "not json": b"{not json",
    "array": b"[]",
    "null": b"null",
    "empty": b"",
    "trailing data": b'{"image": "busybox:latest"} x',
    "big integer": json.dumps(job(priority=10**30)).encode(),
    "float for int": json.dumps(job(timeout_seconds=5.0)).encode(),
    "fractional float for int": json.dumps(job(timeout_seconds=5.5)).encode(),
}


Send = Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]


def _post(body: bytes, **headers: str) -> Send:
    async def send(client: httpx.AsyncClient, _job_id: str) -> httpx.Response:
        return await client.post(
            "/jobs", content=body, headers={"Content-Type": "application/json", **headers}
        )

    return send


def _get(path: str, method: str = "GET", **params: Any) -> Send:
    """`path` with `{id}` for the id of a job that exists."""

    async def send(client: httpx.AsyncClient, job_id: str) -> httpx.Response:
        url = path.format(id=job_id, unknown=uuid.uuid4())
        return await client.request(method, url, params=params or None)

    return send


CASES: dict[str, Send] = {
    **{f"POST {name}": _post(body) for name, body in RAW_POSTS.items()},
    "POST with an Idempotency-Key": _post(RAW_POSTS["valid"], **{"Idempotency-Key": "k"}),
    "POST with a bad Idempotency-Key": _post(RAW_POSTS["valid"], **{"Idempotency-Key": "a b"}),
    "GET a job": _get("/jobs/{id}"),
    "GET an unknown id": _get("/jobs/{unknown}"),
    "GET an id that is no UUID": _get("/jobs/nope"),
    "GET a job with wait": _get("/jobs/{id}", wait=0),
    "GET a job with a bad wait": _get("/jobs/{id}", wait="soon"),
    "HEAD a job": _get("/jobs/{id}", "HEAD"),
    "GET a job's path with a slash": _get("/jobs/{id}/"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_key", [False, True], ids=["open", "keys"])
async def test_the_hot_path_answers_as_the_routes_do(
    tmp_path: Path, case: str, with_key: bool
) -> None:
    answers = []
    for hot_path in (True, False):
        name = f"{'hot' if hot_path else 'routed'}"
        async with serving(tmp_path, name, hot_path=hot_path, with_key=with_key) as client:
            if with_key:
                client.headers["Authorization"] = f"Bearer {KEY}"
            job_id = await first_job_id(client)
            send = CASES[case]
            answers.append(_answer(await send(client, job_id)))
            if with_key:
                # Without the key, and with a wrong one: the same 401s.
                del client.headers["Authorization"]
                answers.append(_answer(await send(client, job_id)))
                client.headers["Authorization"] = "Bearer jd_wrong"
                answers.append(_answer(await send(client, job_id)))
            # What was stored: the job list is the same.
            client.headers["Authorization"] = f"Bearer {KEY}"
            answers.append(_answer(await client.get("/jobs")))
    half = len(answers) // 2
    assert answers[:half] == answers[half:]


async def test_the_hot_path_answers_a_full_queue_and_a_root_path_as_the_routes_do(
    tmp_path: Path,
) -> None:
    answers = []
    for hot_path in (True, False):
        name = "hot" if hot_path else "routed"
        async with serving(
            tmp_path, name, hot_path=hot_path, with_key=False, max_queued=2, root_path="/api"
        ) as client:
            posted = [await client.post("/api/jobs", json=job()) for _ in range(3)]
            answers += [_answer(response) for response in posted]
            answers.append(_answer(await client.get(f"/api/jobs/{posted[0].json()['id']}")))
    assert [status for status, _, _ in answers[:4]] == [202, 202, 503, 200]
    assert ("location", "/api/jobs/<id>") in answers[0][1]
    assert answers[:4] == answers[4:]


async def test_hot_requests_are_counted_by_their_route(tmp_path: Path) -> None:
    async with serving(tmp_path, "hot", hot_path=True, with_key=False) as client:
        job_id = (await client.post("/jobs", json=job())).json()["id"]
        await client.get(f"/jobs/{job_id}")
        await client.get(f"/jobs/{uuid.uuid4()}")
        metrics = (await client.get("/metrics")).text
    for line in (
        'jobdock_http_requests_total{method="POST",route="/jobs",status="202"} 1.0',
        'jobdock_http_requests_total{method="GET",route="/jobs/{job_id}",status="200"} 1.0',
        'jobdock_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"} 1.0',
        "jobdock_jobs_submitted_total 1.0",
    ):
        assert line in metrics
