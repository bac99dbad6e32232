"""files.ctime_ns and files.mode: a failure the user fixed is retried by the next scan.

The ledger skipped a path whose size and mtime were unchanged, so a file that
failed with ``permission_denied`` stayed failed after ``chmod`` (which changes
the inode's ctime and mode, never the mtime). With both recorded, a scan re-reads
a path whose instance failed for a reason that can heal (see
``sorter.registrar.RETRYABLE``) once its ctime or mode changed. Rows written before
this revision have neither: such a failure is retried once.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the two nullable columns (no rewrite of existing rows)."""
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("ctime_ns", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("mode", sa.Integer(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("files") as batch:
        batch.drop_column("mode")
        batch.drop_column("ctime_ns")
