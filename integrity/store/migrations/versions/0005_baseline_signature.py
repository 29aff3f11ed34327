"""baseline.signature: Ed25519 signature of the baseline's Merkle root

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("baseline") as batch:
        batch.add_column(sa.Column("signature", sa.LargeBinary))


def downgrade() -> None:
    with op.batch_alter_table("baseline") as batch:
        batch.drop_column("signature")
