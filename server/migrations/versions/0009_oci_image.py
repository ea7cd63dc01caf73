"""model_versions.oci_image: the version's bundle as an OCI image, by digest, when a registry is configured

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 00:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("oci_image", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("oci_image")
