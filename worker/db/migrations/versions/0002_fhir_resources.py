"""FHIR facade: stored resource versions and their search index (worker.fhir_store)

Revision ID: 0002_fhir
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_fhir"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fhir_resources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("resource_type", sa.String(length=32), nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("study_revision", sa.Integer(), nullable=True),
        sa.Column("date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_updated", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["studies.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("resource_type", "resource_id", "version_id", name="uq_fhir_resources_version"),
    )
    with op.batch_alter_table("fhir_resources", schema=None) as batch_op:
        batch_op.create_index("ix_fhir_resources_type_current", ["resource_type", "is_current", "last_updated"])
        batch_op.create_index(batch_op.f("ix_fhir_resources_study_id"), ["study_id"], unique=False)

    op.create_table(
        "fhir_search_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("resource_pk", sa.Integer(), nullable=False),
        sa.Column("param", sa.String(length=32), nullable=False),
        sa.Column("system", sa.String(length=255), nullable=True),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(["resource_pk"], ["fhir_resources.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("fhir_search_tokens", schema=None) as batch_op:
        batch_op.create_index("ix_fhir_search_tokens_param_value", ["param", "value"])
        batch_op.create_index(batch_op.f("ix_fhir_search_tokens_resource_pk"), ["resource_pk"], unique=False)


def downgrade() -> None:
    op.drop_table("fhir_search_tokens")
    op.drop_table("fhir_resources")
