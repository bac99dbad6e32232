"""models.agree_at / disagree_at: the header test, at the series level too.

Models since the header test store the operating point they were chosen at
(see :class:`sorter.model.spec.Thresholds`): an instance's header is confirmed
when its label's probability is at least ``agree_at`` and refuted when at most
``disagree_at``. The series view applies the same test to the series' mean
probability of its header label, after 0003's majority rule; a model without
the columns (NULL) keeps the earlier confidence and margin rule.
``latest_predictions`` gains both columns, so every view is recreated.

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

_LATEST_BEFORE = "m.min_confidence, m.min_margin,"
_LATEST_AFTER = "m.min_confidence, m.min_margin, m.agree_at, m.disagree_at,"
_AGG_BEFORE = "MAX(min_confidence) AS min_confidence, MAX(min_margin) AS min_margin,"
# The strictest operating point of the models in the series, as for the older thresholds.
_AGG_AFTER = _AGG_BEFORE + " MAX(agree_at) AS agree_at, MIN(disagree_at) AS disagree_at,"
_RULE_AFTER = "    WHEN 2 * n_disagree > n_instances AND label <> header_label THEN 'disagree'\n"
_HEADER_TEST = (
    "    WHEN agree_at IS NOT NULL AND p_header >= agree_at THEN 'agree'\n"
    "    WHEN agree_at IS NOT NULL AND p_header <= disagree_at THEN 'disagree'\n"
    "    WHEN agree_at IS NOT NULL THEN 'uncertain'\n"
)


def _once(sql: str, old: str, new: str) -> str:
    assert sql.count(old) == 1, f"the view SQL this revision edits has changed: {old!r}"
    return sql.replace(old, new)


def _views(header_test: bool) -> list[tuple[str, str]]:
    # Earlier revisions' SQL is frozen with them; this one edits 0003's views.
    majority = importlib.import_module("sorter.migrations.versions.0003_series_majority_disagrees")
    initial = importlib.import_module("sorter.migrations.versions.0001_initial_schema")
    series = dict(majority._views(majority=True))
    out = []
    for name, sql in initial._views(op.get_context().dialect.name):
        sql = series.get(name, sql)
        if header_test and name == "latest_predictions":
            sql = _once(sql, _LATEST_BEFORE, _LATEST_AFTER)
        if header_test and name == "series_summary":
            sql = _once(_once(sql, _AGG_BEFORE, _AGG_AFTER), _RULE_AFTER, _RULE_AFTER + _HEADER_TEST)
        out.append((name, sql))
    return out


def _drop_views() -> None:
    for name, _ in reversed(_views(header_test=False)):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def upgrade() -> None:
    """Add the two columns (NULL for existing models) and recreate the views."""
    _drop_views()
    op.add_column("models", sa.Column("agree_at", sa.Float(), nullable=True))
    op.add_column("models", sa.Column("disagree_at", sa.Float(), nullable=True))
    for name, sql in _views(header_test=True):
        op.execute(f"CREATE VIEW {name} AS {sql}")


def downgrade() -> None:
    """Recreate the views as 0003 left them and drop the columns."""
    _drop_views()
    with op.batch_alter_table("models") as batch:
        batch.drop_column("disagree_at")
        batch.drop_column("agree_at")
    for name, sql in _views(header_test=False):
        op.execute(f"CREATE VIEW {name} AS {sql}")
