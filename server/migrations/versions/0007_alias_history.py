"""registry alias history: every move of production/previous/candidate, for rollbacks to any version

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alias_history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_alias_history_name", "alias_history", ["name"])
    # Today's aliases start the history, so a rollback right after the upgrade knows them.
    op.execute("INSERT INTO alias_history (at, name, version, from_version, actor, reason) "
               "SELECT updated_at, name, version, NULL, 'migration', 'alias before history was kept' FROM aliases")


def downgrade() -> None:
    op.drop_index("ix_alias_history_name", "alias_history")
    op.drop_table("alias_history")
