"""The /jobs routes: thin adapters from HTTP to app.store and the worker pool."""

import asyncio
import re
import uuid
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BeforeValidator, Field, StringConstraints, TypeAdapter, ValidationError

from app import store
from app.api.deps import (
    BEARER_SECURITY,
    EventsDep,
    PoolDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    read_principal,
    reading,
    writing,
)
from app.auth import owner_filter, owner_of_new_jobs
from app.events import JobEvents, wait_for_change
from app.metrics import Metrics
from app.models import (
    LABEL_KEY,
    ErrorBody,
    Job,
    JobBatch,
    JobBatchCreate,
    JobCreate,
    JobPage,
    JobPublic,
    JobState,
    JobSummary,
)
from app.settings import Settings
from app.worker.pool import WorkerPool

Responses = dict[int | str, dict[str, Any]]
T = TypeVar("T")

UNAUTHORIZED: Responses = {
    401: {
        "model": ErrorBody,
        "description": "API keys are configured and the request has none, or not a valid one",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    }
}
router = APIRouter(prefix="/jobs", tags=["jobs"], responses=UNAUTHORIZED)

NOT_FOUND: Responses = {404: {"model": ErrorBody, "description": "No job has this id"}}


def _retry_later(code: int, description: str) -> Responses:
    """An error answer that carries `Retry-After`."""
    return {
        code: {
            "model": ErrorBody,
            "description": description,
            "headers": {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            },
        }
    }


QUEUE_FULL = _retry_later(503, "Too many jobs are queued; retry after the `Retry-After` seconds")
QUOTA_EXCEEDED = _retry_later(
    429, "The API key's quota of queued jobs is used; retry after `Retry-After`"
)
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
IDEMPOTENCY_KEY_DESCRIPTION = "Any 1-255 printable ASCII characters, unique per intended job"
# POST /jobs reads the header itself; its spec says what FastAPI would say of
# `Annotated[str | None, Header(alias="Idempotency-Key", pattern=..., description=...)]`.
_IDEMPOTENCY_KEY = TypeAdapter(Annotated[str, StringConstraints(pattern=IDEMPOTENCY_KEY_PATTERN)])
IDEMPOTENCY_KEY_PARAMETER: dict[str, Any] = {
    "description": IDEMPOTENCY_KEY_DESCRIPTION,
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {
        "anyOf": [{"pattern": IDEMPOTENCY_KEY_PATTERN, "type": "string"}, {"type": "null"}],
        "description": IDEMPOTENCY_KEY_DESCRIPTION,
        "title": "Idempotency-Key",
    },
}


def _cap_errors(job_in: JobCreate, settings: Settings, loc: tuple[Any, ...]) -> list[Any]:
    """Limits beyond what the operator allows, in FastAPI's 422 shape."""
    errors = []

    def cap(field: str, value: int, limit: int, unit: str = "") -> None:
        if value > limit:
            errors.append(
                {
                    "type": "less_than_equal",
                    "loc": (*loc, field),
                    "msg": f"{field} may be at most {limit}{unit} on this service",
                    "input": value,
                }
            )

    if not any(fnmatchcase(job_in.image, pattern) for pattern in settings.allowed_images):
        errors.append(
            {
                "type": "value_error",
                "loc": (*loc, "image"),
                "msg": (
                    f"image {job_in.image!r} is not allowed on this service; allowed images "
                    f"match {', '.join(settings.allowed_images)}"
                ),
                "input": job_in.image,
            }
        )
    if job_in.memory_mb is not None:
        cap("memory_mb", job_in.memory_mb, settings.max_memory_mb)
    if job_in.cpus is not None and job_in.cpus > settings.max_cpus:
        errors.append(
            {
                "type": "less_than_equal",
                "loc": (*loc, "cpus"),
                "msg": f"cpus may be at most {settings.max_cpus:g} on this service",
                "input": job_in.cpus,
            }
        )
    if job_in.timeout_seconds is not None:
        cap("timeout_seconds", job_in.timeout_seconds, settings.max_timeout_seconds)
    if job_in.stdin is not None:
        size = len(job_in.stdin.encode())
        if size > settings.stdin_max_bytes:
            errors.append(
                {
                    "type": "too_long",
                    "loc": (*loc, "stdin"),
                    "msg": (
                        f"stdin is {size} bytes; it may be at most {settings.stdin_max_bytes} "
                        "bytes of UTF-8 on this service"
                    ),
                    "input": f"<{size} bytes>",
                }
            )
    return errors


