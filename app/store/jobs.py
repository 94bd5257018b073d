"""Every query on jobs. Writes are single statements, so SQLite and PostgreSQL behave alike."""

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Boolean,
    CursorResult,
    Insert,
    Row,
    String,
    Table,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import defer, make_transient_to_detached
from sqlmodel import col

from app.db import (
    COMMITS_WITH_STATEMENT,
    JOB_EVENTS_CHANNEL,
    SUBMISSIONS_CHANNEL,
    PreparedInsert,
    PreparedRead,
    Reader,
    SyncWriter,
    read_first,
)
from app.errors import (
    IdempotencyKeyReused,
    InvalidCursor,
    JobAlreadyFinished,
    JobNotFound,
    JobStillActive,
    QueueFull,
    QuotaExceeded,
)
from app.models import (
    TERMINAL_STATES,
    ApiKey,
    AppliedLimits,
    AttemptRecord,
    CallbackState,
    Instance,
    Job,
    JobCreate,
    JobPublic,
    JobResult,
    JobState,
    LogChunk,
    utc_now,
)
from app.settings import Settings

# Jobs purged per statement by the retention, so one purge never holds a long lock.
PURGE_BATCH_SIZE = 500
# No execution options.
EMPTY: dict[str, Any] = {}
LOST_WITH_WORKER = "lost with its worker: its lease expired while it was running"


def parse_job_id(raw: str) -> uuid.UUID:
    """Read a job id from a URL; anything that is not a UUID names no job."""
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise JobNotFound(f"no job has the id {raw!r}") from None


