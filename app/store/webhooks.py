"""Every query on job webhooks: claim a due delivery, record an attempt, release a claim.

A terminal job with a `callback_url` has `callback_state='pending'` and `callback_next_at`
set to when its next attempt is due (app.store.jobs does that in every terminal write). A
deliverer claims one due job by moving `callback_next_at` forward by a lease, in one atomic
UPDATE ... RETURNING (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so with several worker
processes each attempt is made by one of them. The claimed `callback_next_at` is the
claim's token: recording the attempt, or giving the claim back, is conditional on it.
"""

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app.models import CallbackState, Job, WebhookDelivery, utc_now
from app.store.jobs import notify_job_changed


async def claim_due_delivery(*, session: AsyncSession, lease_seconds: float) -> Job | None:
    """Take the job whose webhook is due first, for `lease_seconds`; None if none is due.

    The returned job's `callback_next_at` is the claim: pass it to `record_delivery`.
    """
    now = utc_now()
    due = (
        select(col(Job.id))
        .where(col(Job.callback_state) == CallbackState.pending, col(Job.callback_next_at) <= now)
        .order_by(col(Job.callback_next_at).asc())
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    result = await session.execute(
        update(Job)
        # Checked again on the row itself: a claim that waited for another one's lock
        # finds the row no longer due and takes nothing.
        .where(
            col(Job.id) == due,
            col(Job.callback_state) == CallbackState.pending,
            col(Job.callback_next_at) <= now,
        )
        .values(callback_next_at=now + timedelta(seconds=lease_seconds))
        .returning(Job)
        .execution_options(populate_existing=True)
    )
    job = result.scalar_one_or_none()
    await session.commit()
    return job


def _claim_holds(job_id: uuid.UUID, claimed_until: datetime) -> list[Any]:
    return [
        col(Job.id) == job_id,
        col(Job.callback_state) == CallbackState.pending,
        col(Job.callback_next_at) == claimed_until,
    ]


async def record_delivery(
    *,
    session: AsyncSession,
    job: Job,
    delivery: WebhookDelivery,
    state: CallbackState,
    next_at: datetime | None,
) -> bool:
    """Append an attempt to the claimed job's deliveries and set where its webhook is now:
    `pending` again at `next_at`, `delivered` or `failed`. Only while the claim holds
    (the job as returned by `claim_due_delivery`); False if it did not."""
    if (state is CallbackState.pending) != (next_at is not None):
        raise ValueError("a pending webhook needs its next_at, and only a pending one")
    assert job.callback_next_at is not None, "not a claimed delivery"
    deliveries = [*(job.callback_deliveries or []), delivery.model_dump(mode="json")]
    written = await session.execute(
        update(Job)
        .where(*_claim_holds(job.id, job.callback_next_at))
        .values(callback_state=state, callback_next_at=next_at, callback_deliveries=deliveries)
        .returning(col(Job.id))
    )
    held = written.scalar_one_or_none() is not None
    if held:
        await notify_job_changed(session, job.id)
    await session.commit()
    return held


async def release_delivery(*, session: AsyncSession, job: Job) -> bool:
    """Give back a claim whose attempt was not made (the worker is stopping): due now."""
    assert job.callback_next_at is not None, "not a claimed delivery"
    written = await session.execute(
        update(Job)
        .where(*_claim_holds(job.id, job.callback_next_at))
        .values(callback_next_at=utc_now())
        .returning(col(Job.id))
    )
    held = written.scalar_one_or_none() is not None
    await session.commit()
    return held