def check_caps(job_in: JobCreate, settings: Settings) -> None:
    errors = _cap_errors(job_in, settings, ("body",))
    if errors:
        raise RequestValidationError(errors)


def _parse_labels(raw: list[str]) -> dict[str, str]:
    """`key:value` filters from the query string; 422 for any that is not one."""
    labels: dict[str, str] = {}
    errors = []
    for index, item in enumerate(raw):
        key, sep, value = item.partition(":")
        if not sep or not LABEL_KEY.match(key):
            errors.append(
                {
                    "type": "value_error",
                    "loc": ("query", "label", index),
                    "msg": (
                        f"label filter {item!r} must be key:value with a valid label key, "
                        "e.g. label=team:ml"
                    ),
                    "input": item,
                }
            )
        elif key in labels and labels[key] != value:
            errors.append(
                {
                    "type": "value_error",
                    "loc": ("query", "label", index),
                    "msg": f"label {key} is filtered on twice with different values",
                    "input": item,
                }
            )
        else:
            labels[key] = value
    if errors:
        raise RequestValidationError(errors)
    return labels


def _iso_8601_only(value: object) -> object:
    """The spec's date-time: pydantic would also read a bare number as Unix time."""
    if isinstance(value, str) and not ISO_8601_START.match(value):
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z")
    return value


ISO_8601_START = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ]")
Instant = Annotated[datetime, BeforeValidator(_iso_8601_only)]


def _utc(instant: datetime | None) -> datetime | None:
    """A query instant; one without a time zone is read as UTC."""
    if instant is None:
        return None
    return instant.replace(tzinfo=UTC) if instant.tzinfo is None else instant.astimezone(UTC)


def _location(request: Request, job_id: object) -> str:
    """The path of GET /jobs/{id} (what url_for("get_job") gives, without its lookup)."""
    return f"{request.scope.get('root_path', '')}{router.prefix}/{job_id}"


_to_json = JobPublic.__pydantic_serializer__.to_json
# JobPublic.model_validate without SQLModel's wrapper (which, for a model that is not a
# table, makes the same instance by a longer way).
_validate_public = JobPublic.__pydantic_validator__.validate_python


