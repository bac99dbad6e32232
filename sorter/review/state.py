"""The review queue's summary table (``series_state``): the series view, kept current incrementally.

The series view aggregates every instance of the archive; on a million instances that costs
seconds, far too much for a page. ``series_state`` holds the view's row per series, for the
active model. A refresh recomputes only the series with an instance changed since the previous
refresh (``instances.updated_at``, indexed; every write path stamps it: registration, each
classification, a reset), with a margin for transactions that started before it and committed
after. A switch of the active model (``sorter models use`` moves pointers without stamping
instances) rebuilds the table, as does an empty one. Reviews are not part of it: the queue joins
the ``reviews`` table live, so a decision shows at once.

Deleted instances stamp nothing: series left without instances are pruned every few minutes
(an index probe per series), so a queue row may briefly lead to a page that says the series is
gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db import views
from sorter.db.models import Base
from sorter.db.queries import active_model, instances

log = logging.getLogger(__name__)

#: Transactions may commit up to this long after they stamped ``updated_at``.
MARGIN = timedelta(minutes=2)
#: Series recomputed per statement.
_CHUNK = 500
table = Base.metadata.tables["series_state"]
#: The series view's columns the table keeps (all but its own bookkeeping), in the table's order.
COLUMNS = tuple(c.name for c in table.columns if c.name not in ("model_id", "computed_at"))


@dataclass(frozen=True)
class Refreshed:
    """What a refresh did: ``rebuilt`` the whole table or ``updated`` some series."""

    kind: str  # "rebuilt" | "updated"
    series: int
    seconds: float


def _insert_from_view(session: Session, model_id: Any, now: Any, uids: Sequence[str] | None) -> None:
    ss = views.series_summary
    select = sa.select(
        *(ss.c[c] for c in COLUMNS), sa.literal(model_id, sa.Integer()), sa.literal(now, sa.DateTime())
    ).where(ss.c.series_instance_uid.is_not(None))
    if uids is not None:
        select = select.where(ss.c.series_instance_uid.in_(list(uids)))
    session.execute(table.insert().from_select([*COLUMNS, "model_id", "computed_at"], select))


def refresh(session: Session, prune: bool = True) -> Refreshed:
    """Bring ``series_state`` up to date in ``session`` and commit.

    ``prune`` also drops the rows of series that have no instance left (deleted instances stamp
    nothing): one index probe per series, so callers do it now and then, not on every refresh.
    """
    started = time.monotonic()
    active = session.execute(sa.select(active_model())).scalar()
    now = session.execute(sa.select(sa.func.now())).scalar_one()
    n, low, high, last = session.execute(
        sa.select(
            sa.func.count(),
            sa.func.min(table.c.model_id),
            sa.func.max(table.c.model_id),
            sa.func.max(table.c.computed_at),
        )
    ).one()
    if n == 0 or low != active or high != active or last is None:
        session.execute(table.delete())
        _insert_from_view(session, active, now, None)
        session.commit()
        count = session.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
        return Refreshed("rebuilt", int(count), time.monotonic() - started)
    since = last - MARGIN
    # Deduplicated here, not with DISTINCT: with DISTINCT SQLite's planner walks the series index
    # instead of ix_instances_updated_at (300 ms instead of milliseconds on a million instances).
    changed = list(
        dict.fromkeys(
            str(uid)
            for uid in session.execute(
                sa.select(instances.c.series_instance_uid).where(
                    instances.c.updated_at >= since, instances.c.series_instance_uid.is_not(None)
                )
            ).scalars()
        )
    )
    for start in range(0, len(changed), _CHUNK):
        chunk = changed[start : start + _CHUNK]
        session.execute(table.delete().where(table.c.series_instance_uid.in_(chunk)))
        _insert_from_view(session, active, now, chunk)
    if prune:
        gone = ~sa.exists().where(instances.c.series_instance_uid == table.c.series_instance_uid)
        session.execute(table.delete().where(gone))
    session.commit()
    return Refreshed("updated", len(changed), time.monotonic() - started)


class Refresher:
    """Refreshes ``series_state`` at most every ``interval_s`` seconds, one caller at a time, and
    prunes vanished series every ``prune_s``."""

    def __init__(self, interval_s: float = 10.0, prune_s: float = 300.0) -> None:
        self.interval_s = interval_s
        self.prune_s = prune_s
        self._lock = threading.Lock()
        self._at = self._pruned_at = -float("inf")

    def ensure(self, session: Session, force: bool = False) -> Refreshed | None:
        """Refresh when the last one is older than the interval (or ``force``); ``None`` if not."""
        with self._lock:
            if not force and time.monotonic() - self._at < self.interval_s:
                return None
            prune = time.monotonic() - self._pruned_at >= self.prune_s
            result = refresh(session, prune=prune)
            self._at = time.monotonic()
            if prune:
                self._pruned_at = self._at
        level = logging.INFO if result.kind == "rebuilt" or result.seconds > 1 else logging.DEBUG
        log.log(level, "review queue %s: %d series in %.2f s", result.kind, result.series, result.seconds)
        return result
