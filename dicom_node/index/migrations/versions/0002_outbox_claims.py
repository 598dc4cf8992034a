"""Outbox rows being sent carry who sends them, so node processes sharing a database never send one row twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Before, a node starting reset every row left ``sending`` to ``pending``: right
for one process, wrong when another live process is sending those rows.  Now
only rows whose claim died (``index/claims.py``) go back.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claim_owner", sa.Text))
    op.add_column("outbox", sa.Column("claim_run", sa.Text))
    op.add_column("outbox", sa.Column("claim_expires", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        for column in ("claim_expires", "claim_run", "claim_owner"):
            batch.drop_column(column)
