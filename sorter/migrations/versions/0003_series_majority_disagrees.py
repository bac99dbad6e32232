"""Series verdict: a series most of whose instances disagree with its header is ``disagree``.

A series' verdict applied the instance thresholds to its mean probabilities, so
a series whose 10 images disagreed 8 times at 0.84 averaged 0.796 and was called
``uncertain``: the series reports lost exactly the mislabelled series they are
for. Now a strict majority of instances that disagree (each confidently, by the
model's own thresholds) makes the series ``disagree`` too, provided the mean's
label is not the header's. ``series_discrepancies`` and ``study_summary``, built
on ``series_summary``, follow.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The views built on series_summary, in creation order (dropped in reverse).
_SERIES_VIEWS = ("series_summary", "series_discrepancies", "study_summary")
#: The rule 0001 shipped, and the one added right after its header checks.
_BEFORE = "    WHEN p_header IS NULL THEN 'unsupported'\n"
_MAJORITY = "    WHEN 2 * n_disagree > n_instances AND label <> header_label THEN 'disagree'\n"


def _views(majority: bool) -> list[tuple[str, str]]:
    # 0001's SQL is frozen with that revision; this one adds one line to its series view.
    initial = importlib.import_module("sorter.migrations.versions.0001_initial_schema")
    views: list[tuple[str, str]] = initial._views(op.get_context().dialect.name)
    out = []
    for name, sql in views:
        if name == "series_summary" and majority:
            assert sql.count(_BEFORE) == 1, "0001's series view is not what this revision expects"
            sql = sql.replace(_BEFORE, _BEFORE + _MAJORITY)
        out.append((name, sql))
    return [(name, sql) for name, sql in out if name in _SERIES_VIEWS]


def _replace(majority: bool) -> None:
    for name in reversed(_SERIES_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name, sql in _views(majority):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def upgrade() -> None:
    """Recreate the series views with the majority rule."""
    _replace(majority=True)


def downgrade() -> None:
    """Recreate them as 0001 made them."""
    _replace(majority=False)