def _is_postgresql(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# The hot statements below (claim, the writes under a claim, lease renewal, notify) are built
# once, in SQLAlchemy Core on the tables, with bind parameters for every per-call value:
# each execution then reuses the statement's memoized cache key and its compiled form, and
# skips the ORM's bulk-UPDATE machinery. Bind names never equal column names (SQLAlchemy
# reserves those in SET clauses).
JOBS: Table = Job.__table__  # type: ignore[attr-defined]
LOG_CHUNKS: Table = LogChunk.__table__  # type: ignore[attr-defined]
_JOB_MANAGER = inspect(Job).class_manager


def _job_from_row(row: Row[Any]) -> Job:
    """A detached Job of a full row of `jobs`, as a query and a closed session would leave it
    (without validating it again, which costs far more than the claim's SQL)."""
    job: Job = _JOB_MANAGER.new_instance()
    job.__dict__.update(row._mapping)
    make_transient_to_detached(job)
    return job


@cache
def _notify_statement() -> Any:
    return select(
        func.pg_notify(
            bindparam("notify_channel", type_=String()), bindparam("notify_payload", type_=String())
        )
    )


async def notify_job_changed(session: AsyncSession, job_id: uuid.UUID) -> None:
    """On PostgreSQL, tell callers waiting in other processes (delivered on commit)."""
    if _is_postgresql(session):
        await session.execute(
            _notify_statement(),
            {"notify_channel": JOB_EVENTS_CHANNEL, "notify_payload": str(job_id)},
        )


def request_hash(job_in: JobCreate) -> str:
    """A fingerprint of what a submission asks for: equal for equal jobs, however spelled."""
    canonical = json.dumps(job_in.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _new_job(
    job_in: JobCreate, settings: Settings, owner: uuid.UUID | None = None
) -> dict[str, Any]:
    """The row of a new queued job (every column: the Job defaults, then what the caller
    asked for, then the service's defaults for what it left out). Built directly from the
    validated submission: no second validation as a Job."""
    row = {name: factory() for name, factory in _JOB_DEFAULT_FACTORIES}
    row.update(_JOB_DEFAULTS)
    row.update({name: getattr(job_in, name) for name in _SUBMITTED_FIELDS})
    row["cpu_shares"] = job_in.cpu_shares or settings.default_cpu_shares
    row["cpus"] = job_in.cpus or settings.default_cpus
    row["memory_mb"] = job_in.memory_mb or settings.default_memory_mb
    row["timeout_seconds"] = job_in.timeout_seconds or settings.default_timeout_seconds
    row["owner"] = owner
    return row


async def _count_queued(session: Reader, owner: uuid.UUID | None = None) -> int:
    """How many jobs are queued (of the owner's, with `owner`)."""
    count = await session.execute(_COUNT_QUEUED[owner is not None], {"count_owner": owner})
    return int(count.scalar_one())


async def _check_queue_room(session: Reader, settings: Settings, adding: int) -> None:
    if not settings.max_queued:
        return
    # Whether queued + adding > max_queued, without counting every queued job.
    if await _more_queued_than(session, None, settings.max_queued - adding):
        queued = await _count_queued(session)  # for the message only
        raise QueueFull(
            f"the queue is full: {queued} jobs are waiting and this service takes at most "
            f"{settings.max_queued}; retry later",
            retry_after_seconds=settings.queue_full_retry_after_seconds,
        )


async def _check_owner_quota(
    session: Reader,
    settings: Settings,
    owner: uuid.UUID | None,
    max_queued: int | None,
    adding: int,
) -> None:
    """429 for a key whose queued jobs would exceed its quota."""
    if owner is None or max_queued is None:
        return
    if await _more_queued_than(session, owner, max_queued - adding):
        queued = await _count_queued(session, owner)  # for the message only
        raise QuotaExceeded(
            f"this API key has {queued} jobs queued and may have at most {max_queued}; "
            "retry when some have started",
            retry_after_seconds=settings.queue_full_retry_after_seconds,
        )


def _scoped_key(owner: uuid.UUID | None, key: str) -> str:
    """An Idempotency-Key as stored: scoped by its owner, so tenants never collide."""
    return key if owner is None else f"{owner.hex}:{key}"


async def _add_jobs(
    session: AsyncSession | AsyncConnection, jobs: Sequence[dict[str, Any]]
) -> None:
    """Insert the rows (one Core INSERT, no unit of work) and commit. Each row has every
    column (see _new_job); on SQLite its parameters are converted without SQLAlchemy's
    execution context (see PreparedInsert)."""
    if not _executes_on_postgresql(session):
        connection = session if isinstance(session, AsyncConnection) else await session.connection()
        await connection.exec_driver_sql(
            _PREPARED_INSERT_JOB.sql(connection.dialect),
            _PREPARED_INSERT_JOB.rows(connection.dialect, jobs),
            execution_options=COMMITS_WITH_STATEMENT,
        )
        await session.commit()
        return
    await session.execute(_INSERT_JOB, list(jobs) if len(jobs) > 1 else jobs[0])
    # Delivered on commit: idle workers in other processes look for work at once.
    await session.execute(
        _notify_statement(), {"notify_channel": SUBMISSIONS_CHANNEL, "notify_payload": ""}
    )
    await session.commit()


async def _add_jobs_on(writer: SyncWriter, jobs: Sequence[dict[str, Any]]) -> bool:
    """_add_jobs on a SQLite file's SyncWriter; False (nothing written) when another process
    holds the write lock."""
    dialect = writer.dialect
    return await writer.insert(
        _PREPARED_INSERT_JOB.sql(dialect), _PREPARED_INSERT_JOB.rows(dialect, jobs)
    )


async def _job_with_key(
    session: AsyncSession | AsyncConnection, key: str, fingerprint: str, settings: Settings
) -> dict[str, Any] | None:
    """The live job (its row) submitted under `key`, if any; an expired key is released."""
    found = (await session.execute(select(JOBS).where(JOBS.c.idempotency_key == key))).one_or_none()
    if found is None:
        return None
    job: dict[str, Any] = found._asdict()
    if job["created_at"] <= utc_now() - settings.idempotency_ttl:
        await session.execute(
            update(JOBS)
            .where(JOBS.c.id == job["id"], JOBS.c.idempotency_key == key)
            .values(idempotency_key=None, request_hash=None)
        )
        await session.commit()
        return None
    if job["request_hash"] != fingerprint:
        # The caller's own key, not the owner-scoped form it is stored in.
        owner = job["owner"]
        shown = key if owner is None else key.removeprefix(f"{owner.hex}:")
        raise IdempotencyKeyReused(
            f"the Idempotency-Key {shown!r} was used for a different request "
            f"(job {job['id']}); use a new key for a new job"
        )
    return job


async def create_job(
    *,
    session: AsyncSession | AsyncConnection,
    job_in: JobCreate,
    settings: Settings,
    idempotency_key: str | None = None,
    owner: uuid.UUID | None = None,
    owner_max_queued: int | None = None,
    reader: Reader | None = None,
) -> tuple[Job, bool]:
    """Queue a job. With an idempotency key already used for the same request, the job
    it made is returned instead; the flag says whether a job was created.

    `owner` (the submitting API key) owns the job and scopes its idempotency key;
    `owner_max_queued` is that key's quota of queued jobs. Writes and commits on `session`,
    a session or a bare connection; reads the quotas on `reader` if given (the quotas were
    never read in the write transaction on SQLite, where reads run in autocommit)."""
    stored_key = None if idempotency_key is None else _scoped_key(owner, idempotency_key)
    fingerprint = None
    if stored_key is not None:
        fingerprint = request_hash(job_in)
        existing = await _job_with_key(session, stored_key, fingerprint, settings)
        if existing is not None:
            return _detached_job(existing), False
    await _check_owner_quota(reader or session, settings, owner, owner_max_queued, 1)
    await _check_queue_room(reader or session, settings, 1)
    job = _new_job(job_in, settings, owner)
    if stored_key is not None:
        job["idempotency_key"] = stored_key
        job["request_hash"] = fingerprint
    try:
        await _add_jobs(session, [job])
    except IntegrityError:
        # The same key, submitted at the same moment by another request, won.
        await session.rollback()
        if stored_key is None or fingerprint is None:
            raise
        existing = await _job_with_key(session, stored_key, fingerprint, settings)
        if existing is None:
            raise
        return _detached_job(existing), False
    return _detached_job(job), True


async def create_jobs(
    *,
    session: AsyncSession | AsyncConnection,
    jobs_in: Sequence[JobCreate],
    settings: Settings,
    owner: uuid.UUID | None = None,
    owner_max_queued: int | None = None,
) -> list[Job]:
    """Queue several jobs in one transaction: all of them or none."""
    await _check_owner_quota(session, settings, owner, owner_max_queued, len(jobs_in))
    await _check_queue_room(session, settings, len(jobs_in))
    jobs = [_new_job(job_in, settings, owner) for job_in in jobs_in]
    await _add_jobs(session, jobs)
    return [_detached_job(job) for job in jobs]


async def get_job(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> Job:
    """The job; with `owner`, only if that key owns it (another tenant's job is not found)."""
    job = await session.get(Job, job_id, populate_existing=True)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFound(f"no job has the id {job_id}")
    return job


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id.hex]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        position = datetime.fromisoformat(created_at), uuid.UUID(job_id)
        if position[0].tzinfo is None:
            raise InvalidCursor()
        # Out-of-range instants (year 1 east of UTC, year 9999 west) overflow here, not in SQL.
        return position[0].astimezone(UTC), position[1]
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError, OverflowError):
        raise InvalidCursor() from None


async def list_jobs(
    *,
    session: AsyncSession,
    state: JobState | None = None,
    labels: dict[str, str] | None = None,
    image: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int,
    cursor: str | None = None,
    owner: uuid.UUID | None = None,
) -> tuple[Sequence[Job], str | None]:
    """One page of jobs, newest first, without their output; every filter must hold."""
    query = select(Job).options(
        defer(Job.stdout),  # type: ignore[arg-type]
        defer(Job.stderr),  # type: ignore[arg-type]
        defer(Job.stdin),  # type: ignore[arg-type]
    )
    if owner is not None:
        query = query.where(col(Job.owner) == owner)
    if state is not None:
        query = query.where(col(Job.state) == state)
    for key, value in (labels or {}).items():
        query = query.where(col(Job.labels)[key].as_string() == value)
    if image is not None:
        query = query.where(col(Job.image) == image)
    if created_after is not None:
        query = query.where(col(Job.created_at) > created_after)
    if created_before is not None:
        query = query.where(col(Job.created_at) < created_before)
    if cursor is not None:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(
                col(Job.created_at) < created_at,
                and_(col(Job.created_at) == created_at, col(Job.id) < job_id),
            )
        )
    query = query.order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit + 1)
    jobs = (await session.execute(query)).scalars().all()
    if len(jobs) > limit:
        return jobs[:limit], _encode_cursor(jobs[limit - 1])
    return jobs, None


