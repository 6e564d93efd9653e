"""Routing and retention (issue 15): each instance's and study's routing decision, and when a study's
originals and each instance's file were purged. The new study state ``not_applicable`` needs no change (states
are stored as strings).

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
        batch.add_column(sa.Column("route", sa.JSON(), nullable=True))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("route", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("route")
        batch.drop_column("purged_at")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("route")
        batch.drop_column("purged_at")
