"""Counts for GET /stats and the /metrics gauges: jobs by state, and the workers busy."""

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, Table, bindparam, distinct, func, select, true

from app.db import Reader
from app.models import Job, JobState

JOBS: Table = Job.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class JobCounts:
    """How many jobs are in each state (every state present), and how many distinct
    workers hold a running job, across every node that shares the database."""

    by_state: dict[JobState, int] = field(default_factory=dict)
    active_workers: int = 0


def _counts_statement(by_owner: bool) -> Select[tuple[int, Any, Any]]:
    """One statement: the workers counted over the running jobs (found through the state
    index, so finished jobs' rows are never read), joined with one GROUP BY of the jobs by
    state. The outer join gives a row even when the caller has no job at all."""
    owned = [JOBS.c.owner == bindparam("stats_owner")] if by_owner else []
    workers = (
        select(func.count(distinct(JOBS.c.worker_id)).label("active"))
        .where(JOBS.c.state == JobState.running)
        .subquery("workers")
    )
    by_state = (
        select(JOBS.c.state, func.count().label("jobs"))
        .where(*owned)
        .group_by(JOBS.c.state)
        .subquery("by_state")
    )
    return select(workers.c.active, by_state.c.state, by_state.c.jobs).select_from(
        workers.outerjoin(by_state, true())
    )


# Built once: each execution reuses the compiled statement.
_COUNTS = {by_owner: _counts_statement(by_owner) for by_owner in (False, True)}


async def count_jobs(*, session: Reader, owner: uuid.UUID | None = None) -> JobCounts:
    """Jobs by state (only the owner's, with `owner`); the active workers are counted over
    every job, since workers serve every tenant alike."""
    rows = await session.execute(_COUNTS[owner is not None], {"stats_owner": owner})
    by_state = dict.fromkeys(JobState, 0)
    active_workers = 0
    for row in rows:
        active_workers = int(row.active)
        if row.state is not None:
            by_state[JobState(row.state)] = int(row.jobs)
    return JobCounts(by_state=by_state, active_workers=active_workers)
