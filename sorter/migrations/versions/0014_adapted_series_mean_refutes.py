"""adapted views: the generic model's series verdict follows ``series_summary``'s mean arm (0013).

``adapted_series.generic_verdict`` was the vote of the base model's instance verdicts, so a series
``series_summary`` calls ``disagree`` by its mean (every image doubting the header, none refuted
alone) showed ``uncertain`` beside the adapted verdict in ``sorter discrepancies --by
label-issue``. ``adapted_instances`` now carries the base model's evidence for the header label
(``generic_p_evidence``: PT + NM under PT and NM) and that label's thresholds
(``generic_agree_at``, ``generic_disagree_at``), and ``adapted_series`` adds 0013's arm to the
generic vote: a series of at least two scored images, most of them not ``agree``, whose mean
evidence is at most ``disagree_at^0.4 x agree_at^0.6``. The adapted verdict stays a vote.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The adapted views, in creation order (dropped in reverse).
_VIEWS = ("adapted_instances", "adapted_series", "adapted_studies")
_GENERIC = "g.label AS generic_label, g.confidence AS generic_confidence, g.verdict AS generic_verdict,\n"
_GENERIC_JOIN = "LEFT JOIN predictions g ON g.instance_id = i.id AND g.model_id = a.base_model_id\n"
_THRESHOLDS_JOIN = (
    "LEFT JOIN model_thresholds gt ON gt.model_id = a.base_model_id AND gt.label = i.header_label\n"
)
_VOTE_END = " ELSE 'uncertain' END AS generic_verdict"


def _views(mean_refutes: bool) -> list[tuple[str, str]]:
    # 0009's SQL, as 0010 edited it, is frozen with them; this revision edits two of the views.
    adaptations = importlib.import_module("sorter.migrations.versions.0009_adaptations")
    skip_missing = importlib.import_module("sorter.migrations.versions.0010_adapted_views_skip_missing_uids")
    series_rule = importlib.import_module("sorter.migrations.versions.0013_series_mean_refutes")
    views = dict(adaptations.VIEWS) | dict(skip_missing._views(skip_missing=True))
    if mean_refutes:
        columns = (
            f"  {series_rule.evidence('g.', 'i.header_label')} AS generic_p_evidence,"
            " gt.agree_at AS generic_agree_at, gt.disagree_at AS generic_disagree_at,\n"
        )
        n, agree = "COUNT(generic_verdict)", "SUM(CASE WHEN generic_verdict = 'agree' THEN 1 ELSE 0 END)"
        arm = series_rule.under_bound(
            "AVG(generic_p_evidence)", "MIN(generic_disagree_at)", "MAX(generic_agree_at)"
        )
        edits = {
            "adapted_instances": (
                (_GENERIC, _GENERIC + columns),
                (_GENERIC_JOIN, _GENERIC_JOIN + _THRESHOLDS_JOIN),
            ),
            "adapted_series": (
                (
                    _VOTE_END,
                    f" WHEN {n} >= {series_rule.MIN_IMAGES} AND 2 * {agree} <= {n} AND {arm}"
                    f" THEN 'disagree'{_VOTE_END}",
                ),
            ),
        }
        for name, replacements in edits.items():
            sql = views[name]
            for old, new in replacements:
                assert sql.count(old) == 1, f"{name} is not what this revision expects: {old!r}"
                sql = sql.replace(old, new)
            views[name] = sql
    return [(name, views[name]) for name in _VIEWS]


def _replace(mean_refutes: bool) -> None:
    for name in reversed(_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name, sql in _views(mean_refutes):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def upgrade() -> None:
    """Recreate the adapted views with the generic series verdict's mean arm."""
    _replace(mean_refutes=True)


def downgrade() -> None:
    """Recreate them as 0010 left them."""
    _replace(mean_refutes=False)
