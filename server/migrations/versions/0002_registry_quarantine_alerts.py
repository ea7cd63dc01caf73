"""registry approval and artifacts, device quarantines, alerts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 12:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("approved_by", sa.String(length=128), nullable=False, server_default=""))
        batch.add_column(sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("artifacts", sa.JSON(), nullable=False, server_default="{}"))
    op.create_table(
        "quarantines",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_by", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("released_by", sa.String(length=128), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_quarantines_device_id", "quarantines", ["device_id"])
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("webhook_status", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_alerts_kind", "alerts", ["kind"])


def downgrade() -> None:
    op.drop_index("ix_alerts_kind", table_name="alerts")
    op.drop_table("alerts")
    op.drop_index("ix_quarantines_device_id", table_name="quarantines")
    op.drop_table("quarantines")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("artifacts")
        batch.drop_column("approved_at")
        batch.drop_column("approved_by")
