"""the catalog records the identity of the index directory it belongs to

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL in a catalog written before identities: the next index job claims one (see
    # indexer/binding.py) and writes it into index_dir/index.json as well.
    with op.batch_alter_table("index_state") as batch:
        batch.add_column(sa.Column("index_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_state") as batch:
        batch.drop_column("index_id")
