"""Apply a rule set to classified instances: match each against what the database says, act,
and record every action in ``rule_actions`` so that a re-run or a retry never acts twice.

Facts come from the views users query (``latest_predictions``, ``series_summary``, and
``study_summary``'s verdict rule over those series), so a rule sees exactly what ``sorter find``
and the SQL recipes show: the active model's prediction, and the series and study verdicts so far.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sorter.db import views
from sorter.db.models import Base, RuleAction
from sorter.db.queries import (
    as_utc,
    db_time,
    files,
    insert_for,
    instances,
    path_scope,
    path_under,
    query_groups,
)
from sorter.domain import Status
from sorter.fspath import decode_path
from sorter.rules.filing import file_instance
from sorter.rules.forward import MAX_ATTEMPTS, ForwardAction, Item, Sent, next_try, send
from sorter.rules.notify import NotifyAction, OrthancAction, SeriesAction
from sorter.rules.spec import PATTERN_FIELDS, RANGE_FIELDS, FileAction, Rule, RuleSet, load_rules

if TYPE_CHECKING:
    from sorter.config import Settings
    from sorter.domain import Outcome

log = logging.getLogger(__name__)

_CHUNK = 500
#: Seconds a sender's claim on queued actions lasts; then a sender that died is assumed.
LEASE_S = 600.0
rule_actions = Base.metadata.tables["rule_actions"]

#: Which fact each condition reads.
_FACT_OF = {"header": "header_label"}


@dataclass
class RulesReport:
    """What one application did, per rule: acted, already done before, failed (by reason)."""

    done: Counter[str] = field(default_factory=Counter)
    already: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    #: Forwards and notifications not tried in this run: their destination could not be reached
    #: (or refused the association) on the first try, so they wait for the next run.
    waiting: Counter[str] = field(default_factory=Counter)
    instances: int = 0

    def add(self, other: RulesReport) -> None:
        """Count what ``other`` did too (one run's batches, each reported on its own)."""
        for mine, theirs in (
            (self.done, other.done),
            (self.already, other.already),
            (self.failed, other.failed),
            (self.dead, other.dead),
            (self.waiting, other.waiting),
        ):
            mine.update(theirs)
        self.instances += other.instances

    def after(self, batches: RulesReport) -> RulesReport:
        """This closing pass's report joined with what the same run's batches did before it.

        What a batch did is ``already`` done when the closing pass sees it: counted once, as
        done (a scan that moved 5 files said "0 done, 5 already done"). An action that failed in
        a batch and again in the closing pass (a file action is tried again at once; a forward is
        once its backoff is due) is one failure, not two, so the larger of the two counts is taken.
        """
        # A move takes what a batch filed out from under PATH, where the closing pass looks.
        joined = RulesReport(instances=max(self.instances, batches.instances))
        counters = (
            self.done,
            self.already,
            self.failed,
            self.dead,
            self.waiting,
            batches.done,
            batches.failed,
            batches.dead,
        )
        for rule in set().union(*counters):
            joined.done[rule] = batches.done[rule] + self.done[rule]
            joined.already[rule] = max(0, self.already[rule] - batches.done[rule])
            joined.failed[rule] = max(batches.failed[rule], self.failed[rule])
            joined.dead[rule] = batches.dead[rule] + self.dead[rule]
            joined.waiting[rule] = self.waiting[rule]  # what is still waiting after the closing pass
        return joined

    def line(self) -> str:
        """One line for the command's summary."""
        parts = [f"{self.instances} classified instances checked"]
        for rule in sorted(
            set(self.done) | set(self.already) | set(self.failed) | set(self.dead) | set(self.waiting)
        ):
            bits = [f"{self.done[rule]} done"]
            if self.already[rule]:
                bits.append(f"{self.already[rule]} already done")
            if self.failed[rule]:
                bits.append(f"{self.failed[rule]} failed")
            if self.dead[rule]:
                bits.append(f"{self.dead[rule]} dead-lettered")
            if self.waiting[rule]:
                bits.append(f"{self.waiting[rule]} wait for the next run (destination unreachable)")
            parts.append(f"{rule}: {', '.join(bits)}")
        return "rules: " + "; ".join(parts)


def _facts_query(ids: Sequence[int]) -> sa.Select[Any]:
    lp = views.latest_predictions
    return sa.select(
        lp.c.instance_id,
        lp.c.path,
        lp.c.label,
        lp.c.header_label,
        lp.c.verdict,
        lp.c.confidence,
        lp.c.header_modality.label("modality"),
        lp.c.source,
        lp.c.station_name.label("station"),
        lp.c.institution_name.label("institution"),
        lp.c.calling_ae,
        lp.c.sop_class_uid.label("sop_class"),
        lp.c.sop_instance_uid.label("SOPInstanceUID"),
        lp.c.series_instance_uid.label("SeriesInstanceUID"),
        lp.c.study_instance_uid.label("StudyInstanceUID"),
        lp.c.sop_class_uid.label("SOPClassUID"),
    ).where(lp.c.instance_id.in_(ids))


def _context(session: Session, series: set[str], studies: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``series_summary`` rows of ``series`` and the ``study_summary`` verdict of ``studies``.

    Computed for these series only. Joined to the instances, the views were computed over the
    whole archive for every chunk: 5 to 10 s per 500 instances on a million, SQLite and
    PostgreSQL alike, so `sorter rules apply` would have run for hours and every batch of a
    scan, watch or listen with rules paid that time. A study's verdict needs all its series.
    """
    i, ss = instances.c, views.series_summary
    wanted = set(series)
    for part in query_groups(sorted(studies)):
        of_studies = sa.select(i.series_instance_uid).where(
            i.study_instance_uid.in_(list(part)), i.series_instance_uid.is_not(None)
        )
        wanted.update(session.execute(of_studies.distinct()).scalars())
    rows: dict[str, Any] = {}
    for part in query_groups(sorted(wanted)):
        query = sa.select(ss.c.series_instance_uid, ss.c.study_instance_uid, ss.c.verdict, ss.c.label)
        for row in session.execute(query.where(ss.c.series_instance_uid.in_(list(part)))):
            rows[row.series_instance_uid] = row
    verdicts: dict[str, list[str]] = defaultdict(list)
    for row in rows.values():
        if row.study_instance_uid in studies:
            verdicts[row.study_instance_uid].append(row.verdict)
    return rows, {study: views.study_verdict(v) for study, v in verdicts.items()}


def facts_for(
    session: Session, ids: Sequence[int], rules: RuleSet | None = None
) -> dict[int, dict[str, Any]]:
    """What rules may match on and name, per classified instance id: the instance's row of
    ``latest_predictions``, its series' verdict and label, and its study's verdict; with
    ``rules``, only for the instances whose row :func:`could_match` one of them."""
    query = _facts_query(ids)
    if rules is not None and _materializes(session) and (narrowed := _narrowed(query, rules)) is not None:
        query = narrowed
    items = [dict(row) for row in session.execute(query).mappings()]
    if not items:
        return {}
    series, studies = _context(
        session,
        {item["SeriesInstanceUID"] for item in items if item["SeriesInstanceUID"] is not None},
        {item["StudyInstanceUID"] for item in items if item["StudyInstanceUID"] is not None},
    )
    facts: dict[int, dict[str, Any]] = {}
    for item in items:
        summary = series.get(item["SeriesInstanceUID"])
        item["series_verdict"] = None if summary is None else summary.verdict
        item["series_label"] = None if summary is None else summary.label
        item["study_verdict"] = studies.get(item["StudyInstanceUID"])
        item["path"] = decode_path(item["path"])
        facts[int(item["instance_id"])] = item
    return facts


def why_not(rule: Rule, facts: dict[str, Any]) -> str | None:
    """``None`` when ``rule`` matches, else the first condition that does not hold, in words."""
    for key, wanted in rule.match.items():
        if key in RANGE_FIELDS:
            confidence = facts.get("confidence")
            low = key == "min_confidence"
            if confidence is None or (confidence < wanted if low else confidence > wanted):
                shown = "none" if confidence is None else f"{confidence:.3f}"
                return f"confidence is {shown}, {key} is {wanted}"
            continue
        value = facts.get(_FACT_OF.get(key, key))
        if key in PATTERN_FIELDS:
            ok = value is not None and any(fnmatchcase(str(value), pattern) for pattern in wanted)
        else:
            ok = value is not None and str(value) in wanted
        if not ok:
            shown = "none" if value is None else repr(str(value))
            return f"{key} is {shown}, the rule wants {' or '.join(wanted)}"
    return None


#: Conditions the database tests on an instance's own row of ``latest_predictions``, as
#: :func:`why_not` does: the value is one of the wanted ones (NULL never is).
_ROW_COLUMNS = {"label": "label", "header": "header_label", "verdict": "verdict"}


def could_match(rules: RuleSet, row: sa.FromClause) -> sa.ColumnElement[bool] | None:
    """What an instance's ``row`` (``latest_predictions`` or a select of its columns) must hold
    for any rule to match it: some rule's conditions on the row itself (label, header, verdict,
    confidence range), or ``None`` when a rule has none of those and any instance may match.

    Facts were fetched for every classified instance: 1 000 000 of them on PostgreSQL took
    82 s for a rule that matched 36. This only narrows what :func:`why_not` then decides on
    (patterns and series and study verdicts are left to it), so it must never be stricter.
    """
    alternatives = []
    for rule in rules.rules:
        tests = []
        for key, wanted in rule.match.items():
            if key in _ROW_COLUMNS:
                tests.append(row.c[_ROW_COLUMNS[key]].in_(list(wanted)))
            elif key == "min_confidence":
                tests.append(row.c.confidence >= wanted)
            elif key == "max_confidence":
                tests.append(row.c.confidence <= wanted)
        if not tests:
            return None
        alternatives.append(sa.and_(*tests))
    return sa.or_(*alternatives) if alternatives else sa.false()


def _materializes(session: Session) -> bool:
    """Whether the database takes ``WITH ... AS MATERIALIZED`` (SQLite 3.35, PostgreSQL 12); an
    older one gets every instance's facts, as before :func:`could_match`."""
    dialect = session.connection().dialect
    return (dialect.server_version_info or (0,)) >= ((3, 35) if dialect.name == "sqlite" else (12,))


def _narrowed(query: sa.Select[Any], rules: RuleSet) -> sa.Select[Any] | None:
    """``query``'s rows that :func:`could_match` ``rules``, or ``None`` when all could.

    The rows are selected first (a materialised CTE), then tested: given the conditions with
    the ids, SQLite walked its verdict index through every disagreeing prediction for each
    chunk of 500 ids, five times slower than fetching them all.
    """
    chunk = query.cte("chunk").prefix_with("MATERIALIZED")
    condition = could_match(rules, chunk)
    return None if condition is None else sa.select(chunk).where(condition)


def matching(rules: RuleSet, facts: dict[str, Any]) -> list[Rule]:
    """The rules that act on this instance: all that match, or the first (``mode = "first"``)."""
    hits = [rule for rule in rules.rules if why_not(rule, facts) is None]
    return hits[:1] if rules.mode == "first" else hits


def _classified() -> sa.ColumnElement[bool]:
    """The instances rules act on: classified, with a prediction to show."""
    i = instances.c
    return sa.and_(i.status == Status.DONE, i.prediction_id.is_not(None))


def classified_count(session: Session) -> int:
    """How many instances :func:`classified_ids` yields without paths."""
    return int(session.execute(sa.select(sa.func.count()).where(_classified())).scalar_one())


def classified_ids(session: Session, under: Iterable[str] = ()) -> Iterator[list[int]]:
    """Ids of classified instances (optionally under paths), in chunks, in id order."""
    i = instances.c
    query = sa.select(i.id).where(_classified())
    for part in query_groups(path_scope(under)):  # many PATHs: one query per group of them
        where = query.where(path_under(i.path, part)) if part else query
        last = 0
        while True:
            chunk = list(session.scalars(where.where(i.id > last).order_by(i.id).limit(_CHUNK)))
            if not chunk:
                break
            yield chunk
            last = chunk[-1]


def _record(session: Session, instance_id: int, rule: str, action: str, values: dict[str, Any]) -> None:
    table = rule_actions
    now = datetime.now(UTC)
    statement = insert_for(session, table).values(
        instance_id=instance_id, rule=rule, action=action, attempts=1, updated_at=now, **values
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["instance_id", "rule", "action"],
            set_={**values, "attempts": table.c.attempts + 1, "updated_at": now},
        )
    )


