"""Part 4: claim-and-finish cycles per second through the store, against the same SQL raw.

A cycle is what a worker does around one job: `app.store.claim_next_job` (one atomic
UPDATE ... RETURNING of the best queued job, committed) and `app.store.finish_job` (the
conditional terminal UPDATE, committed), each in its own session as the pool does. The raw
loop sends the very statements SQLAlchemy emits (checked, untimed, against what one cycle
through the store sends before the rounds) with:
  - `sqlite3` from the standard library, on a file with app/db.py's PRAGMAs (WAL,
    synchronous=NORMAL, busy_timeout, foreign_keys);
  - `asyncpg` on PostgreSQL (with the same pg_notify in the finishing transaction),
    when `--database postgres`.
Both sides start from a fresh, migrated database holding the same N queued jobs (inserted
by the store, untimed); every job must end `succeeded` exactly once. Interleaved
store/raw per round; medians of the rounds.
"""

import os
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import store
from app.db import asyncpg_dsn, create_engine, create_session_factory, upgrade_to_head
from app.models import Job, JobCreate, JobResult, JobState
from app.settings import Settings
from bench.common import Database, Results, check, median, profiled

WORKER = "bench-worker"
LEASE_SECONDS = 30.0
RESULT = JobResult(state=JobState.succeeded, exit_code=0, stdout="hi\n")

COLUMNS = (
    "image, command, env, working_dir, cpus, cpu_shares, memory_mb, timeout_seconds, priority, "
    "max_attempts, retry_on_exit_codes, labels, callback_url, id, state, run_after, attempt, "
    "worker_id, lease_expires_at, cancel_requested, container_id, limits, attempts, exit_code, "
    "stdout, stderr, output_truncated, error, resources, stdin, callback_state, "
    "callback_next_at, callback_deliveries, owner, idempotency_key, request_hash, created_at, "
    "started_at, finished_at"
)
ID_INDEX = [name.strip() for name in COLUMNS.split(",")].index("id")
# A job may start unless its owner's API key already runs its max_running jobs.
OWNER_RULE = (
    "(jobs.owner IS NULL OR (jobs.owner NOT IN (SELECT api_keys.id FROM api_keys WHERE "
    "api_keys.max_running IS NOT NULL AND api_keys.max_running <= (SELECT count(*) AS count_1 "
    "FROM jobs AS running_jobs WHERE running_jobs.owner = api_keys.id AND "
    "running_jobs.state = {running}))))"
)
SQLITE_CLAIM = (
    "UPDATE jobs SET state=?, attempt=(jobs.attempt + ?), worker_id=?, lease_expires_at=?, "
    "started_at=? WHERE jobs.id = (SELECT jobs.id FROM jobs WHERE jobs.state = ? AND "
    f"jobs.run_after <= ? AND {OWNER_RULE.format(running='?')} ORDER BY jobs.priority DESC, "
    f"jobs.created_at ASC LIMIT ? OFFSET ?) AND jobs.state = ? RETURNING {COLUMNS}"
)
SQLITE_FINISH = (
    "UPDATE jobs SET state=?, lease_expires_at=?, container_id=CASE WHEN ? THEN ? ELSE "
    "jobs.container_id END, limits=CASE WHEN ? THEN ? ELSE jobs.limits END, exit_code=?, "
    "stdout=?, stderr=?, "
    "output_truncated=?, error=?, resources=?, stdin=?, callback_state=CASE WHEN "
    "(jobs.callback_url IS NOT NULL) THEN ? END, callback_next_at=CASE WHEN "
    "(jobs.callback_url IS NOT NULL) THEN ? END, finished_at=? WHERE jobs.id = ? AND "
    "jobs.worker_id = ? AND jobs.state = ?"
)
PG_CLAIM = (
    "UPDATE jobs SET state=$1, attempt=(jobs.attempt + $2::INTEGER), worker_id=$3::VARCHAR, "
    "lease_expires_at=$4::TIMESTAMP WITHOUT TIME ZONE, started_at=$5::TIMESTAMP WITHOUT TIME "
    "ZONE WHERE jobs.id = (SELECT jobs.id FROM jobs WHERE jobs.state = $6 AND jobs.run_after "
    f"<= $5::TIMESTAMP WITHOUT TIME ZONE AND {OWNER_RULE.format(running='$7')} ORDER BY "
    "jobs.priority DESC, jobs.created_at ASC LIMIT $8::INTEGER FOR UPDATE SKIP LOCKED) AND "
    "jobs.state = $9 RETURNING " + ", ".join(f"jobs.{name.strip()}" for name in COLUMNS.split(","))
)
PG_NOTIFY = "SELECT pg_notify($1::VARCHAR, $2::VARCHAR) AS pg_notify_1"
PG_FINISH = (
    "UPDATE jobs SET state=$1, lease_expires_at=$2::TIMESTAMP WITHOUT TIME ZONE, "
    "container_id=CASE WHEN $3::BOOLEAN THEN $4::VARCHAR ELSE jobs.container_id END, "
    "limits=CASE WHEN $3::BOOLEAN THEN $5::JSON ELSE jobs.limits END, "
    "exit_code=$6::INTEGER, stdout=$7::VARCHAR, stderr=$8::VARCHAR, "
    "output_truncated=$9::BOOLEAN, error=$10::VARCHAR, resources=$11::JSON, stdin=$12::VARCHAR, "
    "callback_state=CASE WHEN (jobs.callback_url IS NOT NULL) THEN $13::VARCHAR END, "
    "callback_next_at=CASE WHEN (jobs.callback_url IS NOT NULL) THEN $14::TIMESTAMP WITHOUT "
    "TIME ZONE END, finished_at=$14::TIMESTAMP WITHOUT TIME ZONE WHERE jobs.id = $15::UUID "
    "AND jobs.worker_id = $16::VARCHAR AND jobs.state = $17"
)


