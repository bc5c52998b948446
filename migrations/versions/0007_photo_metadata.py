"""images keep their capture time, camera and GPS position from EXIF

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-13 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL on every row indexed so far: the next `clipsearch index` reads their headers (no
    # pixel decode, no encoding) and fills them in.
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("taken_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("taken_at_source", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("camera_make", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("camera_model", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("latitude", sa.Float(), nullable=True))
        batch.add_column(sa.Column("longitude", sa.Float(), nullable=True))
    op.create_index("ix_images_taken_at", "images", ["taken_at"])


def downgrade() -> None:
    op.drop_index("ix_images_taken_at", table_name="images")
    with op.batch_alter_table("images") as batch:
        for column in (
            "longitude",
            "latitude",
            "camera_model",
            "camera_make",
            "taken_at_source",
            "taken_at",
        ):
            batch.drop_column(column)
