"""instances.radionuclide: the nuclide a PT or NM header names, a witness for its Modality.

The first radiopharmaceutical's Radionuclide Code Sequence code value ((0054,0016) > (0054,0300)
> (0008,0100); C-111A1, 77004003 ...). A PET scanner images positron emitters, a gamma camera
single-photon ones, so a PT header naming Lu-177 or an NM header naming F-18 contradicts itself
(``sorter.nuclides``). Rows registered before this revision hold NULL until their file is read
again: ``sorter scan`` re-reads a file that changed, ``sorter reclassify --reread-headers`` any.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the column."""
    op.add_column("instances", sa.Column("radionuclide", sa.String(64), nullable=True))


def downgrade() -> None:
    """Drop the column (SQLite 3.35 and later drop it in place; no view names it)."""
    op.drop_column("instances", "radionuclide")
