"""Caller-facing API: labels, stdin, webhooks, idempotency keys, resource reports, log chunks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CALLBACK_STATES = ("pending", "delivered", "failed")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("callback_url", sa.String(length=2048), nullable=True))
        batch.add_column(sa.Column("resources", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("stdin", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column(
                "callback_state",
                sa.Enum(*CALLBACK_STATES, name="callbackstate", native_enum=False, length=16),
                nullable=True,
            )
        )
        batch.add_column(sa.Column("callback_next_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("callback_deliveries", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch.create_index("ix_jobs_image", ["image", "created_at"])
        batch.create_index("ix_jobs_finished_at", ["finished_at"])
        batch.create_index("ix_jobs_callback", ["callback_state", "callback_next_at"])
        batch.create_index("ux_jobs_idempotency_key", ["idempotency_key"], unique=True)
    with op.batch_alter_table("jobs") as batch:
        # The default only filled in existing rows: PostgreSQL cannot compare JSON defaults.
        batch.alter_column("labels", server_default=None)
    op.create_table(
        "job_log_chunks",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("stream", sa.String(length=6), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq"),
    )


def downgrade() -> None:
    op.drop_table("job_log_chunks")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ux_jobs_idempotency_key")
        batch.drop_index("ix_jobs_callback")
        batch.drop_index("ix_jobs_finished_at")
        batch.drop_index("ix_jobs_image")
        for column in (
            "request_hash",
            "idempotency_key",
            "callback_deliveries",
            "callback_next_at",
            "callback_state",
            "stdin",
            "resources",
            "callback_url",
            "labels",
        ):
            batch.drop_column(column)
