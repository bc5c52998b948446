"""shards record the sha256 of their shard.json

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for shards committed so far: their shard.json is checked field by field against
    # the row instead (see retrieval/index/integrity.py).
    with op.batch_alter_table("shards") as batch:
        batch.add_column(sa.Column("manifest_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("shards") as batch:
        batch.drop_column("manifest_sha256")