def apply_rules(
    sessions: sessionmaker[Session],
    rules: RuleSet,
    under: Iterable[str] = (),
    ids: Iterable[int] | None = None,
    retry_now: bool = False,
    deliver: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> RulesReport:
    """Act on every classified instance (under ``under``, or among ``ids``) that a rule matches
    and that rule has not already acted on: file now, queue forwards, then send the forwards that
    are due (unless ``deliver`` is false: a :class:`~sorter.rules.delivery.Deliverer` sends them).
    Failed actions are tried again (forwards after their backoff, unless ``retry_now``, which also
    gives dead-lettered forwards one more try). ``on_chunk`` hears how many instances each
    committed chunk checked (a progress bar)."""
    report = RulesReport()
    with sessions() as session:
        chunks: Iterable[list[int]]
        if ids is not None:
            wanted = sorted(set(ids))
            chunks = (
                _classified_among(session, wanted[i : i + _CHUNK]) for i in range(0, len(wanted), _CHUNK)
            )
        else:
            chunks = classified_ids(session, under)
        for chunk in chunks:
            _act_on(session, rules, chunk, report)
            session.commit()
            if on_chunk is not None:
                on_chunk(len(chunk))
        if deliver:
            _deliver(session, rules, report, retry_now)
    return report


def _classified_among(session: Session, ids: Sequence[int]) -> list[int]:
    """Those of ``ids`` that are classified (as :func:`classified_ids` yields them)."""
    i = instances.c
    return list(session.scalars(sa.select(i.id).where(i.id.in_(ids), _classified()).order_by(i.id)))


def _act_on(session: Session, rules: RuleSet, chunk: list[int], report: RulesReport) -> None:
    """Act on the classified instances ``chunk`` as ``rules`` say."""
    report.instances += len(chunk)
    facts = facts_for(session, chunk, rules)
    if not facts:
        return
    seen = {
        (row.instance_id, row.rule, row.action): row.status
        for row in session.execute(
            sa.select(RuleAction.instance_id, RuleAction.rule, RuleAction.action, RuleAction.status).where(
                RuleAction.instance_id.in_(list(facts))
            )
        )
    }
    for instance_id, item in facts.items():
        for rule in matching(rules, item):
            for action in rule.actions:
                status = seen.get((instance_id, rule.name, action.kind))
                if status == "done":
                    report.already[rule.name] += 1
                elif isinstance(action, ForwardAction | NotifyAction | OrthancAction):
                    if status is None:  # queued; _deliver sends it
                        _queue(session, instance_id, rule.name, action)
                else:
                    _file(session, instance_id, rule.name, action, item, report)


def _file(
    session: Session,
    instance_id: int,
    rule: str,
    action: FileAction,
    item: dict[str, Any],
    report: RulesReport,
) -> None:
    filed = file_instance(Path(item["path"]), action.target(item), action.how)
    status = "done" if filed.error is None else "failed"
    values = {"status": status, "target": str(filed.target), "error": filed.error, "detail": filed.detail}
    _record(session, instance_id, rule, action.kind, values)
    if filed.error is None:
        if action.how == "move":
            _moved(session, instance_id, item["path"], str(filed.target))
        report.done[rule] += 1
    else:
        report.failed[rule] += 1
        log.warning(
            "rule %s could not file instance %s (%s): %s",
            rule,
            item["SOPInstanceUID"],
            filed.error,
            filed.detail,
        )


def _moved(session: Session, instance_id: int, old: str, new: str) -> None:
    """The instance lives at ``new`` now: its path follows the file, and the ledger forgets the
    old one. With the old path kept, `sorter reclassify` turned every moved instance into
    ``failed`` (unreadable), `export` listed files that were gone and the review page had no
    thumbnails; spool retention would have looked for a file that left the spool."""
    # Both path columns store through FsPath, which escapes a path that is not UTF-8 itself.
    session.execute(sa.update(instances).where(instances.c.id == instance_id).values(path=new))
    session.execute(sa.delete(files).where(files.c.path == old))


def _queue(session: Session, instance_id: int, rule: str, action: ForwardAction | SeriesAction) -> None:
    statement = insert_for(session, rule_actions).values(
        instance_id=instance_id,
        rule=rule,
        action=action.kind,
        status="pending",
        target=action.to,
        attempts=0,
        updated_at=datetime.now(UTC),
    )
    session.execute(statement.on_conflict_do_nothing(index_elements=["instance_id", "rule", "action"]))


def _deliver(session: Session, rules: RuleSet, report: RulesReport, retry_now: bool) -> None:
    """Send every due forward of ``rules`` (one association per destination, in series order) and
    every due notification of a complete series."""
    for rule in rules.rules:
        for action in rule.actions:
            if isinstance(action, ForwardAction | NotifyAction | OrthancAction):
                deliver_action(session, rule.name, action, report, retry_now)


def deliver_action(
    session: Session,
    rule: str,
    action: ForwardAction | SeriesAction,
    report: RulesReport,
    retry_now: bool = False,
) -> bool:
    """Send what is due of one rule's forward or notify action (claimed first: see :func:`_claim`);
    whether the destination was down (:data:`DESTINATION_DOWN`: the rest waits for the next run)."""
    now = datetime.now(UTC)
    if isinstance(action, NotifyAction | OrthancAction):
        return _notify(session, rule, action, now, report, retry_now)
    last = 0  # an id cursor: each item is tried at most once per run
    while candidates := _candidates(session, rule, "forward", now, retry_now, last):
        last = candidates[-1][0]
        items = _claim(session, [row_id for row_id, _ in candidates], now, retry_now)
        results = send(action, items)
        down = bool(results) and all(sent.error in DESTINATION_DOWN for sent in results)
        for sent in results:
            _settle(session, rule, sent, report, quiet=down)
        session.commit()
        if down:
            _postpone(
                rule,
                "forward",
                results,
                _due_after(session, rule, "forward", now, retry_now, last),
                report,
            )
            return True
    return False


def _claimable(session: Session, now: datetime, retry_now: bool) -> sa.ColumnElement[bool]:
    """Rows a sender may take: queued or failed and due (dead ones too with ``retry_now``), or
    being sent by a sender whose lease ran out (it died)."""
    ra, at = rule_actions.c, db_time(session, now)
    waiting: sa.ColumnElement[bool] = ra.status.in_(
        ["pending", "failed", "dead"] if retry_now else ["pending", "failed"]
    )
    if not retry_now:
        waiting = sa.and_(waiting, sa.or_(ra.next_attempt_at.is_(None), ra.next_attempt_at <= at))
    return sa.or_(waiting, sa.and_(ra.status == "sending", ra.next_attempt_at <= at))


def _candidates(
    session: Session, rule: str, kind: str, now: datetime, retry_now: bool, after: int
) -> list[tuple[int, str | None]]:
    """Up to a chunk of ``(row id, series UID)`` of ``rule``'s ``kind`` actions that may be taken,
    after the row id ``after``, in id order."""
    ra, i = rule_actions.c, instances.c
    query = (
        sa.select(ra.id, i.series_instance_uid)
        .join(instances, i.id == ra.instance_id)
        .where(ra.action == kind, ra.rule == rule, ra.id > after, _claimable(session, now, retry_now))
        .order_by(ra.id)
        .limit(_CHUNK)
    )
    return [(int(row_id), series) for row_id, series in session.execute(query)]


def _due_after(session: Session, rule: str, kind: str, now: datetime, retry_now: bool, after: int) -> int:
    """How many of ``rule``'s ``kind`` actions after the row id ``after`` may be taken now."""
    ra = rule_actions.c
    query = sa.select(sa.func.count()).where(
        ra.action == kind, ra.rule == rule, ra.id > after, _claimable(session, now, retry_now)
    )
    return int(session.execute(query).scalar_one())


#: Errors that say the destination itself is down or refuses us, whatever the instance: after one
#: such try, the rest of a run's items would each wait for the same timeout (30 s per association
#: to a host that does not answer: 1 784 queued forwards took 2 minutes and logged 1 784
#: warnings), so they are left, untried and not counted as attempts, for the next run.
DESTINATION_DOWN = frozenset(
    {
        "destination_unreachable",
        "association_rejected",
        "tls_config",
        "webhook_unreachable",
        "orthanc_unreachable",
    }
)


def _postpone(rule: str, kind: str, results: Sequence[Sent], waiting: int, report: RulesReport) -> None:
    """One warning for a try that found the destination down, and what now waits for the next run."""
    first = results[0]
    report.waiting[rule] += waiting
    log.warning(
        "rule %s could not %s %d instances (%s, try %d): %s; %d more wait for the next run",
        rule,
        "forward" if kind == "forward" else "notify about",
        len(results),
        first.error,
        first.item.attempts + 1,
        first.detail,
        waiting,
    )


def _claim(session: Session, ids: Sequence[int], now: datetime, retry_now: bool) -> list[Item]:
    """Claim the rows ``ids`` that may still be taken for this sender, commit, and return them.

    Two senders (worker processes; a service and `sorter rules apply` from cron) never take the
    same row, so nothing is sent twice: the WHERE is evaluated again under the row lock
    (PostgreSQL) or the database lock (SQLite). A claim is a lease: the rows of a sender that
    dies are taken again once ``LEASE_S`` has passed.
    """
    ra, i = rule_actions.c, instances.c
    token = uuid.uuid4().hex
    session.execute(
        sa.update(rule_actions)
        .where(ra.id.in_(ids), _claimable(session, now, retry_now))
        .values(status="sending", claim=token, next_attempt_at=now + timedelta(seconds=LEASE_S))
    )
    session.commit()
    query = (
        sa.select(
            ra.id,
            ra.attempts,
            i.path,
            i.sop_instance_uid,
            i.sop_class_uid,
            i.transfer_syntax_uid,
            i.series_instance_uid,
        )
        .join(instances, i.id == ra.instance_id)
        .where(ra.claim == token, ra.status == "sending")
        .order_by(ra.id)
    )
    return [Item(*row) for row in session.execute(query)]


def _notify(
    session: Session, rule: str, action: SeriesAction, now: datetime, report: RulesReport, retry_now: bool
) -> bool:
    """Deliver each complete series with due queued instances once, and settle all of them;
    whether the address was down (the rest waits for the next run)."""
    by_series: dict[str | None, list[int]] = defaultdict(list)
    last = 0
    while candidates := _candidates(session, rule, action.kind, now, retry_now, last):
        for row_id, series in candidates:
            by_series[series].append(row_id)
        last = candidates[-1][0]
    pending = list(by_series.items())
    for n, (series, ids) in enumerate(pending):
        summary = _complete_series(session, series, now - timedelta(seconds=action.quiet_s))
        if summary is None:
            continue  # still arriving, or waiting to be classified: the next run looks again
        items = _claim(session, ids, now, retry_now)
        if not items:
            continue  # another sender has them
        error, detail = action.deliver(rule, summary)
        results = [Sent(item, error, detail) for item in items]
        for sent in results:  # one notification for the series: one warning for it, not one per instance
            _settle(session, rule, sent, report, quiet=True)
        session.commit()
        if error in DESTINATION_DOWN:
            _postpone(rule, action.kind, results, sum(len(rest) for _, rest in pending[n + 1 :]), report)
            return True
        if error is not None:
            log.warning(
                "rule %s could not notify about series %s (%d instances; %s, try %d): %s",
                rule,
                series,
                len(items),
                error,
                items[0].attempts + 1,
                detail,
            )
    return False


def _complete_series(session: Session, series: str | None, quiet_since: datetime) -> dict[str, Any] | None:
    """The series' summary row if it is complete: nothing registered after ``quiet_since`` and
    nothing pending; else ``None``."""
    if series is None:
        return None
    i = instances.c
    newest, pending = session.execute(
        sa.select(
            sa.func.max(i.registered_at),
            sa.func.count().filter(i.status == Status.PENDING),
        ).where(i.series_instance_uid == series)
    ).one()
    if pending or newest is None or as_utc(newest) > quiet_since:
        return None
    ss = views.series_summary
    row = session.execute(sa.select(ss).where(ss.c.series_instance_uid == series).limit(1)).mappings().first()
    return dict(row) if row is not None else None


def _settle(session: Session, rule: str, sent: Sent, report: RulesReport, quiet: bool = False) -> None:
    """Record what became of one claimed item, at the time it did (the ledger's ``updated_at``);
    a failure is logged unless ``quiet`` (the caller logs it once for many items)."""
    now = datetime.now(UTC)
    attempts = sent.item.attempts + 1
    if sent.error is None:
        values: dict[str, Any] = {"status": "done", "error": None, "detail": None, "next_attempt_at": None}
        report.done[rule] += 1
    else:
        dead = attempts >= MAX_ATTEMPTS
        values = {
            "status": "dead" if dead else "failed",
            "error": sent.error,
            "detail": sent.detail,
            "next_attempt_at": None if dead else next_try(attempts, now),
        }
        (report.dead if dead else report.failed)[rule] += 1
        if not quiet:
            log.warning(
                "rule %s could not forward instance %s (%s, try %d): %s",
                rule,
                sent.item.sop_instance_uid,
                sent.error,
                attempts,
                sent.detail,
            )
    session.execute(
        sa.update(rule_actions)
        .where(rule_actions.c.id == sent.item.row_id)
        .values(attempts=attempts, updated_at=now, claim=None, **values)
    )


class RulesHook:
    """``settings.rules`` after each committed batch: files at once, queues forwards and
    notifications, and wakes the :class:`~sorter.rules.delivery.Deliverer` whose threads send
    them (one per destination), so that classification never waits for a destination and
    retries go out while nothing arrives. With ``database_url`` (listen, watch, scan) the
    senders run in a process of their own (:class:`~sorter.rules.delivery.DeliveryProcess`);
    a Celery pool process keeps them as threads. ``close`` stops them."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        rules: RuleSet,
        on_report: Callable[[RulesReport], None] | None,
        database_url: str | None = None,
    ) -> None:
        from sorter.rules.delivery import Deliverer, DeliveryProcess

        self.sessions, self.rules, self.on_report = sessions, rules, on_report
        self.deliverer: Deliverer | DeliveryProcess
        if database_url is not None and any(
            isinstance(action, ForwardAction | NotifyAction | OrthancAction)
            for rule in rules.rules
            for action in rule.actions
        ):
            self.deliverer = DeliveryProcess(database_url, rules.path, on_report=self._reported)
        else:
            self.deliverer = Deliverer(sessions, rules, on_report=self._reported)
        self.deliverer.start()

    def _reported(self, report: RulesReport) -> None:
        if sum(report.failed.values()) + sum(report.dead.values()):
            log.warning("%s", report.line())
        if self.on_report is not None:
            self.on_report(report)

    def __call__(self, outcomes: list[Outcome]) -> None:
        ids = [o.instance_id for o in outcomes if o.status == Status.DONE]
        if not ids:
            return
        try:
            report = apply_rules(self.sessions, self.rules, ids=ids, deliver=False)
        except Exception:  # the batch is committed; the next batch or `rules apply` tries again
            log.exception("rules %s could not be applied to %d instances", self.rules.path, len(ids))
            return
        self._reported(report)
        self.deliverer.wake()

    def close(self) -> None:
        """Stop the sender threads (what they hold is released by its lease, or sent next time)."""
        self.deliverer.stop()


def batch_hook(
    settings: Settings,
    sessions: sessionmaker[Session],
    on_report: Callable[[RulesReport], None] | None = None,
    own_process: bool = False,
) -> RulesHook | None:
    """A :class:`RulesHook` for ``settings.rules``, or ``None``; ``on_report`` sees what each
    application and each delivery did (metrics); ``own_process``: the senders run in a process
    of their own (see :class:`RulesHook`).

    Raises :class:`~sorter.rules.spec.RulesError` at once for a bad file, so that a service
    refuses to start rather than run without its rules. Series and study conditions see what has
    arrived so far; ``sorter rules apply`` (from cron) catches up on series that matched later.
    """
    if settings.rules is None:
        return None
    rules = load_rules(settings.rules)
    return RulesHook(sessions, rules, on_report, settings.database_url if own_process else None)
