"""Health: liveness (`/healthz`) and readiness (`/readyz`).

`/healthz` answers while the process is up. `/readyz` answers 200 only when this process
can do its work: the database answers, its schema is at the newest migration, and (for a
process with workers) the Docker engine answers; otherwise 503, with each check's reason.
Neither needs an API key, and neither says more than which check failed and why.
"""

import asyncio
from collections.abc import Coroutine
from functools import cache
from typing import Any, Literal

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.worker.pool import WorkerPool

router = APIRouter(tags=["health"])

# How long each readiness check may take before it counts as failed.
CHECK_TIMEOUT_SECONDS = 3.0


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    # Each check: "ok" (or "ok: ...", "skipped: ..."), else the reason it failed.
    checks: dict[str, str]


@router.get("/healthz", operation_id="healthz")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Whether this process can serve: database, schema, Docker engine",
    responses={503: {"model": Readiness, "description": "Some check failed; `checks` says why"}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    state = request.app.state
    pool: WorkerPool | None = state.pool
    checks = {
        "database": await _checked(_database(state.engine)),
        "migrations": await _checked(_migrations(state.engine)),
        "engine": (
            await _checked(_engine(pool))
            if pool is not None and pool.concurrency
            else "skipped: this process runs no workers"
        ),
    }
    ready = all(result.startswith(("ok", "skipped")) for result in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(status="ready" if ready else "not ready", checks=checks)


async def _checked(check: Coroutine[Any, Any, str]) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            return await check
    except TimeoutError:
        return f"no answer within {CHECK_TIMEOUT_SECONDS:g} s"
    except Exception as exc:  # the reason, never a 500
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"{type(exc).__name__}: {first_line}".rstrip(": ")


async def _database(engine: AsyncEngine) -> str:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    return "ok"


@cache
def head_revision() -> str:
    """The newest migration in migrations/ (read once: the code does not change)."""
    from alembic.script import ScriptDirectory

    from app.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    return head or ""


async def _migrations(engine: AsyncEngine) -> str:
    async with engine.connect() as connection:
        current = (
            await connection.execute(text("SELECT version_num FROM alembic_version"))
        ).scalar_one_or_none()
    head = await asyncio.to_thread(head_revision)
    if current != head:
        return (
            f"the schema is at {current or 'no revision'}, the code needs {head}: "
            "run `jobdock migrate`"
        )
    return f"ok: at {head}"


async def _engine(pool: WorkerPool) -> str:
    if not await pool.engine_answers():
        return "the Docker engine does not answer"
    return "ok"
