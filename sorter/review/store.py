"""Reviews in the database: decisions on discrepancies, the review queue, and what reviews measured.

The queue is paged by key (a series or study UID, or an instance's confidence and id), never by
offset, so that page 1 000 of a 10-million-instance archive costs what page 1 does. Series and
study lists read ``series_state`` (:mod:`sorter.review.state`, the series view kept current
incrementally) joined with the current decisions; instance lists read the views directly (an
index walk). A series page and a decision read the views live.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db import views
from sorter.db.models import Review
from sorter.db.queries import active_model, instances
from sorter.domain import Label, Verdict
from sorter.review import state

LEVELS = ("series", "study", "instance")
DECISIONS = ("confirm", "reject", "skip")
#: Review-state filters: what the queue shows.
REVIEW_STATES = ("unreviewed", "reviewed", "confirm", "reject", "skip", "any")
#: Verdicts a queue may list.
QUEUE_VERDICTS = (Verdict.DISAGREE.value, Verdict.UNCERTAIN.value)


class ReviewError(ValueError):
    """A decision that cannot be recorded, with a message for the reviewer."""


@dataclass(frozen=True)
class Filters:
    """What the discrepancy queue shows (every field optional)."""

    verdict: str = Verdict.DISAGREE.value
    label: str | None = None  # what the pixels show
    header: str | None = None  # the header's label
    source: str | None = None
    min_confidence: float = 0.0
    review: str = "unreviewed"

    def __post_init__(self) -> None:
        if self.verdict not in QUEUE_VERDICTS:
            raise ReviewError(f"verdict must be one of {', '.join(QUEUE_VERDICTS)}")
        if self.review not in REVIEW_STATES:
            raise ReviewError(f"review must be one of {', '.join(REVIEW_STATES)}")
        for name in ("label", "header"):
            value = getattr(self, name)
            if value is not None and value not in Label.__members__:
                raise ReviewError(f"{name} must be one of {', '.join(Label.__members__)}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ReviewError("min_confidence must lie between 0 and 1")


@dataclass
class Page:
    """One page of the queue: rows, and the key of the next page (``None`` at the end)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    next_after: str | None = None


def _review_clause(column: sa.ColumnElement[Any], state: str) -> sa.ColumnElement[bool] | None:
    if state == "any":
        return None
    if state == "unreviewed":
        return column.is_(None)
    if state == "reviewed":
        return column.in_(["confirm", "reject"])
    return column == state


def _where(table: sa.TableClause | sa.Subquery, filters: Filters) -> list[Any]:
    c = table.c
    clauses: list[Any] = [c.verdict == filters.verdict]
    if filters.label:
        clauses.append(c.label == filters.label)
    if filters.header:
        clauses.append(c.header_label == filters.header)
    if filters.source:
        clauses.append(c.source == filters.source)
    if filters.min_confidence:
        clauses.append(c.confidence >= filters.min_confidence)
    review = _review_clause(c.review_decision, filters.review)
    if review is not None:
        clauses.append(review)
    return clauses


def series_rows(session: Session, series_uids: Sequence[str]) -> list[dict[str, Any]]:
    """The series view's rows for ``series_uids`` (computed for those series only)."""
    if not series_uids:
        return []
    ss = views.series_summary
    stmt = sa.select(ss).where(ss.c.series_instance_uid.in_(list(series_uids)))
    return [dict(r._mapping) for r in session.execute(stmt)]


def queue(session: Session, level: str, filters: Filters, after: str | None = None, limit: int = 50) -> Page:
    """One page of discrepancies at ``level`` (``series``, ``study`` or ``instance``) after ``after``."""
    if level not in LEVELS:
        raise ReviewError(f"level must be one of {', '.join(LEVELS)}")
    if level == "instance":
        return _instance_page(session, filters, after, limit)
    if level == "series":
        return _series_page(session, filters, after or "", limit)
    return _study_page(session, filters, after or "", limit)


