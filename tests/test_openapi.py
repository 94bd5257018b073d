"""The OpenAPI contract of a running service: a valid spec, stable operation ids, documented
errors and examples, and a client generated from it that runs, waits for, reads and cancels
real jobs."""

import asyncio
import importlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from tests.support.service import Service

pytestmark = pytest.mark.docker

# Every operation of the public contract, by its operationId.
OPERATIONS = {
    "submit_job": ("post", "/jobs"),
    "submit_jobs": ("post", "/jobs/batch"),
    "list_jobs": ("get", "/jobs"),
    "get_job": ("get", "/jobs/{job_id}"),
    "cancel_job": ("post", "/jobs/{job_id}/cancel"),
    "delete_job": ("delete", "/jobs/{job_id}"),
    "get_job_logs": ("get", "/jobs/{job_id}/logs"),
}
# The error answers each operation can give, and so must document.
EXPECTED_ERRORS = {
    "submit_job": {"401", "422", "429", "503"},
    "submit_jobs": {"401", "422", "429", "503"},
    "list_jobs": {"401", "422"},
    "get_job": {"401", "404", "422"},
    "cancel_job": {"401", "404", "409"},
    "delete_job": {"401", "404", "409"},
    "get_job_logs": {"401", "404", "422"},
}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
PACKAGE = "jobdock_client"
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


