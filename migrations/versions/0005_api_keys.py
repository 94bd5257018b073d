"""API keys, job owners and owner-scoped idempotency keys.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ux_api_keys_name", "api_keys", ["name"], unique=True)
    op.create_index("ux_api_keys_key_hash", "api_keys", ["key_hash"], unique=True)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("owner", sa.Uuid(), nullable=True))
        # Keys of owned jobs are stored as "<owner hex>:<key>": one unique index serves
        # both the no-keys mode (owner NULL, bare key) and tenants, who never collide.
        batch.alter_column(
            "idempotency_key",
            existing_type=sa.String(length=255),
            type_=sa.String(length=320),
            existing_nullable=True,
        )
        batch.create_index("ix_jobs_owner", ["owner", "created_at"])


def downgrade() -> None:
    # Owner-scoped keys may be longer than the old column: they are given up.
    op.execute(
        "UPDATE jobs SET idempotency_key = NULL, request_hash = NULL WHERE owner IS NOT NULL"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner")
        batch.alter_column(
            "idempotency_key",
            existing_type=sa.String(length=320),
            type_=sa.String(length=255),
            existing_nullable=True,
        )
        batch.drop_column("owner")
    op.drop_index("ux_api_keys_key_hash", table_name="api_keys")
    op.drop_index("ux_api_keys_name", table_name="api_keys")
    op.drop_table("api_keys")
