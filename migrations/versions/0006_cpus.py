"""A job's hard CPU cap (Docker's NanoCpus), beside its relative cpu_shares.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL on jobs stored before: they run under the default_cpus setting.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cpus", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cpus")