def _queued() -> sa.Subquery:
    """``series_state`` with each series' current decision (joined live: a decision shows at once)."""
    st = state.table
    review = sa.case(
        (Review.decision == "confirm", Review.label), (Review.decision == "reject", st.c.header_label)
    )
    joined = st.outerjoin(
        Review.__table__,
        sa.and_(
            Review.is_current.is_(True), Review.level == "series", Review.uid == st.c.series_instance_uid
        ),
    )
    return (
        sa.select(
            st,
            Review.decision.label("review_decision"),
            review.label("review_label"),
            Review.created_at.label("reviewed_at"),
        )
        .select_from(joined)
        .subquery("queued")
    )


def _series_page(session: Session, filters: Filters, after: str, limit: int) -> Page:
    q = _queued()
    stmt = (
        sa.select(q)
        .where(*_where(q, filters), q.c.series_instance_uid > after)
        .order_by(q.c.series_instance_uid)
        .limit(limit + 1)
    )
    rows = [dict(r._mapping) for r in session.execute(stmt)]
    page = Page(rows=rows[:limit])
    if len(rows) > limit:
        page.next_after = rows[limit - 1]["series_instance_uid"]
    return page


def _study_page(session: Session, filters: Filters, after: str, limit: int) -> Page:
    """Studies with a series that the filters match, keyed by study UID; each with all its series."""
    q = _queued()
    studies = [
        str(uid)
        for uid in session.execute(
            sa.select(q.c.study_instance_uid)
            .where(*_where(q, filters), q.c.study_instance_uid > after)
            .group_by(q.c.study_instance_uid)
            .order_by(q.c.study_instance_uid)
            .limit(limit + 1)
        ).scalars()
    ]
    series = session.execute(sa.select(q).where(q.c.study_instance_uid.in_(studies[:limit])))
    page = Page(rows=_studies([dict(r._mapping) for r in series], filters.verdict))
    if len(studies) > limit:
        page.next_after = studies[limit - 1]
    return page


def study_rows(session: Session, study_uids: Sequence[str]) -> list[dict[str, Any]]:
    """Studies ``study_uids`` summarised from their series' live rows (the views), in UID order."""
    i = instances.c
    uids = (
        sa.select(i.series_instance_uid)
        .where(i.study_instance_uid.in_(list(study_uids)), i.series_instance_uid.is_not(None))
        .distinct()
    )
    return _studies(series_rows(session, [str(u) for u in session.execute(uids).scalars()]))


