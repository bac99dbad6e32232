"""adapted views: ``joint_score``, both models' doubt of the header in one ranking.

The label-issue score ranks by the adaptation's opinion alone, and the generic verdict beside it
is a verdict, not a rank. ``joint_score`` ranks by both: one minus the mean of the generic
model's and the adaptation's probability of the header. On ``tests/bench/bench_adapt.py``
(sporadic wrong series against clean ones, average precision; ``results-adapt-joint-2core.json``,
``-seed1-2core.json``, ``-seed2-2core.json``: three loso runs with different fold splits) it ranked
0.75 / 0.70 / 0.56, against 0.48 / 0.63 / 0.45 for the label-issue score, 0.59 / 0.40 / 0.44 for
the generic evidence and 0.74 / 0.46 / 0.56 for the product of the two (a product lets one model
sure of a wrong answer, a generic model that misreads a whole clean source, outvote the other;
the mean was chosen on the first two runs, the third checked it):

* instance: ``1 - (e + a) / 2``, where ``e`` is the generic model's evidence for the header
  (``generic_p_evidence``: PT + NM under PT and NM), 0 where its verdict is ``disagree`` (a
  witness such as the SOP class or the radionuclide refuted it), and ``a`` (``adapted_p_header``)
  the adaptation's probability of the header's label: out of fold (``self_confidence``) where the
  instance was sampled, else the adapted model's own once ``sorter reclassify`` (``sorter adapt
  --reclassify``) ran it, a model that never trained on that instance;
* series: ``1 - (mean(e) + mean(a)) / 2``, the first mean over every instance of the series the
  generic model judged, the second over its sampled instances where it has any (the adapted
  model trained on them: its own predictions of their siblings are not held out), else over
  every instance the adapted model judged;
* study: the highest of its series'.

NULL where the adaptation has no opinion on it. With ``--per-label 3`` (most series not sampled,
``results-adapt-joint-unsampled-2core.json``) the series only the adapted model judged ranked at
0.66 against 0.39 for the generic evidence alone and 0.41 for the adapted model alone.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The adapted views, in creation order (dropped in reverse).
_VIEWS = ("adapted_instances", "adapted_series", "adapted_studies")
_INSTANCE_AFTER = "  li.fold, li.self_confidence, li.score AS label_issue_score,\n"
_SERIES_AFTER = "  MAX(label_issue_score) AS max_label_issue_score,\n"
_STUDY_LAST = "  MAX(label_issue_score) AS label_issue_score\n"


def _kept(verdict: str, evidence: str) -> str:
    """SQL: the generic evidence an image keeps, 0 where the generic verdict refutes it."""
    return f"CASE WHEN {verdict} = 'disagree' THEN 0 ELSE {evidence} END"


def _own(prefix: str) -> str:
    """SQL: the probability of the header's own label among columns ``{prefix}p_ct`` ...."""
    labels = ("ct", "mr", "pt", "nm", "xr", "mg", "us", "ot")
    return (
        "CASE i.header_label " + " ".join(f"WHEN '{x.upper()}' THEN {prefix}p_{x}" for x in labels) + " END"
    )


def _views(joint: bool) -> list[tuple[str, str]]:
    # 0014's SQL (with the revisions it builds on) is frozen with it; this one adds a column to each view.
    previous = importlib.import_module("sorter.migrations.versions.0014_adapted_series_mean_refutes")
    series_rule = importlib.import_module("sorter.migrations.versions.0013_series_mean_refutes")
    views = dict(previous._views(mean_refutes=True))
    if joint:
        instance = _kept("g.verdict", series_rule.evidence("g.", "i.header_label"))
        adapted = f"CASE WHEN li.id IS NOT NULL THEN li.self_confidence ELSE {_own('d.')} END"
        series = _kept("generic_verdict", "generic_p_evidence")
        scored = (
            "CASE WHEN COUNT(self_confidence) > 0 THEN AVG(self_confidence) ELSE AVG(adapted_p_header) END"
        )
        edits = {
            "adapted_instances": (
                _INSTANCE_AFTER,
                f"{_INSTANCE_AFTER}  {adapted} AS adapted_p_header,\n"
                f"  1 - ({instance} + {adapted}) / 2.0 AS joint_score,\n",
            ),
            "adapted_series": (
                _SERIES_AFTER,
                f"{_SERIES_AFTER}  1 - (AVG({series}) + {scored}) / 2.0 AS joint_score,\n",
            ),
            "adapted_studies": (
                _STUDY_LAST,
                "  MAX(label_issue_score) AS label_issue_score,\n  MAX(joint_score) AS joint_score\n",
            ),
        }
        for name, (old, new) in edits.items():
            sql = views[name]
            assert sql.count(old) == 1, f"{name} is not what this revision expects: {old!r}"
            views[name] = sql.replace(old, new)
    return [(name, views[name]) for name in _VIEWS]


def _replace(joint: bool) -> None:
    for name in reversed(_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name, sql in _views(joint):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def upgrade() -> None:
    """Recreate the adapted views with ``joint_score``."""
    _replace(joint=True)


def downgrade() -> None:
    """Recreate them as 0014 made them."""
    _replace(joint=False)
