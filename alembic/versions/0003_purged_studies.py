"""Purged studies: the revision a purged study reached, so that it continues after it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "purged_studies",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("last_revision", sa.Integer(), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("purged_studies")