def _studies(
    series_rows_: Sequence[dict[str, Any]], verdict: str = Verdict.DISAGREE.value
) -> list[dict[str, Any]]:
    """Study rows from series rows: counts, labels, and the state of the series the queue shows
    (:func:`flagged_series`)."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in series_rows_:
        by_study.setdefault(row["study_instance_uid"], []).append(row)
    out = []
    for uid in sorted(by_study):
        series = sorted(by_study[uid], key=lambda r: r["series_instance_uid"])
        flagged = [s for s in series if s["verdict"] == Verdict.DISAGREE.value]
        shown = flagged_series(series, verdict)
        out.append(
            {
                "study_instance_uid": uid,
                "source": series[0]["source"],
                "header_labels": ",".join(sorted({s["header_label"] for s in series if s["header_label"]})),
                "labels": ",".join(sorted({s["label"] for s in series if s["label"]})),
                "n_series": len(series),
                "n_instances": sum(s["n_instances"] for s in series),
                "n_series_disagree": len(flagged),
                "n_series_uncertain": sum(s["verdict"] == Verdict.UNCERTAIN.value for s in series),
                "confidence": max((s["confidence"] for s in shown), default=None),
                "n_series_reviewed": sum(s["review_decision"] is not None for s in shown),
                "review_decision": _study_decision(shown),
                "series": series,
            }
        )
    return out


def flagged_series(
    series: Sequence[dict[str, Any]], verdict: str = Verdict.DISAGREE.value
) -> list[dict[str, Any]]:
    """The series of a study the queue shows and a study decision covers: those with ``verdict``,
    else the ``disagree`` ones, else the ``uncertain`` ones."""

    def having(wanted: str) -> list[dict[str, Any]]:
        return [s for s in series if s["verdict"] == wanted]

    return having(verdict) or having(Verdict.DISAGREE.value) or having(Verdict.UNCERTAIN.value)


def _study_decision(series: Sequence[dict[str, Any]]) -> str | None:
    """A study's review state: its flagged series' decision when they all share one."""
    decisions = {s["review_decision"] for s in series}
    return decisions.pop() if len(decisions) == 1 else None


def _instance_page(session: Session, filters: Filters, after: str | None, limit: int) -> Page:
    lp = views.latest_predictions
    stmt = sa.select(lp).where(*_where(lp, filters))
    if after:
        try:
            confidence_s, id_s = after.split(":", 1)
            confidence, last_id = float(confidence_s), int(id_s)
        except ValueError as exc:
            raise ReviewError("the page key is not one this page made") from exc
        stmt = stmt.where(
            sa.or_(
                lp.c.confidence < confidence,
                sa.and_(lp.c.confidence == confidence, lp.c.instance_id > last_id),
            )
        )
    rows = [
        dict(r._mapping)
        for r in session.execute(stmt.order_by(lp.c.confidence.desc(), lp.c.instance_id).limit(limit + 1))
    ]
    page = Page(rows=rows[:limit])
    if len(rows) > limit:
        last = rows[limit - 1]
        page.next_after = f"{last['confidence']!r}:{last['instance_id']}"
    return page


def series_instances(session: Session, series_uid: str) -> list[dict[str, Any]]:
    """The series' classified instances (the shown prediction of each), in registration order."""
    lp = views.latest_predictions
    stmt = sa.select(lp).where(lp.c.series_instance_uid == series_uid).order_by(lp.c.instance_id)
    return [dict(r._mapping) for r in session.execute(stmt)]


