"""reviews: people's decisions on discrepancies, and the review state in every view.

One row per decision (``confirm``: the header is wrong and ``label`` is the truth; ``reject``: the
header is right; ``skip``), on an instance or a series, with the reviewer, the time, a note and
the prediction the reviewer was shown. Rows are never deleted: a later decision on the same key
clears ``is_current`` on the earlier one, so the table is also the audit trail. A study decision
is written as one row per series it covers (``via = 'study'``).

``series_state`` is the review queue's summary of every series (the series view's row, with the
active model it was computed for and when): ``sorter serve`` refreshes it incrementally from the
instances changed since (``ix_instances_updated_at``), so that a queue page on an archive of
millions of instances reads a few rows instead of aggregating the archive.

``latest_predictions`` gains the instance's review state (its own decision, else its series'):
``review_decision`` and ``review_label`` (the reviewer's label on confirm, the header's on
reject). ``series_summary`` gains the series' state, ``study_summary`` counts reviewed series.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS = ("CT", "MR", "PT", "NM", "XR", "MG", "US", "OT")

# What a review means for an instance: the most specific current decision (its own, else its
# series'); the label the decision stands for (a reject stands for the instance's own header label).
_DECISION = "COALESCE(ri.decision, rs.decision)"
_LATEST_COLUMNS = (
    f"{_DECISION} AS review_decision,\n"
    f"  CASE {_DECISION} WHEN 'confirm' THEN COALESCE(ri.label, rs.label)"
    " WHEN 'reject' THEN i.header_label END AS review_label,\n"
    "  COALESCE(ri.created_at, rs.created_at) AS reviewed_at,"
)
_LATEST_JOINS = (
    "\nLEFT JOIN reviews ri ON ri.is_current = TRUE AND ri.level = 'instance'"
    " AND ri.uid = i.sop_instance_uid"
    "\nLEFT JOIN reviews rs ON rs.is_current = TRUE AND rs.level = 'series'"
    " AND rs.uid = i.series_instance_uid"
)
_THRESHOLDS_JOIN = "LEFT JOIN model_thresholds t ON t.model_id = p.model_id AND t.label = i.header_label"
_PREDICTED_AT = "p.created_at AS predicted_at"
_STUDY_COUNTS = "SUM(n_disagree) AS n_instances_disagree,"
_STUDY_REVIEWS = (
    "\n  SUM(CASE WHEN review_decision IS NOT NULL THEN 1 ELSE 0 END) AS n_series_reviewed,"
    "\n  SUM(CASE WHEN review_decision = 'confirm' THEN 1 ELSE 0 END) AS n_series_confirmed,"
    "\n  SUM(CASE WHEN review_decision = 'reject' THEN 1 ELSE 0 END) AS n_series_rejected,"
)


def _series(sql: str) -> str:
    """0004's series view with the series' own current decision beside it."""
    return (
        "\nSELECT s.*, rs.decision AS review_decision,"
        "\n  CASE rs.decision WHEN 'confirm' THEN rs.label WHEN 'reject' THEN s.header_label END"
        " AS review_label,"
        "\n  rs.created_at AS reviewed_at"
        f"\nFROM ({sql}\n) s"
        "\nLEFT JOIN reviews rs ON rs.is_current = TRUE AND rs.level = 'series'"
        " AND rs.uid = s.series_instance_uid"
    )


def _views(reviews: bool) -> list[tuple[str, str]]:
    # Earlier revisions' SQL is frozen with them; this one edits 0004's views.
    header_test = importlib.import_module("sorter.migrations.versions.0004_header_test")
    out = []
    for name, sql in header_test._views(header_test=True):
        if reviews:
            edits = {
                "latest_predictions": [
                    (_PREDICTED_AT, _PREDICTED_AT + ",\n  " + _LATEST_COLUMNS.rstrip(",")),
                    (_THRESHOLDS_JOIN, _THRESHOLDS_JOIN + _LATEST_JOINS),
                ],
                "study_summary": [(_STUDY_COUNTS, _STUDY_COUNTS + _STUDY_REVIEWS)],
            }.get(name, [])
            for old, new in edits:
                assert sql.count(old) == 1, f"the {name} SQL this revision edits has changed: {old!r}"
                sql = sql.replace(old, new)
            if name == "series_summary":
                sql = _series(sql)
        out.append((name, sql))
    return out


def _drop_views() -> None:
    for name, _ in reversed(_views(reviews=False)):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def upgrade() -> None:
    """Create the tables and recreate the views with the review state."""
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    _drop_views()
    op.create_table(
        "reviews",
        sa.Column("id", big_id, primary_key=True),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column(
            "label",
            sa.Enum(*LABELS, name="label", native_enum=False, create_constraint=True, length=16),
            nullable=True,
        ),
        sa.Column("header_label", sa.String(16), nullable=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="SET NULL"), nullable=True),
        sa.Column("shown_label", sa.String(16), nullable=True),
        sa.Column("shown_confidence", sa.Float(), nullable=True),
        sa.Column("shown_verdict", sa.String(16), nullable=True),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("via", sa.String(16), nullable=True),
        sa.Column("is_current", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("level IN ('instance', 'series')", name="ck_reviews_level"),
        sa.CheckConstraint("decision IN ('confirm', 'reject', 'skip')", name="ck_reviews_decision"),
    )
    # One current decision per key; the views join on it.
    op.create_index(
        "uq_reviews_current",
        "reviews",
        ["level", "uid"],
        unique=True,
        postgresql_where=sa.text("is_current"),
        sqlite_where=sa.text("is_current"),
    )
    # What the views' joins use: SQLite does not match `is_current = TRUE` to the partial index
    # above and would scan the table for every instance.
    op.create_index("ix_reviews_level_uid", "reviews", ["level", "uid"])
    op.create_index("ix_reviews_study_instance_uid", "reviews", ["study_instance_uid"])
    op.create_table(
        "series_state",
        sa.Column("series_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("source", sa.String(255), nullable=True),
        sa.Column("station_name", sa.String(64), nullable=True),
        sa.Column("header_modality", sa.String(16), nullable=True),
        sa.Column("header_label", sa.String(16), nullable=True),
        sa.Column("label", sa.String(16), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("second_confidence", sa.Float(), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("n_disagree", sa.Integer(), nullable=False),
        sa.Column("n_uncertain", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_series_state_verdict_series", "series_state", ["verdict", "series_instance_uid"])
    op.create_index("ix_series_state_verdict_study", "series_state", ["verdict", "study_instance_uid"])
    op.create_index("ix_instances_updated_at", "instances", ["updated_at"])
    for name, sql in _views(reviews=True):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    """Recreate the views as 0004 made them and drop the tables (the decisions are lost)."""
    _drop_views()
    op.drop_index("ix_instances_updated_at", table_name="instances")
    op.drop_table("series_state")
    op.drop_table("reviews")
    for name, sql in _views(reviews=False):
        op.execute(f"CREATE VIEW {name} AS {sql}")