def _one_line(sql: str) -> str:
    return " ".join(sql.split())


async def check_same_sql(url: str, kind: str) -> None:
    """Run one cycle through the store (untimed) and check that it sends, statement for
    statement, what the raw loop sends."""
    await prepared(url, 1)
    engine = create_engine(url)
    sent: list[str] = []

    def record(*args: Any) -> None:
        # (connection, cursor, statement, parameters, context, executemany)
        statement = _one_line(args[2])
        if statement.startswith("UPDATE") or "pg_notify" in statement:
            sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        await through_store_once(engine)
    finally:
        await engine.dispose()
    expected = (
        [SQLITE_CLAIM, SQLITE_FINISH] if kind == "sqlite" else [PG_CLAIM, PG_NOTIFY, PG_FINISH]
    )
    check(
        sent == [_one_line(sql) for sql in expected],
        "the raw loop no longer sends the store's SQL; the store sent:\n" + "\n".join(sent),
    )


async def through_store_once(engine: AsyncEngine) -> None:
    sessions = create_session_factory(engine)
    async with sessions() as session:
        job = await store.claim_next_job(
            session=session, worker_id=WORKER, lease_seconds=LEASE_SECONDS
        )
    check(job is not None, "store: nothing claimed")
    assert job is not None
    async with sessions() as session:
        written = await store.finish_job(
            session=session, job_id=job.id, worker_id=WORKER, result=RESULT
        )
    check(written, "store: finish not written")


async def prepared(url: str, jobs: int) -> None:
    """A migrated database with `jobs` queued jobs, inserted by the store."""
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        sessions = create_session_factory(engine)
        settings = Settings(max_queued=0)
        job_in = JobCreate(image="jobdock-test-busybox:latest", command=["echo", "hi"])
        for offset in range(0, jobs, 100):
            async with sessions() as session:
                await store.create_jobs(
                    session=session, jobs_in=[job_in] * min(100, jobs - offset), settings=settings
                )
    finally:
        await engine.dispose()


async def count_succeeded(url: str) -> tuple[int, int]:
    engine = create_engine(url)
    try:
        async with create_session_factory(engine)() as session:
            done = (
                await session.execute(
                    select(func.count()).select_from(Job).where(Job.state == JobState.succeeded)  # type: ignore[arg-type]
                )
            ).scalar_one()
            total = (await session.execute(select(func.count()).select_from(Job))).scalar_one()
            return int(done), int(total)
    finally:
        await engine.dispose()


async def through_store(url: str, jobs: int) -> float:
    engine = create_engine(url)
    try:
        sessions = create_session_factory(engine)
        cycles = 0
        start = time.perf_counter()
        while True:
            async with sessions() as session:
                job = await store.claim_next_job(
                    session=session, worker_id=WORKER, lease_seconds=LEASE_SECONDS
                )
            if job is None:
                break
            async with sessions() as session:
                written = await store.finish_job(
                    session=session, job_id=job.id, worker_id=WORKER, result=RESULT
                )
            check(written, f"store: finish of {job.id} not written")
            cycles += 1
        elapsed = time.perf_counter() - start
    finally:
        await engine.dispose()
    check(cycles == jobs, f"store: {cycles} cycles for {jobs} jobs")
    return cycles / elapsed


