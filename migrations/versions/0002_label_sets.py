"""zero-shot label sets and corpus labels

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 18:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "label_sets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("labelled_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "label_set_versions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("set_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["set_id"], ["label_sets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("set_id", "version", name="uq_label_set_versions"),
        # Never reuse the id of a deleted version: processes cache definitions by id.
        sqlite_autoincrement=True,
    )
    op.create_table(
        "label_embeddings",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("model_key", sa.String(length=32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("logit_scale", sa.Float(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["label_set_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("version_id", "model_key"),
    )
    op.create_table(
        "labelled_shards",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("shard_id", sa.String(length=64), nullable=False),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["label_set_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("version_id", "shard_id"),
    )
    op.create_table(
        "image_labels",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("rank", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("cosine", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["version_id"], ["label_set_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("version_id", "image_id", "rank"),
        sqlite_with_rowid=False,
    )
    # Not in batch mode: on SQLite a batch operation may copy the table, which would lose
    # WITHOUT ROWID.
    op.create_index("ix_image_labels_label", "image_labels", ["version_id", "label", "score"])


def downgrade() -> None:
    op.drop_index("ix_image_labels_label", table_name="image_labels")
    op.drop_table("image_labels")
    op.drop_table("labelled_shards")
    op.drop_table("label_embeddings")
    op.drop_table("label_set_versions")
    op.drop_table("label_sets")
