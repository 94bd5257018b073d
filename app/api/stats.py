"""Observation routes: `/stats` (counts for a dashboard, as JSON) and `/metrics`
(Prometheus' text format).

`/stats` is authenticated like `/jobs` and counts only the jobs the caller may see.
`/metrics` needs no key, like `/healthz` and `/readyz`: Prometheus scrapes it without
one by default, and it says no more than totals (no job, id, image or tenant), so a
deployment that keeps it private does so with the network, as for the health routes.
"""

from fastapi import APIRouter, Request, Response

from app import store
from app.api.deps import ReaderDep, ReaderPrincipalDep
from app.api.jobs import UNAUTHORIZED
from app.auth import owner_filter
from app.metrics import CONTENT_TYPE, Metrics
from app.models import JobStateCounts, Stats, WorkerStats
from app.worker.pool import WorkerPool

router = APIRouter()


@router.get(
    "/stats",
    operation_id="get_stats",
    tags=["stats"],
    summary="Jobs by state, and the workers busy",
    description=(
        "The caller's jobs (all jobs for an admin key, or while no key exists) counted by "
        "state. `workers.active` is the number of workers, on any node, that hold a running "
        "job; `slots` and `busy` are this process's worker slots and how many of them hold "
        "a job (null when this process runs no workers)."
    ),
    responses=UNAUTHORIZED,
)
async def get_stats(
    request: Request, principal: ReaderPrincipalDep, connection: ReaderDep
) -> Stats:
    counts = await store.count_jobs(session=connection, owner=owner_filter(principal))
    pool: WorkerPool | None = request.app.state.pool
    return Stats(
        jobs=JobStateCounts(**{state.value: n for state, n in counts.by_state.items()}),
        workers=WorkerStats(
            active=counts.active_workers,
            slots=None if pool is None else pool.concurrency,
            busy=None if pool is None else pool.busy_slots,
        ),
    )


@router.get(
    "/metrics",
    operation_id="metrics",
    tags=["stats"],
    summary="Prometheus metrics",
    description=(
        "Counters and histograms of this process (jobs submitted and finished, job "
        "durations and queue waits, engine errors, HTTP requests), and the queued and "
        "running jobs of the whole service, read from the database."
    ),
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus' text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(request: Request, connection: ReaderDep) -> Response:
    registry: Metrics = request.app.state.metrics
    registry.set_job_counts(await store.count_jobs(session=connection))
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
