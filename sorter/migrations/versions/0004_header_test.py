"""model_thresholds: the header test's operating point per model and header label.

Models since the header test store, per header label, the thresholds they were
chosen at (see :class:`sorter.model.spec.Thresholds`): an instance's header is
confirmed when its label's probability is at least ``agree_at`` and refuted
when at most ``disagree_at``. ``latest_predictions`` gains both columns (for
the instance's header label), and the series view applies the same test to the
series' mean probability of its header label, after 0003's majority rule. A
model without rows keeps the earlier confidence and margin rule. Every view is
recreated, since all are built on ``latest_predictions``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS = ("CT", "MR", "PT", "NM", "XR", "MG", "US", "OT")

_LATEST_COLUMNS = "m.min_confidence, m.min_margin,"
_LATEST_JOIN = "JOIN models m ON m.id = p.model_id"
_AGG = "MAX(min_confidence) AS min_confidence, MAX(min_margin) AS min_margin,"
_MAJORITY = "    WHEN 2 * n_disagree > n_instances AND label <> header_label THEN 'disagree'\n"
_HEADER_TEST = (
    "    WHEN agree_at IS NOT NULL AND p_header >= agree_at THEN 'agree'\n"
    "    WHEN agree_at IS NOT NULL AND p_header <= disagree_at THEN 'disagree'\n"
    "    WHEN agree_at IS NOT NULL THEN 'uncertain'\n"
)
_EDITS = {
    "latest_predictions": [
        (_LATEST_COLUMNS, _LATEST_COLUMNS + " t.agree_at, t.disagree_at,"),
        (
            _LATEST_JOIN,
            _LATEST_JOIN
            + "\nLEFT JOIN model_thresholds t ON t.model_id = p.model_id AND t.label = i.header_label",
        ),
    ],
    # The strictest operating point among the series' instances, as for the older thresholds.
    "series_summary": [
        (_AGG, _AGG + " MAX(agree_at) AS agree_at, MIN(disagree_at) AS disagree_at,"),
        (_MAJORITY, _MAJORITY + _HEADER_TEST),
    ],
}


def _views(header_test: bool) -> list[tuple[str, str]]:
    # Earlier revisions' SQL is frozen with them; this one edits 0003's views.
    majority = importlib.import_module("sorter.migrations.versions.0003_series_majority_disagrees")
    initial = importlib.import_module("sorter.migrations.versions.0001_initial_schema")
    series = dict(majority._views(majority=True))
    out = []
    for name, sql in initial._views(op.get_context().dialect.name):
        sql = series.get(name, sql)
        for old, new in _EDITS.get(name, []) if header_test else []:
            assert sql.count(old) == 1, f"the {name} SQL this revision edits has changed: {old!r}"
            sql = sql.replace(old, new)
        out.append((name, sql))
    return out


def _drop_views() -> None:
    for name, _ in reversed(_views(header_test=False)):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def upgrade() -> None:
    """Create the table and recreate the views."""
    _drop_views()
    op.create_table(
        "model_thresholds",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column(
            "label",
            sa.Enum(*LABELS, name="label", native_enum=False, create_constraint=True, length=16),
            nullable=False,
        ),
        sa.Column("agree_at", sa.Float(), nullable=False),
        sa.Column("disagree_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_model_thresholds_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("model_id", "label", name=op.f("pk_model_thresholds")),
    )
    for name, sql in _views(header_test=True):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    """Recreate the views as 0003 left them and drop the table."""
    _drop_views()
    op.drop_table("model_thresholds")
    for name, sql in _views(header_test=False):
        op.execute(f"CREATE VIEW {name} AS {sql}")
