"""adaptations: ``sorter adapt`` runs, confident learning's label issues, and their views.

``adaptations`` records each run (the model it started from, the out-of-fold pseudo-model its
cross-fitted predictions are stored under, the adapted model); ``models.role`` marks that
pseudo-model ``out_of_fold`` so that it is never made active. ``label_issues`` holds one row per
sampled instance and run: the out-of-fold probability of its header's label, the label-issue
score (one minus it) and whether confident learning flags it.

Three views show the latest finished adaptation beside the generic model, per instance, series
and study: ``adapted_instances`` (generic verdict from the run's base model, adapted verdict from
the out-of-fold prediction where the instance was sampled, else from the adapted model once
``sorter reclassify`` ran it, label-issue score), ``adapted_series`` and ``adapted_studies``.
A series is a label issue when at least half of its scored instances are.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INSTANCES = """
SELECT i.id AS instance_id, i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid,
  i.source, i.institution_name, i.station_name, i.calling_ae, i.header_modality, i.header_label,
  a.id AS adaptation_id,
  g.label AS generic_label, g.confidence AS generic_confidence, g.verdict AS generic_verdict,
  COALESCE(o.label, d.label) AS adapted_label,
  COALESCE(o.confidence, d.confidence) AS adapted_confidence,
  COALESCE(o.verdict, d.verdict) AS adapted_verdict,
  CASE WHEN o.id IS NOT NULL THEN 'out_of_fold' WHEN d.id IS NOT NULL THEN 'adapted_model' END
    AS adapted_by,
  li.fold, li.self_confidence, li.score AS label_issue_score,
  CASE WHEN li.is_issue THEN 1 WHEN li.id IS NOT NULL THEN 0 END AS is_label_issue
FROM adaptations a
JOIN instances i ON i.status = 'done'
LEFT JOIN predictions g ON g.instance_id = i.id AND g.model_id = a.base_model_id
LEFT JOIN predictions d ON d.instance_id = i.id AND d.model_id = a.adapted_model_id
LEFT JOIN predictions o ON o.instance_id = i.id AND o.model_id = a.oof_model_id
LEFT JOIN label_issues li ON li.adaptation_id = a.id AND li.instance_id = i.id
WHERE a.id = (SELECT MAX(x.id) FROM adaptations x WHERE x.status = 'done')
"""


def _majority(column: str, name: str) -> str:
    """A series verdict by vote: disagree or agree when more than half of its instances say so."""
    dis = f"SUM(CASE WHEN {column} = 'disagree' THEN 1 ELSE 0 END)"
    agree = f"SUM(CASE WHEN {column} = 'agree' THEN 1 ELSE 0 END)"
    return (
        f"CASE WHEN COUNT({column}) = 0 THEN NULL WHEN 2 * {dis} > COUNT({column}) THEN 'disagree'"
        f" WHEN 2 * {agree} > COUNT({column}) THEN 'agree' ELSE 'uncertain' END AS {name}"
    )


_SERIES = f"""
SELECT series_instance_uid, MIN(study_instance_uid) AS study_instance_uid, MIN(source) AS source,
  MIN(station_name) AS station_name, MIN(calling_ae) AS calling_ae,
  MIN(header_label) AS header_label, MIN(adaptation_id) AS adaptation_id,
  COUNT(*) AS n_instances,
  SUM(CASE WHEN generic_verdict = 'disagree' THEN 1 ELSE 0 END) AS n_generic_disagree,
  SUM(CASE WHEN adapted_verdict = 'disagree' THEN 1 ELSE 0 END) AS n_adapted_disagree,
  {_majority("generic_verdict", "generic_verdict")},
  {_majority("adapted_verdict", "adapted_verdict")},
  COUNT(label_issue_score) AS n_scored,
  SUM(CASE WHEN is_label_issue = 1 THEN 1 ELSE 0 END) AS n_label_issues,
  AVG(label_issue_score) AS label_issue_score,
  MAX(label_issue_score) AS max_label_issue_score,
  CASE WHEN COUNT(label_issue_score) = 0 THEN NULL
    WHEN 2 * SUM(CASE WHEN is_label_issue = 1 THEN 1 ELSE 0 END) >= COUNT(label_issue_score) THEN 1
    ELSE 0 END AS is_label_issue
FROM adapted_instances
GROUP BY series_instance_uid
"""

_STUDIES = """
SELECT study_instance_uid, MIN(source) AS source, MIN(adaptation_id) AS adaptation_id,
  COUNT(*) AS n_series, SUM(n_instances) AS n_instances,
  SUM(CASE WHEN generic_verdict = 'disagree' THEN 1 ELSE 0 END) AS n_series_generic_disagree,
  SUM(CASE WHEN adapted_verdict = 'disagree' THEN 1 ELSE 0 END) AS n_series_adapted_disagree,
  SUM(CASE WHEN is_label_issue = 1 THEN 1 ELSE 0 END) AS n_series_label_issues,
  MAX(label_issue_score) AS label_issue_score
FROM adapted_series
GROUP BY study_instance_uid
"""

VIEWS = (("adapted_instances", _INSTANCES), ("adapted_series", _SERIES), ("adapted_studies", _STUDIES))


def upgrade() -> None:
    """Add the role column, the two tables and the three views."""
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.add_column("models", sa.Column("role", sa.String(16), nullable=True))
    op.create_table(
        "adaptations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column(
            "base_model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column(
            "oof_model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column(
            "adapted_model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column("work_dir", sa.Text(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "label_issues",
        sa.Column("id", big_id, primary_key=True),
        sa.Column(
            "adaptation_id", sa.Integer(), sa.ForeignKey("adaptations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("instance_id", big_id, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
        sa.Column("fold", sa.Integer(), nullable=False),
        sa.Column("given_label", sa.String(16), nullable=False),
        sa.Column("self_confidence", sa.Float(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("is_issue", sa.Boolean(), nullable=False),
        sa.UniqueConstraint("adaptation_id", "instance_id", name="uq_label_issues_adaptation_instance"),
    )
    op.create_index("ix_label_issues_instance_id", "label_issues", ["instance_id"])
    for name, sql in VIEWS:
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    """Drop the views, the tables and the column (the adapted models stay registered)."""
    for name, _ in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("label_issues")
    op.drop_table("adaptations")
    # Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): a batch operation would rebuild ``models``, which
    # SQLite refuses while the views of 0008 refer to it.
    op.execute("ALTER TABLE models DROP COLUMN role")
