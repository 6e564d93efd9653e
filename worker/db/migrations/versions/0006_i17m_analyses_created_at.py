"""Model monitoring (issue 17 item 4): an index on ``analyses.created_at``, so that the monitoring window (the
analyses stored within ``monitoring.window_days``) is a range scan at every scrape, not a scan of every analysis
ever stored.

Revision ID: 0006_i17m
Revises: 0005_i15
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0006_i17m"
down_revision = "0005_i15"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_analyses_created_at", "analyses", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_analyses_created_at", table_name="analyses")
