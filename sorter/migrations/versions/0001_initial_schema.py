"""Initial schema: instances, predictions, models, the scan ledger and the result views.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS = ("CT", "MR", "PT", "NM", "XR", "MG", "US", "OT")
STATUSES = ("pending", "done", "failed", "skipped")
VERDICTS = ("agree", "disagree", "uncertain", "no_header", "unsupported")
NOW = sa.text("CURRENT_TIMESTAMP")


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _enum(values: tuple[str, ...], name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    """Create the tables, their indexes and the views."""
    op.create_table(
        "instances",
        sa.Column("id", _id(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=True),
        sa.Column("sop_class_uid", sa.String(64), nullable=True),
        sa.Column("header_modality", sa.String(16), nullable=True),
        sa.Column("header_label", _enum(LABELS, "header_label"), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        sa.Column("institution_name", sa.String(128), nullable=True),
        sa.Column("station_name", sa.String(64), nullable=True),
        sa.Column("calling_ae", sa.String(16), nullable=True),
        sa.Column("source", sa.String(255), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", _enum(STATUSES, "status"), server_default="pending", nullable=False),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("prediction_id", _id(), nullable=True),
        sa.Column("registered_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instances_sop_instance_uid")),
    )
    op.create_index("ix_instances_status_id", "instances", ["status", "id"])
    op.create_index("ix_instances_series_instance_uid", "instances", ["series_instance_uid"])
    op.create_index("ix_instances_study_instance_uid", "instances", ["study_instance_uid"])
    op.create_index("ix_instances_prediction_id", "instances", ["prediction_id"])
    op.create_index("ix_instances_source", "instances", ["source"])

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("arch", sa.String(64), nullable=False),
        sa.Column("labels", sa.String(64), nullable=False),
        sa.Column("min_confidence", sa.Float(), nullable=False),
        sa.Column("min_margin", sa.Float(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("sha256", name=op.f("uq_models_sha256")),
    )

    op.create_table(
        "files",
        sa.Column("id", _id(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=True),
        sa.Column("instance_id", _id(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_files_instance_id_instances"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
        sa.UniqueConstraint("path", name=op.f("uq_files_path")),
    )
    op.create_index(op.f("ix_files_instance_id"), "files", ["instance_id"])

    op.create_table(
        "predictions",
        sa.Column("id", _id(), nullable=False),
        sa.Column("instance_id", _id(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("label", _enum(LABELS, "label"), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("second_label", _enum(LABELS, "second_label"), nullable=False),
        sa.Column("second_confidence", sa.Float(), nullable=False),
        sa.Column("verdict", _enum(VERDICTS, "verdict"), nullable=False),
        *(sa.Column(f"p_{label.lower()}", sa.Float(), nullable=True) for label in LABELS),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_id"],
            ["instances.id"],
            name=op.f("fk_predictions_instance_id_instances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_predictions_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
        sa.UniqueConstraint("instance_id", "model_id", name="uq_predictions_instance_id_model_id"),
    )
    op.create_index("ix_predictions_model_id", "predictions", ["model_id"])
    op.create_index("ix_predictions_verdict_confidence", "predictions", ["verdict", "confidence"])

    for name, sql in _views(op.get_context().dialect.name):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    """Drop the views, then the tables."""
    for name, _ in reversed(_views(op.get_context().dialect.name)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for table in ("predictions", "files", "models", "instances"):
        op.drop_table(table)


# --- views -------------------------------------------------------------------------------------
# Written out in SQL (not generated from the current models) so that this revision stays what it
# was when it shipped. Only two spellings differ between the databases: the largest of several
# values (GREATEST / SQLite's multi-argument max) and the list of distinct values in a group.


def _views(dialect: str) -> list[tuple[str, str]]:
    greatest = "GREATEST" if dialect == "postgresql" else "max"

    def distinct_list(column: str) -> str:
        if dialect == "postgresql":
            return f"string_agg(DISTINCT {column}, ',' ORDER BY {column})"
        return f"group_concat(DISTINCT {column})"

    p_cols = [f"p_{label.lower()}" for label in LABELS]
    avg_p = ",\n  ".join(f"AVG({c}) AS {c}" for c in p_cols)
    top1 = f"{greatest}(" + ", ".join(f"COALESCE({c}, -1.0)" for c in p_cols) + ")"
    label_of_top1 = (
        "CASE confidence "
        + " ".join(f"WHEN {c} THEN '{lab}'" for c, lab in zip(p_cols, LABELS, strict=True))
        + " END"
    )
    # The runner-up: every column except the winner's, again through the largest-of function.
    top2 = (
        f"{greatest}("
        + ", ".join(
            f"CASE WHEN label = '{lab}' THEN -1.0 ELSE COALESCE({c}, -1.0) END"
            for c, lab in zip(p_cols, LABELS, strict=True)
        )
        + ")"
    )
    p_of_header = (
        "CASE header_label "
        + " ".join(f"WHEN '{lab}' THEN {c}" for c, lab in zip(p_cols, LABELS, strict=True))
        + " END"
    )
    p_list = ", ".join(p_cols)
    p_list_p = ", ".join(f"p.{c}" for c in p_cols)

    latest = f"""