def evenly_spaced(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` items spread evenly over ``items``, first and last included."""
    if len(items) <= n:
        return list(items)
    if n == 1:
        return [items[len(items) // 2]]
    step = (len(items) - 1) / (n - 1)
    return [items[round(k * step)] for k in range(n)]


def history(session: Session, *, series_uid: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Recorded decisions, newest first (all of them are kept: the audit trail)."""
    stmt = sa.select(Review.__table__).order_by(Review.id.desc()).limit(limit)
    if series_uid is not None:
        stmt = stmt.where(Review.series_instance_uid == series_uid)
    return [dict(r._mapping) for r in session.execute(stmt)]


@dataclass(frozen=True)
class Decision:
    """One reviewer's decision as the page or an API sends it."""

    level: str  # series | study | instance
    uid: str
    decision: str  # confirm | reject | skip
    reviewer: str
    label: str | None = None  # confirm: the true label (default: the model's)
    note: str | None = None


def record(session: Session, decision: Decision) -> list[int]:
    """Record ``decision`` and return the new rows' ids; the caller commits.

    A study decision is written once per series of the study that the queue would show
    (``disagree`` series, else ``uncertain`` ones), so that every decision lives on an
    instance or a series and the views need no third join. Earlier current decisions on the
    same keys stop being current. Raises :class:`ReviewError` with a message for the reviewer.
    """
    if decision.decision not in DECISIONS:
        raise ReviewError(f"decision must be one of {', '.join(DECISIONS)}")
    if decision.label is not None and decision.label not in Label.__members__:
        raise ReviewError(f"label must be one of {', '.join(Label.__members__)}")
    if not decision.reviewer:
        raise ReviewError("a decision needs a reviewer")
    note = (decision.note or "").strip()[:2000] or None
    if decision.level == "series":
        targets = series_rows(session, [decision.uid])
        level, via = "series", None
    elif decision.level == "study":
        studies = study_rows(session, [decision.uid])
        if not studies:
            raise ReviewError("no classified series in that study")
        targets = flagged_series(studies[0]["series"])
        if not targets:
            raise ReviewError("that study has no series that disagrees or is uncertain")
        level, via = "series", "study"
    elif decision.level == "instance":
        lp = views.latest_predictions
        targets = [
            dict(r._mapping)
            for r in session.execute(sa.select(lp).where(lp.c.sop_instance_uid == decision.uid))
        ]
        level, via = "instance", None
    else:
        raise ReviewError(f"level must be one of {', '.join(LEVELS)}")
    if not targets:
        raise ReviewError(f"no classified {decision.level} with that UID")
    model = session.execute(sa.select(active_model())).scalar()
    ids = []
    for row in targets:
        uid = row["sop_instance_uid"] if level == "instance" else row["series_instance_uid"]
        label = _decided_label(decision, row)
        session.execute(
            sa.update(Review)
            .where(Review.level == level, Review.uid == uid, Review.is_current.is_(True))
            .values(is_current=False)
        )
        review = Review(
            level=level,
            uid=uid,
            series_instance_uid=row["series_instance_uid"],
            study_instance_uid=row["study_instance_uid"],
            decision=decision.decision,
            label=label,
            header_label=row["header_label"],
            model_id=row.get("model_id", model),
            shown_label=row["label"],
            shown_confidence=row["confidence"],
            shown_verdict=row["verdict"],
            reviewer=decision.reviewer[:128],
            note=note,
            via=via,
            is_current=True,
        )
        session.add(review)
        session.flush()
        ids.append(review.id)
    return ids


def _decided_label(decision: Decision, row: dict[str, Any]) -> Label | None:
    if decision.decision == "reject":
        return Label(row["header_label"]) if row["header_label"] else None
    if decision.decision == "confirm":
        label = decision.label or row["label"]
        if label is None:
            raise ReviewError("confirm needs the true label")
        if label == row["header_label"]:
            raise ReviewError(f"confirm means the header is wrong, but the header already says {label}")
        return Label(label)
    return None


def review_counts(session: Session) -> dict[str, list[dict[str, Any]]]:
    """Reviewed, confirmed and rejected series and instances, and the model's precision as
    reviews measured it, per label the model predicted.

    Precision counts a confirmed decision whose true label is the model's label as right, and
    a rejection (the header was right) or a confirmation with another label as wrong; skips
    do not count. Only current decisions count.
    """
    r = Review.__table__.c
    current = r.is_current.is_(True)
    n = sa.func.count().label("n")
    decisions = [
        {"level": level, "decision": decision, "n": count}
        for level, decision, count in session.execute(
            sa.select(r.level, r.decision, n).where(current).group_by(r.level, r.decision).order_by(r.level)
        )
    ]
    right = sa.func.sum(sa.case((sa.and_(r.decision == "confirm", r.label == r.shown_label), 1), else_=0))
    decided = sa.func.sum(sa.case((r.decision.in_(["confirm", "reject"]), 1), else_=0))
    confirmed = sa.func.sum(sa.case((r.decision == "confirm", 1), else_=0))
    rejected = sa.func.sum(sa.case((r.decision == "reject", 1), else_=0))
    precision = []
    for label, n_decided, n_right, n_confirmed, n_rejected in session.execute(
        sa.select(r.shown_label, decided, right, confirmed, rejected)
        .where(current)
        .group_by(r.shown_label)
        .order_by(r.shown_label)
    ):
        precision.append(
            {
                "label": label,
                "reviewed": int(n_decided or 0),
                "confirmed": int(n_confirmed or 0),
                "rejected": int(n_rejected or 0),
                "right_label": int(n_right or 0),
                "precision": round(int(n_right or 0) / int(n_decided), 4) if n_decided else None,
            }
        )
    return {"reviews": decisions, "review_precision": precision}
