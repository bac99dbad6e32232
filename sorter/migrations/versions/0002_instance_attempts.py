"""instances.attempts: queue tasks that took an instance, to bound the retries of a poison file.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the counter; existing rows start at 0."""
    op.add_column(
        "instances", sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )


def downgrade() -> None:
    """Drop the counter.

    Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): a batch operation rebuilds ``instances`` and
    renames the copy into place, which SQLite refuses while 0001's views refer to the table
    (`sorter db downgrade base` stopped at "error in view latest_predictions: no such table:
    main.instances", leaving the copy behind).
    """
    op.execute("ALTER TABLE instances DROP COLUMN attempts")
