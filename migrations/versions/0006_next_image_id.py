"""image ids are never reused: index_state keeps the next one

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-13 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("index_state") as batch:
        batch.add_column(sa.Column("next_image_id", sa.Integer(), nullable=True))
    # Ids purged by an earlier compaction are unknown by now; past the highest one left is
    # the best a catalog from before this revision can do.
    op.execute(
        "UPDATE index_state SET next_image_id = (SELECT COALESCE(MAX(id), 0) + 1 FROM images)"
    )


def downgrade() -> None:
    with op.batch_alter_table("index_state") as batch:
        batch.drop_column("next_image_id")
