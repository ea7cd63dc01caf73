"""rollout shadow reports: paired outcomes on known-truth frames (the rollout's accuracy decision)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollout_shadow_reports") as batch:
        batch.add_column(sa.Column("candidate_only_correct", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("active_only_correct", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rollout_shadow_reports") as batch:
        batch.drop_column("active_only_correct")
        batch.drop_column("candidate_only_correct")
