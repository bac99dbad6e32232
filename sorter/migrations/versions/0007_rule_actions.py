"""rule_actions: the ledger of what rules did, so that a re-run or a retry never acts twice.

One row per instance, rule and action (unique); ``done`` is final, ``failed`` is tried again
(forwards once ``next_attempt_at`` has passed), ``pending`` is a queued forward, ``dead`` a
forward that failed too often, ``sending`` an action a sender has claimed (``claim``) until
``next_attempt_at``, when another may take it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the table; rules have never run before, so it starts empty."""
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "rule_actions",
        sa.Column("id", big_id, primary_key=True),
        sa.Column("instance_id", big_id, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claim", sa.String(32), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("instance_id", "rule", "action", name="uq_rule_actions_once"),
    )
    op.create_index("ix_rule_actions_due", "rule_actions", ["action", "status", "next_attempt_at"])


def downgrade() -> None:
    """Drop the ledger (what rules already did stays done on disk)."""
    op.drop_table("rule_actions")
