"""Series verdict: a series most of whose instances agree, and none disagrees, is ``agree``.

A series' header test applied the instance thresholds to its mean probability of the header's
label. Since a PT or NM header its radionuclide confirms is ``agree`` when PT and NM together
reach its ``agree_at`` (``sorter.compare``), a SPECT series under an NM header naming Tc-99m can
be ``agree`` on every slice while its mean p(NM) is low, because the network calls the slices PT:
the series was ``disagree`` with no instance refuted. Now, after 0003's majority rule:

* a strict majority of ``agree`` instances and no ``disagree`` one make the series ``agree``;
* the mean refutes the header only where at least one instance is refuted. Before, that could
  not happen without one: every instance above its ``disagree_at`` keeps the mean above the
  smallest of them.

The review queue's ``series_state`` is emptied, so that its next refresh rebuilds it with the
new rule. ``series_discrepancies`` and ``study_summary``, built on ``series_summary``, follow.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The views built on series_summary, in creation order (dropped in reverse).
_SERIES_VIEWS = ("series_summary", "series_discrepancies", "study_summary")
_COUNT = "          SUM(CASE WHEN verdict = 'uncertain' THEN 1 ELSE 0 END) AS n_uncertain,\n"
_AGREE_COUNT = "          SUM(CASE WHEN verdict = 'agree' THEN 1 ELSE 0 END) AS n_agree,\n"
_MAJORITY = "    WHEN 2 * n_disagree > n_instances AND label <> header_label THEN 'disagree'\n"
_MAJORITY_AGREES = (
    "    WHEN agree_at IS NOT NULL AND n_disagree = 0 AND 2 * n_agree > n_instances THEN 'agree'\n"
)
_MEAN_REFUTES = "    WHEN agree_at IS NOT NULL AND p_header <= disagree_at THEN 'disagree'\n"
_EDITS = (
    (_COUNT, _COUNT + _AGREE_COUNT),
    (_MAJORITY, _MAJORITY + _MAJORITY_AGREES),
    (_MEAN_REFUTES, _MEAN_REFUTES.replace("disagree_at THEN", "disagree_at AND n_disagree > 0 THEN")),
)


def _views(majority_agrees: bool) -> list[tuple[str, str]]:
    # Earlier revisions' SQL is frozen with them; this one edits 0008's series view.
    reviews = importlib.import_module("sorter.migrations.versions.0008_reviews")
    out = []
    for name, sql in reviews._views(reviews=True):
        if name not in _SERIES_VIEWS:
            continue
        if name == "series_summary" and majority_agrees:
            for old, new in _EDITS:
                assert sql.count(old) == 1, f"0008's series view is not what this revision expects: {old!r}"
                sql = sql.replace(old, new)
        out.append((name, sql))
    return out


def _replace(majority_agrees: bool) -> None:
    for name in reversed(_SERIES_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name, sql in _views(majority_agrees):
        op.execute(f"CREATE VIEW {name} AS {sql}")
    op.execute("DELETE FROM series_state")  # rebuilt by the review page's next refresh


def upgrade() -> None:
    """Recreate the series views with the majority-agrees rule."""
    _replace(majority_agrees=True)


def downgrade() -> None:
    """Recreate them as 0008 made them."""
    _replace(majority_agrees=False)
