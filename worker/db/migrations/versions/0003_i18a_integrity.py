"""integrity: failure reasons, not-analysed reasons, clean-release marker, our own result objects

Revision ID: 0003_i18a
Revises: 0002_fhir
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_i18a"
down_revision = "0002_fhir"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_analysed_reason", sa.String(length=128), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure", sa.String(length=32), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failure", sa.String(length=32), nullable=True))

    op.create_table(
        "result_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("object_kind", sa.String(length=16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_objects_study_id"), ["study_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_result_objects_series_instance_uid"), ["series_instance_uid"],
                              unique=False)


def downgrade() -> None:
    op.drop_table("result_objects")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("failure")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("failure")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("not_analysed_reason")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("released_at")
