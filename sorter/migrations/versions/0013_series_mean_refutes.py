"""Series verdict: a series whose images all doubt its header is ``disagree``, none refuted alone.

Every label's ``disagree_at`` is shrunk to hold its 1 % budget of refuted right headers on
sources the model never saw (0.0008-0.005 for MR, PT, NM and OT in the bundled model), so a
mislabelled series is often ``uncertain`` on every image and, under 0003's majority rule and
0012's "the mean refutes only where an instance is refuted", never a discrepancy: the generic
series verdict found 0.17-0.19 of sporadic wrong series in ``tests/bench/bench_adapt.py``.

A series of at least :data:`MIN_IMAGES` images, most of them not ``agree``, is now ``disagree``
when the mean probability of its header's evidence (PT + NM under a PT or NM header: the pixels
seldom tell SPECT from PET, the radionuclide and the SOP class refute such headers image by
image) is at most ``disagree_at^(1-t) x agree_at^t`` with t = :data:`TOWARDS`: the station
rule's mean arm (``sorter.reports.mean_bound``) applied to one series. A single image keeps its
own verdict: its ``disagree_at`` is already the bound its budget allows.

The bound is written without POWER(): ``evidence^q <= disagree_at^(q-p) x agree_at^p`` for t =
p/q, which SQLite computes whether or not it was built with its math functions.

The review queue's ``series_state`` is emptied, so that its next refresh rebuilds it with the
new rule. ``series_discrepancies`` and ``study_summary``, built on ``series_summary``, follow.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from fractions import Fraction

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: How far along the (geometric) way from ``disagree_at`` to ``agree_at`` the bound lies.
TOWARDS = Fraction(3, 5)
#: The fewest images a series needs for its mean to refute its header (as
#: ``sorter.reports.SERIES_MEAN_MIN_IMAGES`` states it; a test holds the two equal).
MIN_IMAGES = 2

_SERIES_VIEWS = ("series_summary", "series_discrepancies", "study_summary")
#: 0012's last disagree arm; the mean arm follows it.
_AFTER = "    WHEN agree_at IS NOT NULL AND p_header <= disagree_at AND n_disagree > 0 THEN 'disagree'\n"
#: The series' mean probabilities, in the innermost aggregate's column list; the evidence joins them.
_P_HEADER_END = " END AS p_header\n"


def _power(column: str, n: int) -> str:
    return " * ".join([column] * n) if n else "1.0"


def under_bound(evidence: str, disagree_at: str, agree_at: str, towards: Fraction = TOWARDS) -> str:
    """SQL: ``evidence <= disagree_at^(1-t) x agree_at^t``, as ``evidence^q <= disagree_at^(q-p)
    x agree_at^p`` for t = p/q (every operand positive), guarded as ``sorter.reports.mean_bound``
    is (no bound unless ``agree_at > disagree_at > 0``)."""
    p, q = towards.numerator, towards.denominator
    return (
        f"{agree_at} > {disagree_at} AND {disagree_at} > 0 AND {_power(evidence, q)}"
        f" <= {_power(disagree_at, q - p)} * {_power(agree_at, p)}"
    )


def mean_arm(towards: Fraction = TOWARDS, min_images: int = MIN_IMAGES) -> str:
    """The verdict's mean arm: SQL for :func:`sorter.reports.contradicts`'s mean rule on a series."""
    return (
        f"    WHEN agree_at IS NOT NULL AND n_instances >= {min_images} AND 2 * n_agree <= n_instances"
        f" AND label <> header_label AND {under_bound('p_evidence', 'disagree_at', 'agree_at', towards)}"
        " THEN 'disagree'\n"
    )


def evidence(prefix: str = "", header: str = "header_label") -> str:
    """SQL: the evidence for the header label among probability columns ``{prefix}p_ct`` ...: PT
    + NM under either (``sorter.reports.evidence_labels``), else the header label's own."""
    own = " ".join(f"WHEN '{x.upper()}' THEN {prefix}p_{x}" for x in ("ct", "mr", "xr", "mg", "us", "ot"))
    return (
        f"CASE WHEN {header} IN ('PT', 'NM') THEN COALESCE({prefix}p_pt, 0) + COALESCE({prefix}p_nm, 0)"
        f" ELSE CASE {header} {own} END END"
    )


_EVIDENCE = f", {evidence()} AS p_evidence"


def _views(mean_refutes: bool) -> list[tuple[str, str]]:
    # Earlier revisions' SQL is frozen with them; this one edits 0012's series view.
    previous = importlib.import_module("sorter.migrations.versions.0012_series_majority_agrees")
    out = []
    for name, sql in previous._views(majority_agrees=True):
        if name == "series_summary" and mean_refutes:
            edits = ((_AFTER, _AFTER + mean_arm()), (_P_HEADER_END, f" END AS p_header{_EVIDENCE}\n"))
            for old, new in edits:
                assert sql.count(old) == 1, f"0012's series view is not what this revision expects: {old!r}"
                sql = sql.replace(old, new)
        out.append((name, sql))
    return out


def _replace(mean_refutes: bool) -> None:
    for name in reversed(_SERIES_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for name, sql in _views(mean_refutes):
        op.execute(f"CREATE VIEW {name} AS {sql}")
    op.execute("DELETE FROM series_state")  # rebuilt by the review page's next refresh


def upgrade() -> None:
    """Recreate the series views with the mean arm."""
    _replace(mean_refutes=True)


def downgrade() -> None:
    """Recreate them as 0012 made them."""
    _replace(mean_refutes=False)