def _owned_by(owner: uuid.UUID | None) -> list[Any]:
    return [] if owner is None else [col(Job.owner) == owner]


async def delete_job(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> None:
    """Remove a finished job and its logs; a queued or running job is refused."""
    deleted = await session.execute(
        delete(Job)
        .where(col(Job.id) == job_id, col(Job.state).in_(TERMINAL_STATES), *_owned_by(owner))
        .returning(col(Job.id))
    )
    if deleted.scalar_one_or_none() is None:
        await session.rollback()
        job = await get_job(session=session, job_id=job_id, owner=owner)
        raise JobStillActive(
            f"job {job_id} is {job.state.value}; cancel it and wait until it ends, then delete it"
        )
    await session.execute(delete(LogChunk).where(col(LogChunk.job_id) == job_id))
    await session.commit()


async def purge_finished_jobs(
    *, session: AsyncSession, finished_before: datetime, batch_size: int = PURGE_BATCH_SIZE
) -> int:
    """Delete up to `batch_size` jobs (and their logs) that finished before the instant."""
    job_ids = (
        (
            await session.execute(
                select(col(Job.id))
                .where(
                    col(Job.finished_at) < finished_before,
                    col(Job.state).in_(TERMINAL_STATES),
                )
                .limit(batch_size)
            )
        )
        .scalars()
        .all()
    )
    if not job_ids:
        await session.commit()
        return 0
    await session.execute(delete(LogChunk).where(col(LogChunk.job_id).in_(job_ids)))
    result = await session.execute(
        delete(Job)
        .where(col(Job.id).in_(job_ids), col(Job.state).in_(TERMINAL_STATES))
        .returning(col(Job.id))
    )
    purged = len(result.all())
    await session.commit()
    return purged


async def _update_job(
    session: AsyncSession, conditions: Sequence[Any], **values: Any
) -> Job | None:
    """One UPDATE of the job that matches `conditions`; the job as it is now, or None."""
    result = await session.execute(
        update(Job)
        .where(*conditions)
        .values(**values)
        .returning(Job)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()


def _terminal(
    state: JobState | BindParameter[Any], now: datetime | BindParameter[Any], **values: Any
) -> dict[str, Any]:
    """The columns of a job reaching a terminal state; its webhook, if any, becomes due.

    On the table's columns, not the ORM's: usable in Core statements and ORM ones alike."""
    return {
        "state": state,
        "finished_at": now,
        "lease_expires_at": None,
        "callback_state": case(
            (JOBS.c.callback_url.is_not(None), CallbackState.pending.value), else_=None
        ),
        "callback_next_at": case((JOBS.c.callback_url.is_not(None), now), else_=None),
        # No attempt will read it again; it may be large, or secret.
        "stdin": None,
        **values,
    }


async def cancel_job(
    *, session: AsyncSession, job_id: uuid.UUID, owner: uuid.UUID | None = None
) -> Job:
    """Cancel a queued job at once, or ask the worker of a running job to kill it."""
    now = utc_now()
    job = await _update_job(
        session,
        [col(Job.id) == job_id, col(Job.state) == JobState.queued, *_owned_by(owner)],
        **_terminal(
            JobState.cancelled, now, cancel_requested=True, error="cancelled before it started"
        ),
    )
    if job is not None:
        await notify_job_changed(session, job_id)
    if job is None:
        job = await _update_job(
            session,
            [col(Job.id) == job_id, col(Job.state) == JobState.running, *_owned_by(owner)],
            cancel_requested=True,
        )
    await session.commit()
    if job is not None:
        return job
    existing = await get_job(session=session, job_id=job_id, owner=owner)
    raise JobAlreadyFinished(f"job {job_id} has already finished: it is {existing.state.value}")


async def claim_next_job(
    *, session: AsyncSession, worker_id: str, lease_seconds: float
) -> Job | None:
    """Atomically move the best queued job to running under this worker's lease.

    The job comes back detached, with every column as the claim left it."""
    now = utc_now()
    claimed = await session.execute(
        _claim_statement(),
        {
            "claim_now": now,
            "claim_worker_id": worker_id,
            "claim_lease_expires_at": now + timedelta(seconds=lease_seconds),
        },
        execution_options=COMMITS_WITH_STATEMENT,
    )
    row = claimed.one_or_none()
    await session.commit()
    return None if row is None else _job_from_row(row)


@cache
def _claim_statement() -> Update:
    """UPDATE the best queued job (FOR UPDATE SKIP LOCKED on PostgreSQL) to running;
    RETURNING the whole row. Binds: claim_now, claim_worker_id, claim_lease_expires_at."""
    now = bindparam("claim_now", type_=JOBS.c.run_after.type)
    best = (
        select(JOBS.c.id)
        .where(
            JOBS.c.state == JobState.queued,
            JOBS.c.run_after <= now,
            _owner_below_max_running(),
        )
        .order_by(JOBS.c.priority.desc(), JOBS.c.created_at.asc())
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(JOBS)
        .where(JOBS.c.id == best, JOBS.c.state == JobState.queued)
        .values(
            state=JobState.running,
            worker_id=bindparam("claim_worker_id", type_=JOBS.c.worker_id.type),
            attempt=JOBS.c.attempt + 1,
            lease_expires_at=bindparam(
                "claim_lease_expires_at", type_=JOBS.c.lease_expires_at.type
            ),
            started_at=now,
        )
        .returning(*JOBS.c)
    )


def _owner_below_max_running() -> Any:
    """A queued job may start unless its owner's key already runs its `max_running` jobs.

    The keys at their limit are found once per claim (not per candidate row): a tenant with
    a long blocked queue does not slow down the claim for everyone else. A job without
    owner passes at once. Concurrent claims may overshoot a limit by at most the number
    of claims made at the same instant.
    """
    keys: Table = ApiKey.__table__  # type: ignore[attr-defined]
    running = JOBS.alias("running_jobs")
    running_count = (
        select(func.count())
        .select_from(running)
        .where(running.c.owner == keys.c.id, running.c.state == JobState.running)
        .correlate(keys)
        .scalar_subquery()
    )
    at_limit = select(keys.c.id).where(
        keys.c.max_running.is_not(None), keys.c.max_running <= running_count
    )
    return or_(JOBS.c.owner.is_(None), JOBS.c.owner.not_in(at_limit))


def _held_update(values: dict[str, Any]) -> Update:
    """An UPDATE of a running job only while this worker's claim on it holds (binds:
    held_job_id, held_worker_id). Without RETURNING: its row count says whether it held
    (one round trip to SQLite's thread fewer than fetching a returned row)."""
    return (
        update(JOBS)
        .where(
            JOBS.c.id == bindparam("held_job_id", type_=JOBS.c.id.type),
            JOBS.c.worker_id == bindparam("held_worker_id", type_=JOBS.c.worker_id.type),
            JOBS.c.state == JobState.running,
        )
        .values(values)
    )


async def _write_while_held(
    session: AsyncSession,
    statement: Update,
    params: dict[str, Any],
    chunks: Sequence[LogChunk] = (),
    *,
    number_chunks: bool = False,
) -> bool:
    """Run a `_held_update`; while the claim holds, store the job's last log chunks in the
    same transaction; commit.

    With `number_chunks`, the chunks' seqs count on from the job's last stored chunk (0
    for none): the first chunk's INSERT reads it (see `_numbered_chunk_insert`), the
    others follow in one executemany. Otherwise they go as numbered, in one executemany."""
    written = await session.execute(
        statement, params, execution_options=EMPTY if chunks else COMMITS_WITH_STATEMENT
    )
    held = cast("CursorResult[Any]", written).rowcount == 1
    if held and chunks:
        offset = 0
        if number_chunks:
            first, *chunks = chunks
            first_seq = (
                await session.execute(_numbered_chunk_insert(), _numbered_chunk_params(first))
            ).scalar_one()
            offset = first_seq - first.seq
        if chunks:
            await session.execute(insert(LOG_CHUNKS), chunk_rows(chunks, offset))
    await session.commit()
    return held


@cache
def _numbered_chunk_insert() -> Insert:
    """INSERT a chunk as the job's next one: its seq, one past the job's last stored
    chunk's (or 0), is read by the INSERT itself and RETURNED.

    The caller holds the job's claim in this transaction (the job's row is written first):
    under SQLite's write lock, or the row lock on PostgreSQL, with every writer of chunks
    checking the claim, no other attempt's chunks can commit meanwhile."""
    job_id = bindparam("chunk_job_id", type_=LOG_CHUNKS.c.job_id.type)
    stored = LOG_CHUNKS.alias("stored_chunks")
    return (
        insert(LOG_CHUNKS)
        .values(
            job_id=job_id,
            seq=select(func.coalesce(func.max(stored.c.seq) + 1, 0))
            .where(stored.c.job_id == job_id)
            .scalar_subquery(),
            attempt=bindparam("chunk_attempt", type_=LOG_CHUNKS.c.attempt.type),
            stream=bindparam("chunk_stream", type_=LOG_CHUNKS.c.stream.type),
            data=bindparam("chunk_data", type_=LOG_CHUNKS.c.data.type),
            created_at=bindparam("chunk_created_at", type_=LOG_CHUNKS.c.created_at.type),
        )
        .returning(LOG_CHUNKS.c.seq)
    )


def _numbered_chunk_params(chunk: LogChunk) -> dict[str, Any]:
    """The parameters of `_numbered_chunk_insert` for a chunk (its own seq is not used)."""
    return {
        "chunk_job_id": chunk.job_id,
        "chunk_attempt": chunk.attempt,
        "chunk_stream": chunk.stream,
        "chunk_data": chunk.data,
        "chunk_created_at": chunk.created_at,
    }


def chunk_rows(chunks: Sequence[LogChunk], offset: int = 0) -> list[dict[str, Any]]:
    """The rows of log chunks (seqs shifted by `offset`), for a Core executemany INSERT."""
    return [
        {
            "job_id": chunk.job_id,
            "seq": offset + chunk.seq,
            "attempt": chunk.attempt,
            "stream": chunk.stream,
            "data": chunk.data,
            "created_at": chunk.created_at,
        }
        for chunk in chunks
    ]


def held_by(job_id: uuid.UUID, worker_id: str) -> list[object]:
    """The conditions of a running job still claimed by this worker."""
    return [
        col(Job.id) == job_id,
        col(Job.worker_id) == worker_id,
        col(Job.state) == JobState.running,
    ]


@cache
def _record_container_statement() -> Update:
    return _held_update(
        {
            "container_id": bindparam("record_container_id", type_=JOBS.c.container_id.type),
            "limits": bindparam("record_limits", type_=JOBS.c.limits.type),
        }
    )


async def record_container(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    container_id: str,
    limits: AppliedLimits,
) -> None:
    await _write_while_held(
        session,
        _record_container_statement(),
        {
            "held_job_id": job_id,
            "held_worker_id": worker_id,
            "record_container_id": container_id,
            "record_limits": limits.model_dump(),
        },
    )


@cache
def _release_statement() -> Update:
    return _held_update(
        {
            "state": JobState.queued,
            "worker_id": None,
            "lease_expires_at": None,
            "started_at": None,
            "attempt": JOBS.c.attempt - 1,
        }
    )


async def release_job(*, session: AsyncSession, job_id: uuid.UUID, worker_id: str) -> bool:
    """Undo a claim whose job never started: back to the queue, the attempt not counted."""
    return await _write_while_held(
        session, _release_statement(), {"held_job_id": job_id, "held_worker_id": worker_id}
    )


@cache
def _renew_statement() -> Update:
    return (
        update(JOBS)
        .where(
            JOBS.c.id.in_(bindparam("renew_job_ids", expanding=True)),
            JOBS.c.worker_id == bindparam("renew_worker_id", type_=JOBS.c.worker_id.type),
            JOBS.c.state == JobState.running,
        )
        .values(
            lease_expires_at=bindparam("renew_lease_expires_at", type_=JOBS.c.lease_expires_at.type)
        )
        .returning(JOBS.c.id, JOBS.c.cancel_requested)
    )


async def renew_leases(
    *, session: AsyncSession, worker_id: str, job_ids: Sequence[uuid.UUID], lease_seconds: float
) -> dict[uuid.UUID, bool]:
    """Extend this worker's leases; returns each still-held job and whether cancel was asked."""
    if not job_ids:
        return {}
    result = await session.execute(
        _renew_statement(),
        {
            "renew_job_ids": list(job_ids),
            "renew_worker_id": worker_id,
            "renew_lease_expires_at": utc_now() + timedelta(seconds=lease_seconds),
        },
        execution_options=COMMITS_WITH_STATEMENT,
    )
    held = {job_id: cancel for job_id, cancel in result}
    await session.commit()
    return held


@cache
def _finish_statement() -> Update:
    def bound(name: str) -> BindParameter[Any]:
        return bindparam(f"finish_{name}", type_=JOBS.c[name].type)

    return _held_update(
        _terminal(
            bound("state"),
            bindparam("finish_now", type_=JOBS.c.finished_at.type),
            exit_code=bound("exit_code"),
            stdout=bound("stdout"),
            stderr=bound("stderr"),
            output_truncated=bound("output_truncated"),
            error=bound("error"),
            resources=bound("resources"),
            # Only when the result brings them: otherwise what was recorded stays.
            container_id=case(
                (bindparam("finish_has_container", type_=Boolean()), bound("container_id")),
                else_=JOBS.c.container_id,
            ),
            limits=case(
                (bindparam("finish_has_container", type_=Boolean()), bound("limits")),
                else_=JOBS.c.limits,
            ),
        )
    )


async def finish_job(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    worker_id: str,
    result: JobResult,
    chunks: Sequence[LogChunk] = (),
    number_chunks: bool = False,
) -> bool:
    """Write a terminal state, only while this worker's claim holds. False if it did not.

    `chunks`, the attempt's last log chunks, are stored in the same transaction; with
    `number_chunks`, they take the job's next seqs, in order, read by their INSERT (so the
    caller need not query the job's next seq first)."""
    if not result.state.is_terminal:
        raise ValueError(f"{result.state} is not a terminal state")
    await notify_job_changed(session, job_id)
    return await _write_while_held(
        session,
        _finish_statement(),
        {
            "held_job_id": job_id,
            "held_worker_id": worker_id,
            "finish_state": result.state,
            "finish_now": utc_now(),
            "finish_exit_code": result.exit_code,
            "finish_stdout": result.stdout,
            "finish_stderr": result.stderr,
            "finish_output_truncated": result.output_truncated,
            "finish_error": result.error,
            "finish_resources": None if result.resources is None else result.resources.model_dump(),
            "finish_has_container": result.container_id is not None,
            "finish_container_id": result.container_id,
            "finish_limits": None if result.limits is None else result.limits.model_dump(),
        },
        chunks,
        number_chunks=number_chunks,
    )


async def take_over_job(
    *,
    session: AsyncSession,
    job_id: uuid.UUID,
    attempt: int,
    worker_id: str,
    lease_seconds: float,
    only_if_lease_expired: bool,
) -> Job | None:
    """Move a running attempt's claim to this worker, which found its container.

    Conditional on the job still running that very attempt, so a finished or retried job
    is never taken over.
    """
    now = utc_now()
    conditions = [
        col(Job.id) == job_id,
        col(Job.state) == JobState.running,
        col(Job.attempt) == attempt,
    ]
    if only_if_lease_expired:
        conditions.append(col(Job.lease_expires_at) < now)
    job = await _update_job(
        session,
        conditions,
        worker_id=worker_id,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
    )
    await session.commit()
    return job


def _requeued(run_after: datetime, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The columns of a job going back to the queue for its next attempt."""
    return {
        "state": JobState.queued,
        "worker_id": None,
        "lease_expires_at": None,
        "run_after": run_after,
        "started_at": None,
        "container_id": None,
        "limits": None,
        "attempts": attempts,
        "exit_code": None,
        "error": None,
        "stdout": "",
        "stderr": "",
        "output_truncated": False,
    }


async def retry_job(
    *,
    session: AsyncSession,
    job: Job,
    worker_id: str,
    result: JobResult,
    run_after: datetime,
    chunks: Sequence[LogChunk] = (),
    number_chunks: bool = False,
) -> bool:
    """Record a failed attempt and queue the next one, only while this worker's claim holds.

    `chunks`, the attempt's last log chunks, are stored in the same transaction (numbered
    as by `finish_job`)."""
    record = AttemptRecord(
        attempt=job.attempt,
        state=result.state,
        exit_code=result.exit_code,
        error=result.error,
        worker_id=worker_id,
        started_at=job.started_at,
        finished_at=utc_now(),
    )
    attempts = [*(job.attempts or []), record.model_dump(mode="json")]
    await notify_job_changed(session, job.id)
    return await _write_while_held(
        session,
        _held_update(_requeued(run_after, attempts)),
        {"held_job_id": job.id, "held_worker_id": worker_id},
        chunks,
        number_chunks=number_chunks,
    )


async def rescue_lost_jobs(
    *, session: AsyncSession, next_run_after: Callable[[int], datetime]
) -> list[tuple[uuid.UUID, JobState]]:
    """Re-queue, or end when its attempts are used, each running job whose lease expired.

    Each write is conditional on what was read (worker, attempt, lease), so a job its
    worker renewed or finished meanwhile is left alone.
    """
    now = utc_now()
    lost = (
        (
            await session.execute(
                select(Job)
                .options(defer(Job.stdout), defer(Job.stderr))  # type: ignore[arg-type]
                .where(col(Job.state) == JobState.running, col(Job.lease_expires_at) < now)
            )
        )
        .scalars()
        .all()
    )
    await session.commit()
    rescued = []
    for job in lost:
        record = AttemptRecord(
            attempt=job.attempt,
            state=JobState.failed,
            exit_code=None,
            error=LOST_WITH_WORKER,
            worker_id=job.worker_id,
            started_at=job.started_at,
            finished_at=now,
        )
        if job.attempt < job.max_attempts:
            state = JobState.queued
            attempts = [*(job.attempts or []), record.model_dump(mode="json")]
            values = _requeued(next_run_after(job.attempt), attempts)
        else:
            state = JobState.failed
            values = _terminal(state, now, error=LOST_WITH_WORKER)
        written = await session.execute(
            update(Job)
            .where(
                col(Job.id) == job.id,
                col(Job.state) == JobState.running,
                col(Job.worker_id) == job.worker_id,
                col(Job.attempt) == job.attempt,
                col(Job.lease_expires_at) < now,
            )
            .values(**values)
            .returning(col(Job.id))
        )
        if written.scalar_one_or_none() is not None:
            rescued.append((job.id, state))
            await notify_job_changed(session, job.id)
        await session.commit()
    return rescued


async def get_instance_id(*, session: AsyncSession) -> uuid.UUID:
    """The id of this installation's database (created by migration 0003)."""
    instance_id = (
        await session.execute(select(col(Instance.id)).order_by(col(Instance.created_at)).limit(1))
    ).scalar_one_or_none()
    if instance_id is None:
        instance = Instance()
        session.add(instance)
        await session.commit()
        return instance.id
    return instance_id


async def get_states(
    *, session: AsyncSession, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, JobState]:
    if not job_ids:
        return {}
    rows = await session.execute(
        select(col(Job.id), col(Job.state)).where(col(Job.id).in_(job_ids))
    )
    return {job_id: JobState(state) for job_id, state in rows}


# The submission: the columns a caller fills in, and every other column's Job default.
_SUBMITTED_FIELDS = tuple(JobCreate.model_fields)
_JOB_DEFAULTS = {
    name: field.default
    for name, field in Job.model_fields.items()
    if not field.is_required() and field.default_factory is None
}
_JOB_DEFAULT_FACTORIES: tuple[tuple[str, Callable[[], Any]], ...] = tuple(
    (name, field.default_factory)  # type: ignore[misc]  # none takes the validated data
    for name, field in Job.model_fields.items()
    if field.default_factory is not None
)
# What GET /jobs/{id} answers with (JobPublic's fields, all columns), by id; and by id and
# owner for a tenant's own jobs.
_READ_JOB = select(*(JOBS.c[name] for name in JobPublic.model_fields)).where(
    JOBS.c.id == bindparam("read_id")
)
_READ_OWN_JOB = _READ_JOB.where(JOBS.c.owner == bindparam("read_owner"))
# The same reads on the raw driver connection (see app.db.read_first).
_PREPARED_READS = {statement: PreparedRead(statement) for statement in (_READ_JOB, _READ_OWN_JOB)}


_INSERT_JOB = insert(JOBS)
# The same on SQLite, for whole rows (see _add_jobs).
_PREPARED_INSERT_JOB = PreparedInsert(_INSERT_JOB)


def _queued(by_owner: bool) -> Any:
    """The queued jobs (of the owner `count_owner`), as the index on state reads them."""
    owned = [JOBS.c.owner == bindparam("count_owner")] if by_owner else []
    return select(1).select_from(JOBS).where(JOBS.c.state == JobState.queued, *owned)


# The count of the queued jobs (of one owner); and a probe for the (n+1)th of them, which
# reads at most n + 1 index entries where a count reads all.
_COUNT_QUEUED = {
    by_owner: select(func.count()).select_from(_queued(by_owner).subquery())
    for by_owner in (False, True)
}
_PROBE_QUEUED = {
    by_owner: _queued(by_owner).limit(1).offset(bindparam("probe_offset"))
    for by_owner in (False, True)
}


async def _more_queued_than(session: Reader, owner: uuid.UUID | None, limit: int) -> bool:
    """Whether more than `limit` jobs are queued (of the owner's, with `owner`)."""
    if limit < 0:
        return True
    found = await session.execute(
        _PROBE_QUEUED[owner is not None], {"count_owner": owner, "probe_offset": limit}
    )
    return found.first() is not None


def _detached_job(row: dict[str, Any]) -> Job:
    """A detached Job of a full row, as a closed session would leave it (not validated
    again: the row was built from a validated submission, or read from the table)."""
    inspect(Job).attrs  # noqa: B018  configures the mappers once (none may have run yet)
    job: Job = _JOB_MANAGER.new_instance()
    job.__dict__.update(row)
    make_transient_to_detached(job)
    return job


def _executes_on_postgresql(session: AsyncSession | AsyncConnection) -> bool:
    if isinstance(session, AsyncConnection):
        return session.dialect.name == "postgresql"
    return _is_postgresql(session)


async def read_job(
    *,
    session: Reader,
    job_id: uuid.UUID,
    owner: uuid.UUID | None = None,
) -> dict[str, Any]:
    """get_job as a row of JobPublic's columns: one Core SELECT, no ORM identity map (on a
    session, a bare connection or a SyncReader). With `owner`, only that key's job."""
    statement, parameters = (
        (_READ_JOB, {"read_id": job_id})
        if owner is None
        else (_READ_OWN_JOB, {"read_id": job_id, "read_owner": owner})
    )
    job = await read_first(session, _PREPARED_READS[statement], parameters)
    if job is None:
        raise JobNotFound(f"no job has the id {job_id}")
    return job
