"""Clinician sign-off (issue 17 item 1): the ``signoffs`` table, one row per signed result revision (who signed,
as which observer and organisation, what they changed, and the AI's original analysis).

Revision ID: 0007_i17s
Revises: 0006_i17m
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_i17s"
down_revision = "0006_i17m"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signoffs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column("signed_revision", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("observer_name", sa.String(64), nullable=False),
        sa.Column("organisation", sa.String(64), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("corrects_signed", sa.Boolean(), nullable=False),
        sa.Column("corrections", sa.JSON(), nullable=False),
        sa.Column("original", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.UniqueConstraint("study_id", "revision", name="uq_signoffs_revision"),
    )
    op.create_index("ix_signoffs_study_id", "signoffs", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_signoffs_study_id", table_name="signoffs")
    op.drop_table("signoffs")
