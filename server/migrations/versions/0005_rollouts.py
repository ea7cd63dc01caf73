"""rollouts: waves, devices with their command ids, the command outbox, and shadow reports

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("mode", sa.String(length=32), nullable=False),
        sa.Column("on_failure", sa.String(length=8), nullable=False),
        sa.Column("require_approval", sa.Boolean(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("gates", sa.JSON(), nullable=False),
        sa.Column("shadow_frames", sa.Integer(), nullable=False),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("settled", sa.Boolean(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=False),
        sa.Column("lease_expires_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(["version"], ["model_versions.version"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_waves",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("percent", sa.Double(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=True),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("gate_results", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollout_waves_rollout_position", "rollout_waves", ["rollout_id", "position"], unique=True)
    op.create_table(
        "rollout_devices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("goal", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("failure", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("update_state", sa.String(length=32), nullable=False),
        sa.Column("rollback_state", sa.String(length=32), nullable=False),
        sa.Column("deploy_command_id", sa.String(length=64), nullable=True),
        sa.Column("promote_command_id", sa.String(length=64), nullable=True),
        sa.Column("abort_command_id", sa.String(length=64), nullable=True),
        sa.Column("rollback_command_id", sa.String(length=64), nullable=True),
        sa.Column("assigned_at", _TS, nullable=False),
        sa.Column("progress_at", _TS, nullable=False),
        sa.Column("shadow_started_at", _TS, nullable=True),
        sa.Column("updated_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rollout_devices_deploy_command_id", "rollout_devices", ["deploy_command_id"])
    op.create_index("ix_rollout_devices_rollback_command_id", "rollout_devices", ["rollback_command_id"])
    op.create_index("ix_rollout_devices_rollout_device", "rollout_devices", ["rollout_id", "device_id"], unique=True)
    op.create_table(
        "rollout_commands",
        sa.Column("command_id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("published_at", _TS, nullable=True),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("command_id"),
    )
    op.create_index("ix_rollout_commands_rollout_published", "rollout_commands", ["rollout_id", "published_at"])
    op.create_table(
        "rollout_shadow_reports",
        sa.Column("msg_id", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("deploy_command_id", sa.String(length=64), nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("window", sa.Integer(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("frames_dropped", sa.Integer(), nullable=False),
        sa.Column("frames_skipped_budget", sa.Integer(), nullable=False),
        sa.Column("agreement", sa.Double(), nullable=True),
        sa.Column("confident_agreement", sa.Double(), nullable=True),
        sa.Column("corrected_frames", sa.Integer(), nullable=False),
        sa.Column("active_accuracy", sa.Double(), nullable=True),
        sa.Column("candidate_accuracy", sa.Double(), nullable=True),
        sa.Column("active_latency_ms_p99", sa.Double(), nullable=True),
        sa.Column("candidate_latency_ms_p99", sa.Double(), nullable=True),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("msg_id"),
    )
    op.create_index("ix_rollout_shadow_reports_deploy_command_id", "rollout_shadow_reports", ["deploy_command_id"])


def downgrade() -> None:
    op.drop_table("rollout_shadow_reports")
    op.drop_table("rollout_commands")
    op.drop_table("rollout_devices")
    op.drop_table("rollout_waves")
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")