def _job_response(
    job: Job | dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A job (or its row) as JobPublic JSON, validated and serialized once (FastAPI would validate
    a returned model again for the route's response_model, which documents the shape)."""
    return Response(
        _to_json(_validate_public(job)),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


# GET /jobs/{id}, the busiest route, is the router's first (the one it tries first). Its
# parameters are read by the route itself and declared in its spec as FastAPI would declare
# `job_id: str` and `wait: Annotated[float | None, Query(ge=0, le=86400)]` (a test checks).
WAIT_DESCRIPTION = "Seconds to wait for a terminal state"
_WAIT = TypeAdapter(Annotated[float, Field(ge=0, le=86400)])
# FastAPI's own 422 answer, which it declares only for routes with parameters it resolves.
VALIDATION_ERROR: dict[str, Any] = {
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
    },
    "description": "Validation Error",
}
JOB_ID_PARAMETER: dict[str, Any] = {
    "in": "path",
    "name": "job_id",
    "required": True,
    "schema": {"title": "Job Id", "type": "string"},
}
WAIT_PARAMETER: dict[str, Any] = {
    "description": WAIT_DESCRIPTION,
    "in": "query",
    "name": "wait",
    "required": False,
    "schema": {
        "anyOf": [{"maximum": 86400, "minimum": 0, "type": "number"}, {"type": "null"}],
        "description": WAIT_DESCRIPTION,
        "title": "Wait",
    },
}


def _optional_parameter(
    value: str | None, adapter: TypeAdapter[T], loc: tuple[str, str]
) -> T | None:
    """An optional parameter the route reads itself, validated as FastAPI would validate it
    (the same errors, a 422 at `loc`): FastAPI's resolution of a parameter cost more per
    request than the reads the route makes."""
    if value is None:
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError as error:
        raise RequestValidationError(
            [{**detail, "loc": loc} for detail in error.errors(include_url=False)]
        ) from None


def _wait_seconds(request: Request) -> float | None:
    """The `wait` query parameter: its last value, as FastAPI takes it."""
    values = request.query_params.getlist("wait")
    return _optional_parameter(values[-1] if values else None, _WAIT, ("query", "wait"))


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    operation_id="get_job",
    summary="Get a job, or wait for it to finish",
    description=(
        "With `wait`, answers as soon as the job is in a terminal state, or after at most "
        "`wait` seconds with the job as it is then (longer waits are shortened to the "
        "service's maximum)."
    ),
    responses=NOT_FOUND,
    openapi_extra={
        **BEARER_SECURITY,
        "parameters": [JOB_ID_PARAMETER, WAIT_PARAMETER],
        "responses": {"422": VALIDATION_ERROR},
    },
)
async def get_job(request: Request) -> Response:
    # The job's id, `wait`, the reader and the key check without FastAPI's resolution of
    # parameters and dependencies (see _wait_seconds and read_principal).
    job_id: str = request.path_params["job_id"]
    wait = _wait_seconds(request)
    if not wait:
        return await read_job(request, job_id)
    async with reading(request) as connection:
        owner = owner_filter(await read_principal(request, connection))
    return await _wait_for_job(request, store.parse_job_id(job_id), owner, wait)


async def read_job(request: Request, job_id: str) -> Response:
    """GET /jobs/{id} without `wait` (also app.api.hot's)."""
    async with reading(request) as connection:
        principal = await read_principal(request, connection)
        job = await store.read_job(
            session=connection, job_id=store.parse_job_id(job_id), owner=owner_filter(principal)
        )
    return _job_response(job)


async def _wait_for_job(
    request: Request, uuid_: uuid.UUID, owner: uuid.UUID | None, wait: float
) -> Response:
    settings: Settings = request.app.state.settings
    events: JobEvents = request.app.state.events
    deadline = asyncio.get_running_loop().time() + min(wait, settings.wait_max_seconds)
    with events.subscribe(uuid_) as changed:
        while True:
            changed.clear()
            # A reader for each read, none held while waiting: on PostgreSQL it is a pooled
            # connection, and a hundred waiters would hold the pool that the workers and
            # every other request need. Each read sees the commits made before it.
            async with reading(request) as connection:
                job = await store.read_job(session=connection, job_id=uuid_, owner=owner)
            remaining = deadline - asyncio.get_running_loop().time()
            if JobState(job["state"]).is_terminal or remaining <= 0:
                return _job_response(job)
            # Notifications wake us at once; the re-read is a fallback for a missed one.
            await wait_for_change(changed, min(remaining, settings.poll_interval_seconds))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    operation_id="submit_job",
    summary="Submit a job",
    description=(
        "Queues a job and answers 202 with it and its `Location`. With an `Idempotency-Key` "
        "header, a repeat of the same request (within the key's lifetime) answers 200 with "
        "the job the first one made instead of making another; the same key with a "
        "different body answers 422."
    ),
    responses={
        200: {"model": JobPublic, "description": "A repeat of an earlier request: its job"},
        **QUEUE_FULL,
        **QUOTA_EXCEEDED,
    },
    openapi_extra={**BEARER_SECURITY, "parameters": [IDEMPOTENCY_KEY_PARAMETER]},
)
async def submit_job(job_in: JobCreate, request: Request) -> Response:
    # The app's state directly, and the Idempotency-Key, the reader and the key check
    # without FastAPI's resolution of parameters and dependencies (see _optional_parameter
    # and read_principal): each costs on every request.
    idempotency_key = _optional_parameter(
        request.headers.get("idempotency-key"), _IDEMPOTENCY_KEY, ("header", "Idempotency-Key")
    )
    if idempotency_key is None:
        job, committed = await queue_job(request, job_in)
        return await queued(request, job, committed)
    settings: Settings = request.app.state.settings
    check_caps(job_in, settings)
    # One pooled connection for the whole request (see writing()).
    async with writing(request) as (connection, reader):
        principal = await read_principal(request, reader)
        found, created = await store.create_job(
            session=connection,
            reader=reader,
            job_in=job_in,
            settings=settings,
            idempotency_key=idempotency_key,
            owner=owner_of_new_jobs(principal),
            owner_max_queued=None if principal is None else principal.max_queued,
        )
    headers = {"Location": _location(request, found.id)}
    if created:
        return _submitted(request, found, headers)
    headers["Idempotent-Replayed"] = "true"
    return _job_response(found, status.HTTP_200_OK, headers)


async def queue_job(
    request: Request, job_in: JobCreate
) -> tuple[dict[str, Any], "asyncio.Future[None]"]:
    """POST /jobs without an Idempotency-Key, up to the job handed to the group writer: its
    row and the future of its commit (see queued()). What it raises, it raises before
    anything is written."""
    settings: Settings = request.app.state.settings
    check_caps(job_in, settings)
    async with reading(request) as reader:
        principal = await read_principal(request, reader)
        return await store.queue_job(
            writer=request.app.state.submissions,
            reader=reader,
            room=request.app.state.queue_room,
            job_in=job_in,
            settings=settings,
            owner=owner_of_new_jobs(principal),
            owner_max_queued=None if principal is None else principal.max_queued,
        )


