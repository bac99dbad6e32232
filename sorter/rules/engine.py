"""Apply a rule set to classified instances: match each against what the database says, act,
and record every action in ``rule_actions`` so that a re-run or a retry never acts twice.

Facts come from the views users query (``latest_predictions``, ``series_summary``,
``study_summary``), so a rule sees exactly what ``sorter find`` and the SQL recipes show: the
active model's prediction, and the series and study verdicts so far.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from sorter.db import views
from sorter.db.models import Base, RuleAction
from sorter.db.queries import insert_for, instances, path_under
from sorter.domain import Status
from sorter.fspath import decode_path
from sorter.rules.filing import file_instance
from sorter.rules.spec import PATTERN_FIELDS, RANGE_FIELDS, Rule, RuleSet

log = logging.getLogger(__name__)

_CHUNK = 500
rule_actions = Base.metadata.tables["rule_actions"]

#: Which fact each condition reads.
_FACT_OF = {"header": "header_label"}


@dataclass
class RulesReport:
    """What one application did, per rule: acted, already done before, failed (by reason)."""

    done: Counter[str] = field(default_factory=Counter)
    already: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    instances: int = 0

    def line(self) -> str:
        """One line for the command's summary."""
        parts = [f"{self.instances} classified instances checked"]
        for rule in sorted(set(self.done) | set(self.already) | set(self.failed)):
            bits = [f"{self.done[rule]} done"]
            if self.already[rule]:
                bits.append(f"{self.already[rule]} already done")
            if self.failed[rule]:
                bits.append(f"{self.failed[rule]} failed")
            parts.append(f"{rule}: {', '.join(bits)}")
        return "rules: " + "; ".join(parts)


def _facts_query(ids: Sequence[int]) -> sa.Select[Any]:
    lp, ss, st = views.latest_predictions, views.series_summary, views.study_summary
    return (
        sa.select(
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
            ss.c.verdict.label("series_verdict"),
            ss.c.label.label("series_label"),
            st.c.verdict.label("study_verdict"),
        )
        .select_from(lp)
        .outerjoin(ss, ss.c.series_instance_uid == lp.c.series_instance_uid)
        .outerjoin(st, st.c.study_instance_uid == lp.c.study_instance_uid)
        .where(lp.c.instance_id.in_(ids))
    )


def facts_for(session: Session, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """What rules may match on and name, per classified instance id."""
    facts: dict[int, dict[str, Any]] = {}
    for row in session.execute(_facts_query(ids)).mappings():
        item = dict(row)
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


def matching(rules: RuleSet, facts: dict[str, Any]) -> list[Rule]:
    """The rules that act on this instance: all that match, or the first (``mode = "first"``)."""
    hits = [rule for rule in rules.rules if why_not(rule, facts) is None]
    return hits[:1] if rules.mode == "first" else hits


def classified_ids(session: Session, under: Iterable[str] = ()) -> Iterator[list[int]]:
    """Ids of classified instances (optionally under paths), in chunks, in id order."""
    i = instances.c
    query = sa.select(i.id).where(i.status == Status.DONE, i.prediction_id.is_not(None))
    prefixes = [str(Path(p).resolve()) for p in under]
    if prefixes:
        query = query.where(path_under(i.path, prefixes))
    last = 0
    while True:
        chunk = list(session.scalars(query.where(i.id > last).order_by(i.id).limit(_CHUNK)))
        if not chunk:
            return
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
) -> RulesReport:
    """Act on every classified instance (under ``under``, or among ``ids``) that a rule matches
    and that rule has not already acted on; failed actions are tried again."""
    report = RulesReport()
    with sessions() as session:
        chunks: Iterable[list[int]]
        if ids is not None:
            wanted = sorted(set(ids))
            chunks = (wanted[i : i + _CHUNK] for i in range(0, len(wanted), _CHUNK))
        else:
            chunks = classified_ids(session, under)
        for chunk in chunks:
            facts = facts_for(session, chunk)
            done = {
                (row.instance_id, row.rule, row.action)
                for row in session.execute(
                    sa.select(RuleAction.instance_id, RuleAction.rule, RuleAction.action).where(
                        RuleAction.instance_id.in_(chunk), RuleAction.status == "done"
                    )
                )
            }
            for instance_id, item in facts.items():
                report.instances += 1
                for rule in matching(rules, item):
                    for action in rule.actions:
                        if (instance_id, rule.name, action.kind) in done:
                            report.already[rule.name] += 1
                            continue
                        filed = file_instance(Path(item["path"]), action.target(item), action.how)
                        status = "done" if filed.error is None else "failed"
                        _record(
                            session,
                            instance_id,
                            rule.name,
                            action.kind,
                            {
                                "status": status,
                                "target": str(filed.target),
                                "error": filed.error,
                                "detail": filed.detail,
                            },
                        )
                        if filed.error is None:
                            report.done[rule.name] += 1
                        else:
                            report.failed[rule.name] += 1
                            log.warning(
                                "rule %s could not file instance %s (%s): %s",
                                rule.name,
                                item["SOPInstanceUID"],
                                filed.error,
                                filed.detail,
                            )
            session.commit()
    return report
