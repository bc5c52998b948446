"""label embeddings keep the logit bias of sigmoid (SigLIP) models

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for every row written so far: those models score with a softmax.
    with op.batch_alter_table("label_embeddings") as batch:
        batch.add_column(sa.Column("logit_bias", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("label_embeddings") as batch:
        batch.drop_column("logit_bias")
