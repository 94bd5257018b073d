"""The installation's id: a one-row table whose id labels every container.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    instance = op.create_table(
        "jobdock_instance",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # Naive UTC, as app.models.UTCDateTime stores it.
    now = datetime.now(UTC).replace(tzinfo=None)
    op.bulk_insert(instance, [{"id": uuid.uuid4(), "created_at": now}])


def downgrade() -> None:
    op.drop_table("jobdock_instance")
