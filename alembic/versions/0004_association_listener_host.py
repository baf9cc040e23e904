"""Associations: the host of the listener process that served each one.

A listener's pid alone does not say which host's process it was when several daemons share
one PostgreSQL store: the rows of a dead listener, or of a daemon killed outright, are
closed by host and pid.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.add_column(sa.Column("listener_host", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.drop_column("listener_host")
