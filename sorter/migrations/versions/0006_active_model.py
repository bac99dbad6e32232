"""models.activated_at: the active model, whose predictions every view shows.

``sorter models use`` stamps a model; the one stamped last is active. An
instance's ``prediction_id`` (what the views follow) points at the active model's
prediction when it has one, else at the prediction written last. Before this
revision the views showed whichever model had classified an instance last, so
``reclassify --model`` switched them with no way back. The model most instances
point at becomes active here, so the views show what they showed before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the column and activate the model the views show most."""
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        """
UPDATE models SET activated_at = CURRENT_TIMESTAMP
WHERE id = (
  SELECT p.model_id FROM instances i JOIN predictions p ON p.id = i.prediction_id
  GROUP BY p.model_id ORDER BY COUNT(*) DESC, p.model_id DESC LIMIT 1
)"""
    )


def downgrade() -> None:
    """Drop the column (the views keep following each instance's pointer).

    Not in batch mode: SQLite's batch mode copies the table, which the views that read it
    forbid; SQLite drops a column in place since 3.35.
    """
    op.drop_column("models", "activated_at")
