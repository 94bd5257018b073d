"""The /jobs routes: thin adapters from HTTP to app.store and the worker pool."""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError

from app import store
from app.api.deps import PoolDep, SessionDep, SettingsDep
from app.models import ErrorBody, JobCreate, JobPage, JobPublic, JobState, JobSummary
from app.settings import Settings

router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such job"}
}


def check_caps(job_in: JobCreate, settings: Settings) -> None:
    """Reject limits beyond what the operator allows, in FastAPI's 422 shape."""
    errors = []
    if job_in.memory_mb is not None and job_in.memory_mb > settings.max_memory_mb:
        errors.append(
            {
                "type": "less_than_equal",
                "loc": ("body", "memory_mb"),
                "msg": f"memory_mb may be at most {settings.max_memory_mb} on this service",
                "input": job_in.memory_mb,
            }
        )
    if job_in.timeout_seconds is not None and job_in.timeout_seconds > settings.max_timeout_seconds:
        errors.append(
            {
                "type": "less_than_equal",
                "loc": ("body", "timeout_seconds"),
                "msg": (
                    f"timeout_seconds may be at most {settings.max_timeout_seconds} on this service"
                ),
                "input": job_in.timeout_seconds,
            }
        )
    if errors:
        raise RequestValidationError(errors)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="submit_job",
    summary="Submit a job",
)
async def submit_job(
    job_in: JobCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    pool: PoolDep,
) -> JobPublic:
    check_caps(job_in, settings)
    job, _ = await store.create_job(session=session, job_in=job_in, settings=settings)
    if pool is not None:
        pool.wake()
    response.headers["Location"] = str(request.url_for("get_job", job_id=str(job.id)).path)
    return JobPublic.model_validate(job)


@router.get("", operation_id="list_jobs", summary="List jobs, newest first")
async def list_jobs(
    session: SessionDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    jobs, next_cursor = await store.list_jobs(
        session=session, state=state, limit=limit, cursor=cursor
    )
    return JobPage(items=[JobSummary.model_validate(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", operation_id="get_job", summary="Get a job", responses=NOT_FOUND)
async def get_job(job_id: str, session: SessionDep) -> JobPublic:
    job = await store.get_job(session=session, job_id=store.parse_job_id(job_id))
    return JobPublic.model_validate(job)


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
    job_id: str, response: Response, session: SessionDep, pool: PoolDep
) -> JobPublic:
    job = await store.cancel_job(session=session, job_id=store.parse_job_id(job_id))
    if job.state is JobState.running:
        response.status_code = status.HTTP_202_ACCEPTED
        if pool is not None:
            pool.request_cancel(job.id)
    return JobPublic.model_validate(job)
