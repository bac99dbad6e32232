"""The pipeline at a glance (``sorter status``): a handful of aggregate queries, no listing.

Every count is one indexed aggregate, so the command stays fast on a large
archive. Times are UTC; SQLite stores them naive (UTC), PostgreSQL aware.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db import views
from sorter.db.models import Model, Prediction, RuleAction
from sorter.db.queries import as_utc, db_time, instances, pending_backlog
from sorter.domain import Status

TOP_FAILURES = 10


def pipeline_status(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """Counts and ages of the pipeline's work.

    Returns
    -------
    dict
        ``instances`` (total and by status), ``pending`` (count, oldest
        ``registered_at``, its age in seconds), ``failed`` (top reasons),
        ``classified`` (last hour, last day, latest prediction time),
        ``discrepancies`` (instances whose latest prediction disagrees),
        ``models`` (each model with its prediction count) and ``rule_actions``
        (what rules did, by action and status: ``dead`` forwards are the dead letters).
    """
    now = now or datetime.now(UTC)
    n = sa.func.count()
    by_status = {
        (s.value if isinstance(s, Status) else str(s)): count
        for s, count in session.execute(sa.select(instances.c.status, n).group_by(instances.c.status))
    }
    pending, oldest = pending_backlog(session)
    failed = [
        {"reason": reason or "unknown", "n": count}
        for reason, count in session.execute(
            sa.select(instances.c.error, n)
            .where(instances.c.status == Status.FAILED)
            .group_by(instances.c.error)
            .order_by(n.desc(), instances.c.error)
            .limit(TOP_FAILURES)
        )
    ]
    created = Prediction.created_at

    def classified_since(delta: timedelta) -> int:
        # Instances, not predictions: `reclassify` with a second model and `adapt`'s out-of-fold
        # predictions add rows for instances already counted (272 classified read as 350).
        instances_classified = sa.func.count(sa.distinct(Prediction.instance_id))
        stmt = sa.select(instances_classified).where(created >= db_time(session, now - delta))
        return int(session.execute(stmt).scalar_one())

    latest = as_utc(session.execute(sa.select(sa.func.max(created))).scalar_one())
    discrepancies = session.execute(sa.select(n).select_from(views.discrepancies)).scalar_one()
    models = [
        {"model_id": mid, "arch": arch, "sha256": sha[:12], "predictions": count, "latest": as_utc(last)}
        for mid, arch, sha, count, last in session.execute(
            sa.select(Model.id, Model.arch, Model.sha256, sa.func.count(Prediction.id), sa.func.max(created))
            .join(Prediction, Prediction.model_id == Model.id)
            .group_by(Model.id, Model.arch, Model.sha256)
            .order_by(Model.id)
        )
    ]
    return {
        "instances": {"total": sum(by_status.values()), **dict(sorted(by_status.items()))},
        "pending": {
            "n": int(pending),
            "oldest_registered_at": oldest,
            "oldest_age_s": round((now - oldest).total_seconds(), 1) if oldest else None,
        },
        "failed": failed,
        "classified": {
            "last_hour": classified_since(timedelta(hours=1)),
            "last_day": classified_since(timedelta(days=1)),
            "latest_prediction_at": latest,
        },
        "discrepancies": int(discrepancies),
        "models": models,
        "rule_actions": [
            {"action": action, "status": state, "n": count}
            for action, state, count in session.execute(
                sa.select(RuleAction.action, RuleAction.status, n)
                .group_by(RuleAction.action, RuleAction.status)
                .order_by(RuleAction.action, RuleAction.status)
            )
        ],
    }
