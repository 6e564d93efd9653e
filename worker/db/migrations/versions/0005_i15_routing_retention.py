"""Retention: when a study's originals and each instance's file were purged (issue 15)

Revision ID: 0005_i15
Revises: 0004_i18b_heartbeats
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_i15"
down_revision = "0004_i18b_heartbeats"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("purged_at")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("purged_at")
