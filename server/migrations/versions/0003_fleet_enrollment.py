"""fleet enrollment: bootstrap tokens, device groups/tags, enrollment and revocation times

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("enrolled_by", sa.String(length=128), nullable=False, server_default=""))
        batch.add_column(sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "device_labels",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id", "kind", "value"),
    )
    op.create_index("ix_device_labels_kind_value", "device_labels", ["kind", "value"])
    op.create_table(
        "bootstrap_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("note", sa.String(length=256), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )


def downgrade() -> None:
    op.drop_table("bootstrap_tokens")
    op.drop_index("ix_device_labels_kind_value", table_name="device_labels")
    op.drop_table("device_labels")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("enrolled_at")
        batch.drop_column("enrolled_by")
        batch.drop_column("revoked_at")
