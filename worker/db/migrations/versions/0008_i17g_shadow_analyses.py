"""Shadow mode (issue 17 item 3): ``analyses.shadow`` marks an analysis by a candidate model version run next to
the active one. Shadow analyses are never delivered and never shown as the study's result; ``retinalgpt model
compare`` reads them.

Revision ID: 0008_i17g
Revises: 0007_i17s
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_i17g"
down_revision = "0007_i17s"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        batch.add_column(sa.Column("shadow", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("analyses") as batch:
        batch.drop_column("shadow")
