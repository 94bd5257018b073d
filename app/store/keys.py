"""Every query on API keys, and the per-key job counts that quotas need."""

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.db import PreparedRead, Reader, read_first
from app.errors import ApiKeyNameTaken, ApiKeyNotFound
from app.models import ApiKey, Job, JobState, utc_now


async def create_key(
    *,
    session: AsyncSession,
    name: str,
    key_hash: str,
    admin: bool = False,
    max_queued: int | None = None,
    max_running: int | None = None,
) -> ApiKey:
    key = ApiKey(
        name=name,
        key_hash=key_hash,
        admin=admin,
        max_queued=max_queued,
        max_running=max_running,
    )
    session.add(key)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise ApiKeyNameTaken(f"an API key named {name!r} already exists") from None
    return key


async def list_keys(*, session: AsyncSession) -> Sequence[ApiKey]:
    return (
        (await session.execute(select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.name))))
        .scalars()
        .all()
    )


async def revoke_key(*, session: AsyncSession, name: str) -> ApiKey:
    """Revoke the key named `name` (at once, for every process); revoking twice is a no-op."""
    await session.execute(
        update(ApiKey)
        .where(col(ApiKey.name) == name, col(ApiKey.revoked_at).is_(None))
        .values(revoked_at=utc_now())
    )
    await session.commit()
    key = (
        await session.execute(select(ApiKey).where(col(ApiKey.name) == name))
    ).scalar_one_or_none()
    if key is None:
        raise ApiKeyNotFound(f"no API key is named {name!r}")
    return key


_KEYS = ApiKey.__table__.c  # type: ignore[attr-defined]
# Core statements (no ORM entities), built once: every request runs one of them.
_FIND_ACTIVE_KEY = select(
    _KEYS.id, _KEYS.name, _KEYS.key_hash, _KEYS.admin, _KEYS.max_queued, _KEYS.max_running
).where(_KEYS.key_hash == bindparam("key_hash"), _KEYS.revoked_at.is_(None))
_ANY_ACTIVE_KEY = select(exists().where(_KEYS.revoked_at.is_(None)).label("any_active"))
# The same on the raw driver connection (see app.db.read_first).
_PREPARED_FIND_ACTIVE_KEY = PreparedRead(_FIND_ACTIVE_KEY)
_PREPARED_ANY_ACTIVE_KEY = PreparedRead(_ANY_ACTIVE_KEY)


async def find_active_key(*, session: Reader, key_hash: str) -> dict[str, Any] | None:
    """The active key with this hash: its id, name, key_hash, admin, max_queued and
    max_running by name (not the ORM object: this runs on every request, on a session, a
    bare connection or a SyncReader)."""
    return await read_first(session, _PREPARED_FIND_ACTIVE_KEY, {"key_hash": key_hash})


async def any_active_key(*, session: Reader) -> bool:
    """Whether the service requires keys: some key exists that is not revoked."""
    row = await read_first(session, _PREPARED_ANY_ACTIVE_KEY, {})
    return row is not None and bool(row["any_active"])


async def count_active_jobs(*, session: AsyncSession, owner: uuid.UUID) -> tuple[int, int]:
    """How many of the owner's jobs are queued, and how many running."""
    rows = await session.execute(
        select(col(Job.state), func.count())
        .where(col(Job.owner) == owner, col(Job.state).in_((JobState.queued, JobState.running)))
        .group_by(col(Job.state))
    )
    counts = {JobState(state): count for state, count in rows}
    return counts.get(JobState.queued, 0), counts.get(JobState.running, 0)