def _naive(instant: datetime) -> str:
    return instant.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def raw_sqlite(path: str, jobs: int) -> float:
    connection = sqlite3.connect(path, timeout=30)
    try:
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=30000",
            "PRAGMA foreign_keys=ON",
        ):
            connection.execute(pragma)
        cycles = 0
        start = time.perf_counter()
        while True:
            now = datetime.now(UTC)
            lease = now + timedelta(seconds=LEASE_SECONDS)
            row = connection.execute(
                SQLITE_CLAIM,
                (
                    "running",
                    1,
                    WORKER,
                    _naive(lease),
                    _naive(now),
                    "queued",
                    _naive(now),
                    "running",
                    1,
                    0,
                    "queued",
                ),
            ).fetchone()
            connection.commit()
            if row is None:
                break
            job_id = row[ID_INDEX]
            finished = datetime.now(UTC)
            written = connection.execute(
                SQLITE_FINISH,
                (
                    "succeeded",
                    None,
                    0,
                    None,
                    0,
                    "null",
                    0,
                    "hi\n",
                    "",
                    0,
                    None,
                    "null",
                    None,
                    "pending",
                    _naive(finished),
                    _naive(finished),
                    job_id,
                    WORKER,
                    "running",
                ),
            ).rowcount
            connection.commit()
            check(written == 1, f"raw sqlite3: finish of {job_id} not written")
            cycles += 1
        elapsed = time.perf_counter() - start
    finally:
        connection.close()
    check(cycles == jobs, f"raw sqlite3: {cycles} cycles for {jobs} jobs")
    return cycles / elapsed


async def raw_asyncpg(url: str, jobs: int) -> float:
    connection = await asyncpg.connect(asyncpg_dsn(url))  # type: ignore[no-untyped-call]
    try:
        cycles = 0
        start = time.perf_counter()
        while True:
            now = datetime.now(UTC).replace(tzinfo=None)
            async with connection.transaction():
                row = await connection.fetchrow(
                    PG_CLAIM,
                    "running",
                    1,
                    WORKER,
                    now + timedelta(seconds=LEASE_SECONDS),
                    now,
                    "queued",
                    "running",
                    1,
                    "queued",
                )
            if row is None:
                break
            job_id: uuid.UUID = row["id"]
            finished = datetime.now(UTC)
            async with connection.transaction():
                await connection.execute(PG_NOTIFY, "jobdock_job_events", str(job_id))
                status = await connection.execute(
                    PG_FINISH,
                    "succeeded",
                    None,
                    False,
                    None,
                    "null",
                    0,
                    "hi\n",
                    "",
                    False,
                    None,
                    "null",
                    None,
                    "pending",
                    finished.replace(tzinfo=None),
                    job_id,
                    WORKER,
                    "running",
                )
            check(status == "UPDATE 1", f"raw asyncpg: finish of {job_id} not written")
            cycles += 1
        elapsed = time.perf_counter() - start
    finally:
        await connection.close()
    check(cycles == jobs, f"raw asyncpg: {cycles} cycles for {jobs} jobs")
    return cycles / elapsed


async def run(
    results: Results,
    *,
    workdir: Path,
    database: Database,
    jobs: int,
    rounds: int,
    profile_dir: Path | None = None,
) -> None:
    part = "4 database"
    kinds = ["sqlite"] + (["postgres"] if database.kind == "postgres" else [])
    for kind in kinds:
        source = Database("sqlite") if kind == "sqlite" else database
        ours: list[float] = []
        raw: list[float] = []
        await check_same_sql(await source.fresh_url(workdir), kind)
        for index in range(rounds):
            url = await source.fresh_url(workdir)
            await prepared(url, jobs)
            profile = (
                profile_dir / f"database-store-{kind}.txt"
                if profile_dir is not None and index == 0
                else None
            )
            with profiled(os.getpid(), profile, 600):
                ours.append(await through_store(url, jobs))
            check(await count_succeeded(url) == (jobs, jobs), "store: not every job succeeded")
            url = await source.fresh_url(workdir)
            await prepared(url, jobs)
            if kind == "sqlite":
                path = make_url(url).database
                assert path is not None
                raw.append(raw_sqlite(path, jobs))
            else:
                raw.append(await raw_asyncpg(url, jobs))
            check(await count_succeeded(url) == (jobs, jobs), "raw: not every job succeeded")
            print(f"  {kind}: store {ours[-1]:.0f}/s, raw {raw[-1]:.0f}/s", flush=True)
        ratio = median(ours) / median(raw)
        raw_name = "raw sqlite3" if kind == "sqlite" else "raw asyncpg"
        results.add(
            part,
            f"{kind}: claim+finish cycles/s, store vs {raw_name} ({jobs} jobs); ratio",
            f"{median(ours):.0f} vs {median(raw):.0f}; {ratio:.2f}",
            ">= 0.25" if kind == "sqlite" else "",
            ratio >= 0.25 if kind == "sqlite" else None,
        )