async def queued(
    request: Request, job: dict[str, Any], committed: "asyncio.Future[None]"
) -> Response:
    """The 202 of a job from queue_job(), once its group is committed. Awaited with the
    reader given back: on PostgreSQL the reader is a pooled connection, and the group's
    writer needs one of the same pool."""
    await committed
    return _submitted(request, job, {"Location": _location(request, job["id"])})


def _submitted(request: Request, job: Job | dict[str, Any], headers: dict[str, str]) -> Response:
    metrics: Metrics = request.app.state.metrics
    metrics.job_submitted()
    pool: WorkerPool | None = request.app.state.pool
    if pool is not None:
        pool.wake()
    return _job_response(job, status.HTTP_202_ACCEPTED, headers)


@router.post(
    "/batch",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="submit_jobs",
    summary="Submit up to 100 jobs at once",
    description=(
        "All or nothing: if any job is invalid, the 422 names it by its index in `jobs` "
        "and none is queued. The answer lists the jobs in the order given."
    ),
    responses={**QUEUE_FULL, **QUOTA_EXCEEDED},
)
async def submit_jobs(
    batch: JobBatchCreate,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    pool: PoolDep,
) -> JobBatch:
    errors = [
        error
        for index, job_in in enumerate(batch.jobs)
        for error in _cap_errors(job_in, settings, ("body", "jobs", index))
    ]
    if errors:
        raise RequestValidationError(errors)
    jobs = await store.create_jobs(
        session=session,
        jobs_in=batch.jobs,
        settings=settings,
        owner=owner_of_new_jobs(principal),
        owner_max_queued=None if principal is None else principal.max_queued,
    )
    # Queued outside the room's count: the next submission probes again.
    queue_room: store.QueueRoom = request.app.state.queue_room
    queue_room.forget()
    metrics: Metrics = request.app.state.metrics
    metrics.job_submitted(len(jobs))
    if pool is not None:
        pool.wake()
    return JobBatch(items=[JobPublic.model_validate(job) for job in jobs])


@router.get("", operation_id="list_jobs", summary="List jobs, newest first")
async def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    state: JobState | None = None,
    label: Annotated[
        list[str],
        Query(
            max_length=32,
            description="`key:value`; repeat to require several labels",
            examples=["team:ml"],
        ),
    ] = [],  # noqa: B006 (FastAPI copies defaults)
    image: Annotated[str | None, Query(max_length=255, description="Exact image")] = None,
    created_after: Annotated[
        Instant | None, Query(description="ISO 8601; without a zone, UTC")
    ] = None,
    created_before: Annotated[
        Instant | None, Query(description="ISO 8601; without a zone, UTC")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    jobs, next_cursor = await store.list_jobs(
        session=session,
        state=state,
        labels=_parse_labels(label),
        image=image,
        created_after=_utc(created_after),
        created_before=_utc(created_before),
        limit=limit,
        cursor=cursor,
        owner=owner_filter(principal),
    )
    return JobPage(items=[JobSummary.model_validate(job) for job in jobs], next_cursor=next_cursor)


@router.post(
    "/{job_id}/cancel",
    operation_id="cancel_job",
    summary="Cancel a job",
    description=(
        "A queued job is cancelled at once (200). A running job's container is killed and the "
        "job ends `cancelled` shortly after (202). A finished job answers 409."
    ),
    responses={
        **NOT_FOUND,
        202: {"model": JobPublic, "description": "Cancellation of the running job is under way"},
        409: {"model": ErrorBody, "description": "The job has already finished"},
    },
)
async def cancel_job(
    job_id: str,
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    pool: PoolDep,
    events: EventsDep,
) -> JobPublic:
    job = await store.cancel_job(
        session=session, job_id=store.parse_job_id(job_id), owner=owner_filter(principal)
    )
    if job.state is JobState.running:
        response.status_code = status.HTTP_202_ACCEPTED
        if pool is not None:
            pool.request_cancel(job.id)
    else:
        # It was queued and ends here: no worker will count it.
        metrics: Metrics = request.app.state.metrics
        metrics.job_finished(JobState.cancelled)
        events.notify(job.id)
        if pool is not None and job.callback_url is not None:
            pool.webhooks.wake()
    return JobPublic.model_validate(job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="delete_job",
    summary="Delete a finished job and its logs",
    responses={
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "The job is queued or running"},
    },
)
async def delete_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> Response:
    await store.delete_job(
        session=session, job_id=store.parse_job_id(job_id), owner=owner_filter(principal)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
