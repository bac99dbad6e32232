"""adapted views: instances without a Series (Study) Instance UID form no series (study).

``adapted_series`` grouped every instance whose file lacks (0020,000E) into one series, across
sources: ``sorter adapt`` showed a series "-" of 21 instances from two sources, under the first
source's name, and a label issue in one of them was averaged with all the others. Like
``series_summary`` and ``study_summary`` (0001), the adapted series and study views now leave
those instances out; they stay in ``adapted_instances``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The views 0009 created that this one replaces, in creation order (dropped in reverse).
_REPLACED = ("adapted_series", "adapted_studies")
#: What each view's SQL gains, after its FROM line.
_WHERE = {
    "adapted_series": ("FROM adapted_instances\n", "WHERE series_instance_uid IS NOT NULL\n"),
    "adapted_studies": ("FROM adapted_series\n", "WHERE study_instance_uid IS NOT NULL\n"),
}


def _views(skip_missing: bool) -> list[tuple[str, str]]:
    # 0009's SQL is frozen with that revision; this one adds one WHERE line to two of its views.
    earlier = importlib.import_module("sorter.migrations.versions.0009_adaptations")
    out = []
    for name, sql in earlier.VIEWS:
        if name not in _REPLACED:
            continue
        if skip_missing:
            line, where = _WHERE[name]
            assert sql.count(line) == 1, f"0009's {name} is not what this revision expects"
            sql = sql.replace(line, line + where)
        out.append((name, sql))
    return out


def _replace(skip_missing: bool) -> None:
    for name in reversed(_REPLACED):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name, sql in _views(skip_missing):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def upgrade() -> None:
    """Recreate the adapted series and study views without UID-less instances."""
    _replace(skip_missing=True)


def downgrade() -> None:
    """Recreate them as 0009 made them."""
    _replace(skip_missing=False)