@pytest.fixture(scope="module")
async def spec(service: Service) -> dict[str, Any]:
    response = await service.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def operations(spec: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """operationId -> (method, path, operation) for every operation in the spec."""
    found: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                found[operation.get("operationId", f"{method} {path}")] = (method, path, operation)
    return found


def operation(spec: dict[str, Any], operation_id: str) -> dict[str, Any]:
    found = operations(spec)
    if operation_id not in found:
        pytest.fail(f"the spec has no operation {operation_id!r}; it has {sorted(found)}")
    return found[operation_id][2]


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow `$ref`s into #/components until a schema of its own."""
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def schema_errors(spec: dict[str, Any], schema: dict[str, Any], instance: Any) -> list[str]:
    """Why `instance` does not match `schema` (which may $ref into the spec's components)."""
    validator = OAS31Validator({**schema, "components": spec.get("components", {})})
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


# --- the document -------------------------------------------------------------------


async def test_spec_passes_the_openapi_validator(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.")
    validate_spec(spec)


@pytest.mark.parametrize("operation_id", sorted(OPERATIONS))
async def test_operation_ids_are_stable(spec: dict[str, Any], operation_id: str) -> None:
    method, path = OPERATIONS[operation_id]
    found = operations(spec)
    assert operation_id in found, f"no operation {operation_id!r}; the spec has {sorted(found)}"
    assert found[operation_id][:2] == (method, path)


async def test_every_operation_has_an_explicit_unique_id(spec: dict[str, Any]) -> None:
    ids = [
        op.get("operationId")
        for item in spec["paths"].values()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]
    assert None not in ids
    assert len(ids) == len(set(ids))
    # FastAPI's generated ids look like "get_job_jobs__job_id__get"; ours are chosen.
    assert not [i for i in ids if i and i.endswith(("_get", "_post", "_delete"))], ids


@pytest.mark.parametrize("operation_id", sorted(EXPECTED_ERRORS))
async def test_errors_are_documented_with_a_schema(spec: dict[str, Any], operation_id: str) -> None:
    responses = operation(spec, operation_id)["responses"]
    missing = EXPECTED_ERRORS[operation_id] - set(responses)
    assert not missing, f"{operation_id} does not document {sorted(missing)}"
    for code, response in responses.items():
        if not code.startswith(("4", "5")):
            continue
        content = response.get("content", {})
        assert "application/json" in content, f"{operation_id} {code} has no JSON body"
        schema = resolve(spec, content["application/json"].get("schema", {}))
        assert "detail" in schema.get("properties", {}), f"{operation_id} {code}: {schema}"
        assert response.get("description"), f"{operation_id} {code} has no description"


async def test_queue_full_documents_retry_after(spec: dict[str, Any]) -> None:
    for operation_id in ("submit_job", "submit_jobs"):
        for code in ("503", "429"):
            answer = operation(spec, operation_id)["responses"][code]
            assert "Retry-After" in answer.get("headers", {}), (operation_id, code)


async def test_every_job_operation_takes_a_bearer_key(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    bearer = [name for name, scheme in schemes.items() if scheme.get("scheme") == "bearer"]
    assert bearer, schemes
    for operation_id in OPERATIONS:
        security = operation(spec, operation_id).get("security", [])
        assert any(bearer[0] in requirement for requirement in security), operation_id


@pytest.mark.parametrize("operation_id", ["submit_job", "submit_jobs"])
async def test_request_bodies_carry_valid_examples(spec: dict[str, Any], operation_id: str) -> None:
    body = operation(spec, operation_id)["requestBody"]["content"]["application/json"]
    schema = body["schema"]
    examples = list(resolve(spec, schema).get("examples", []))
    examples += [example["value"] for example in body.get("examples", {}).values()]
    if "example" in body:
        examples.append(body["example"])
    assert examples, f"the request body of {operation_id} has no example"
    for example in examples:
        assert not schema_errors(spec, schema, example), example


async def test_job_submission_documents_every_field(spec: dict[str, Any]) -> None:
    schema = resolve(spec, {"$ref": "#/components/schemas/JobCreate"})
    assert set(schema["properties"]) >= {
        "image",
        "command",
        "env",
        "working_dir",
        "cpu_shares",
        "memory_mb",
        "timeout_seconds",
        "priority",
        "max_attempts",
        "retry_on_exit_codes",
        "labels",
        "callback_url",
        "stdin",
    }
    assert schema["required"] == ["image"]
    assert schema.get("additionalProperties") is False


async def test_query_parameters_of_the_contract(spec: dict[str, Any]) -> None:
    def names(operation_id: str) -> set[str]:
        return {p["name"] for p in operation(spec, operation_id).get("parameters", [])}

    assert names("list_jobs") >= {
        "state",
        "label",
        "image",
        "created_after",
        "created_before",
        "limit",
        "cursor",
    }
    assert "wait" in names("get_job")
    assert names("get_job_logs") >= {"follow", "stream", "offset"}
    assert "Idempotency-Key" in names("submit_job")


async def test_logs_are_documented_as_text_and_event_stream(spec: dict[str, Any]) -> None:
    content = operation(spec, "get_job_logs")["responses"]["200"]["content"]
    assert "text/plain" in content
    assert "text/event-stream" in content


# --- what the service answers matches what the spec says ------------------------------


def documented_schema(spec: dict[str, Any], operation_id: str, status: int) -> dict[str, Any]:
    responses = operation(spec, operation_id)["responses"]
    assert str(status) in responses, f"{operation_id} answered {status}, which it does not document"
    content = responses[str(status)].get("content", {})
    assert "application/json" in content, f"{operation_id} {status} is documented as {content}"
    schema: dict[str, Any] = content["application/json"]["schema"]
    return schema


def assert_answer_matches_spec(
    spec: dict[str, Any], operation_id: str, response: httpx.Response
) -> None:
    schema = documented_schema(spec, operation_id, response.status_code)
    errors = schema_errors(spec, schema, response.json())
    assert not errors, f"{operation_id} {response.status_code} {response.text}: {errors}"


async def test_error_answers_match_their_documented_schema(
    service: Service, spec: dict[str, Any], test_image: str
) -> None:
    client = service.client
    missing = str(uuid.uuid4())

    answer = await client.get(f"/jobs/{missing}")
    assert answer.status_code == 404
    assert_answer_matches_spec(spec, "get_job", answer)

    answer = await client.post("/jobs", json={"image": "Not An Image"})
    assert answer.status_code == 422
    assert_answer_matches_spec(spec, "submit_job", answer)

    answer = await client.post("/jobs/batch", json={"jobs": []})
    assert answer.status_code == 422
    assert_answer_matches_spec(spec, "submit_jobs", answer)

    done = await service.run(image=test_image, command=["true"])
    answer = await client.post(f"/jobs/{done['id']}/cancel")
    assert answer.status_code == 409
    assert_answer_matches_spec(spec, "cancel_job", answer)

    answer = await client.delete(f"/jobs/{missing}")
    assert answer.status_code == 404
    assert_answer_matches_spec(spec, "delete_job", answer)

    answer = await client.get(f"/jobs/{missing}/logs")
    assert answer.status_code == 404
    assert_answer_matches_spec(spec, "get_job_logs", answer)


async def test_bad_cursor_answer_matches_the_documented_422(
    service: Service, spec: dict[str, Any]
) -> None:
    answer = await service.client.get("/jobs", params={"cursor": "not-a-cursor"})
    assert answer.status_code == 422
    assert_answer_matches_spec(spec, "list_jobs", answer)


async def test_reused_idempotency_key_answer_matches_the_documented_schema(
    service: Service, spec: dict[str, Any], test_image: str
) -> None:
    key = f"reuse-{uuid.uuid4()}"
    headers = {"Idempotency-Key": key}
    first = await service.client.post(
        "/jobs", json={"image": test_image, "command": ["true"]}, headers=headers
    )
    assert first.status_code == 202, first.text
    other = await service.client.post(
        "/jobs", json={"image": test_image, "command": ["false"]}, headers=headers
    )
    assert 400 <= other.status_code < 500, other.text
    assert_answer_matches_spec(spec, "submit_job", other)


# --- a generated client against the running service -----------------------------------


@pytest.fixture(scope="module")
def generated(
    spec: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModuleType]:
    """The package openapi-python-client generates from the live spec, imported.

    Offline (from a file) and without post hooks, so no formatter has to be installed;
    any warning of the generator (a part of the spec it cannot represent) fails the test.
    """
    workdir = tmp_path_factory.mktemp("client")
    (workdir / "openapi.json").write_text(json.dumps(spec))
    (workdir / "config.json").write_text(
        json.dumps({"post_hooks": [], "package_name_override": PACKAGE})
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(workdir / "openapi.json"),
            "--output-path",
            str(workdir / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(workdir / "config.json"),
            "--fail-on-warning",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"generation failed:\n{result.stdout}\n{result.stderr}"
    assert (workdir / PACKAGE / "client.py").exists(), result.stdout
    sys.path.insert(0, str(workdir))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(workdir))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def api(operation_id: str) -> Any:
    """The generated module of one operation (it has sync, asyncio and *_detailed)."""
    try:
        return importlib.import_module(f"{PACKAGE}.api.jobs.{operation_id}")
    except ModuleNotFoundError:
        pytest.fail(f"the generated client has no operation {operation_id!r}")


def models() -> Any:
    return importlib.import_module(f"{PACKAGE}.models")


@pytest.fixture
async def client(generated: ModuleType, service: Service) -> AsyncIterator[Any]:
    # Longer than any ?wait= the tests use.
    async with generated.Client(
        base_url=service.url, timeout=httpx.Timeout(60.0), raise_on_unexpected_status=True
    ) as opened:
        yield opened


async def submit(client: Any, **job: Any) -> Any:
    answer = await api("submit_job").asyncio_detailed(
        client=client, body=models().JobCreate.from_dict(job)
    )
    assert answer.status_code == 202, answer.content
    assert isinstance(answer.parsed, models().JobPublic), answer.parsed
    return answer.parsed


async def wait_terminal(client: Any, job_id: str, timeout: float = 90.0) -> Any:
    """GET /jobs/{id}?wait=30 until the job is terminal: long polls, no busy loop."""
    deadline = time.monotonic() + timeout
    while True:
        job = await api("get_job").asyncio(job_id, client=client, wait=30)
        assert isinstance(job, models().JobPublic), job
        if job.state.value in TERMINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state.value}"


async def test_generated_client_submits_waits_and_reads_logs(client: Any, test_image: str) -> None:
    job = await submit(client, image=test_image, command=["echo", "hi"], labels={"via": "client"})
    assert job.state.value in {"queued", "running"}

    started = time.monotonic()
    done = await wait_terminal(client, str(job.id))
    assert time.monotonic() - started < 60
    assert done.state.value == "succeeded"
    assert done.exit_code == 0
    assert done.stdout == "hi\n"
    assert done.labels.to_dict() == {"via": "client"}

    logs = await api("get_job_logs").asyncio_detailed(str(job.id), client=client, follow=False)
    assert logs.status_code == 200
    assert logs.headers["content-type"].startswith("text/plain")
    assert logs.content.decode() == "hi\n"


async def test_generated_client_wait_returns_early_when_the_job_ends(
    client: Any, test_image: str
) -> None:
    job = await submit(client, image=test_image, command=["echo", "hi"])
    started = time.monotonic()
    done = await api("get_job").asyncio(str(job.id), client=client, wait=30)
    # Answered when the job ended, not after the whole 30 s.
    assert done.state.value == "succeeded"
    assert time.monotonic() - started < 25


async def test_generated_client_cancels_a_running_job(client: Any, test_image: str) -> None:
    job = await submit(client, image=test_image, command=["sh", "-c", "echo hi; sleep 30"])
    deadline = time.monotonic() + 60
    while (current := await api("get_job").asyncio(str(job.id), client=client)).state.value in {
        "queued"
    }:
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.1)
    assert current.state.value == "running"

    answer = await api("cancel_job").asyncio_detailed(str(job.id), client=client)
    assert answer.status_code == 202, answer.content
    assert isinstance(answer.parsed, models().JobPublic)

    started = time.monotonic()
    done = await wait_terminal(client, str(job.id))
    assert done.state.value == "cancelled"
    assert time.monotonic() - started < 25

    again = await api("cancel_job").asyncio_detailed(str(job.id), client=client)
    assert again.status_code == 409
    assert isinstance(again.parsed, models().ErrorBody)
    assert again.parsed.detail


async def test_generated_client_parses_errors(client: Any) -> None:
    missing = await api("get_job").asyncio_detailed(str(uuid.uuid4()), client=client)
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models().ErrorBody)

    bad = await api("submit_job").asyncio_detailed(
        client=client, body=models().JobCreate.from_dict({"image": "Not An Image"})
    )
    assert bad.status_code == 422
    assert isinstance(bad.parsed, models().HTTPValidationError)
    assert "image" in bad.parsed.detail[0].loc


async def test_generated_client_batch_list_and_delete(client: Any, test_image: str) -> None:
    run = str(uuid.uuid4())
    batch = await api("submit_jobs").asyncio_detailed(
        client=client,
        body=models().JobBatchCreate.from_dict(
            {
                "jobs": [
                    {"image": test_image, "command": ["echo", str(n)], "labels": {"run": run}}
                    for n in range(3)
                ]
            }
        ),
    )
    assert batch.status_code == 202, batch.content
    ids = [str(job.id) for job in batch.parsed.items]
    assert len(ids) == 3
    for job_id in ids:
        assert (await wait_terminal(client, job_id)).state.value == "succeeded"

    page = await api("list_jobs").asyncio(client=client, label=[f"run:{run}"])
    assert isinstance(page, models().JobPage), page
    assert sorted(str(job.id) for job in page.items) == sorted(ids)

    deleted = await api("delete_job").asyncio_detailed(ids[0], client=client)
    assert deleted.status_code == 204
    gone = await api("get_job").asyncio_detailed(ids[0], client=client)
    assert gone.status_code == 404