SELECT i.id AS instance_id, i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid,
  i.sop_class_uid, i.header_modality, i.header_label, i.source, i.institution_name, i.station_name,
  i.calling_ae, i.path, i.status,
  p.id AS prediction_id, p.label, p.confidence, p.second_label, p.second_confidence, p.verdict,
  {p_list_p},
  m.id AS model_id, m.sha256 AS model_sha256, m.min_confidence, m.min_margin, p.created_at AS predicted_at
FROM instances i
JOIN predictions p ON p.id = i.prediction_id
JOIN models m ON m.id = p.model_id"""

    discrepancies = """
SELECT * FROM latest_predictions WHERE verdict = 'disagree'"""

    # A series' label is the argmax of its instances' mean probabilities; its verdict
    # applies sorter.compare.compare to that mean with the strictest model thresholds.
    series = f"""
SELECT series_instance_uid, study_instance_uid, source, institution_name, station_name,
  header_modality, header_label, n_header_labels, label, confidence, second_confidence,
  n_instances, n_disagree, n_uncertain,
  CASE
    WHEN header_label IS NULL THEN 'no_header'
    WHEN p_header IS NULL THEN 'unsupported'
    WHEN confidence < min_confidence OR confidence - second_confidence < min_margin THEN 'uncertain'
    WHEN label = header_label THEN 'agree'
    ELSE 'disagree'
  END AS verdict,
  {p_list}
FROM (
  SELECT ranked.*, {top2} AS second_confidence, {p_of_header} AS p_header
  FROM (
    SELECT agg.*, {label_of_top1} AS label
    FROM (
      SELECT agg0.*, {top1} AS confidence
      FROM (
        SELECT series_instance_uid,
          MAX(study_instance_uid) AS study_instance_uid, MAX(source) AS source,
          MAX(institution_name) AS institution_name, MAX(station_name) AS station_name,
          MAX(header_modality) AS header_modality, MAX(header_label) AS header_label,
          COUNT(DISTINCT header_label) AS n_header_labels,
          COUNT(*) AS n_instances,
          SUM(CASE WHEN verdict = 'disagree' THEN 1 ELSE 0 END) AS n_disagree,
          SUM(CASE WHEN verdict = 'uncertain' THEN 1 ELSE 0 END) AS n_uncertain,
          MAX(min_confidence) AS min_confidence, MAX(min_margin) AS min_margin,
          {avg_p}
        FROM latest_predictions
        WHERE series_instance_uid IS NOT NULL
        GROUP BY series_instance_uid
      ) agg0
    ) agg
  ) ranked
) series"""

    series_discrepancies = """
SELECT * FROM series_summary WHERE verdict = 'disagree'"""

    study = f"""
SELECT study_instance_uid, MAX(source) AS source,
  {distinct_list("header_label")} AS header_labels, {distinct_list("label")} AS labels,
  COUNT(*) AS n_series, SUM(n_instances) AS n_instances,
  SUM(CASE WHEN verdict = 'disagree' THEN 1 ELSE 0 END) AS n_series_disagree,
  SUM(CASE WHEN verdict = 'uncertain' THEN 1 ELSE 0 END) AS n_series_uncertain,
  SUM(n_disagree) AS n_instances_disagree,
  CASE
    WHEN SUM(CASE WHEN verdict = 'disagree' THEN 1 ELSE 0 END) > 0 THEN 'disagree'
    WHEN SUM(CASE WHEN verdict = 'uncertain' THEN 1 ELSE 0 END) > 0 THEN 'uncertain'
    WHEN SUM(CASE WHEN verdict = 'agree' THEN 1 ELSE 0 END) > 0 THEN 'agree'
    WHEN SUM(CASE WHEN verdict = 'no_header' THEN 1 ELSE 0 END) > 0 THEN 'no_header'
    ELSE 'unsupported'
  END AS verdict
FROM series_summary
WHERE study_instance_uid IS NOT NULL
GROUP BY study_instance_uid"""

    return [
        ("latest_predictions", latest),
        ("discrepancies", discrepancies),
        ("series_summary", series),
        ("series_discrepancies", series_discrepancies),
        ("study_summary", study),
    ]
