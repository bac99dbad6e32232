"""Read-only queries behind ``sorter report``, ``discrepancies``, ``find`` and ``failures``.

Each function takes the caller's session and returns plain dicts, so the
commands can print them as a table, CSV or JSON. Long listings stream
(``yield_per``) instead of loading the archive into memory.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db import views
from sorter.db.models import PROBABILITY_COLUMNS, Base
from sorter.db.queries import instances, path_under, predictions
from sorter.domain import Label, Status, Verdict
from sorter.nuclides import EMISSION
from sorter.review.store import review_counts
from sorter.taxonomy import class_contradiction

LEVELS = ("instance", "series", "study")
adaptations = Base.metadata.tables["adaptations"]
label_issue_rows = Base.metadata.tables["label_issues"]
_STREAM = {"yield_per": 1000}

INSTANCE_FIELDS = (
    "sop_instance_uid",
    "series_instance_uid",
    "study_instance_uid",
    "source",
    "station_name",
    "header_modality",
    "header_label",
    "label",
    "confidence",
    "second_label",
    "second_confidence",
    "verdict",
    "path",
)
SERIES_FIELDS = (
    "series_instance_uid",
    "study_instance_uid",
    "source",
    "station_name",
    "header_modality",
    "header_label",
    "label",
    "confidence",
    "n_instances",
    "n_disagree",
    "verdict",
)
FAILURE_FIELDS = ("status", "reason", "detail", "source", "sop_instance_uid", "updated_at", "path")
STUDY_FIELDS = (
    "study_instance_uid",
    "source",
    "header_labels",
    "labels",
    "n_series",
    "n_series_disagree",
    "n_instances",
    "n_instances_disagree",
    "verdict",
)


def _stream(session: Session, stmt: sa.Select[Any], limit: int | None) -> Iterator[dict[str, Any]]:
    """Rows of ``stmt`` as dicts, at most ``limit``, fetched in chunks (an archive's worth never
    sits in memory)."""
    if limit:
        stmt = stmt.limit(limit)
    for row in session.execute(stmt.execution_options(**_STREAM)):
        yield dict(row._mapping)


def unknown_sources(session: Session, sources: Sequence[str]) -> list[str]:
    """Those of ``sources`` that no instance has: a filter on them can only match nothing."""
    if not sources:
        return []
    stmt = sa.select(instances.c.source).where(instances.c.source.in_(list(sources))).distinct()
    known = set(session.execute(stmt).scalars())
    return [source for source in dict.fromkeys(sources) if source not in known]


def _rows(session: Session, stmt: sa.Select[Any]) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in session.execute(stmt)]


#: The columns discrepancy rates are broken down by, with their section names in ``report``.
RATE_SECTIONS = {"source": "by_source", "station_name": "by_station", "calling_ae": "by_calling_ae"}


class Group(NamedTuple):
    """The shown predictions of one (column value, header label, predicted label)."""

    key: Any
    header: Any
    label: Any
    n: int
    disagree: int
    uncertain: int
    agree: int
    #: Sums over the predictions that carry a header test (NULL probabilities and thresholds
    #: count nowhere): the header label's probability, the mean rule's evidence (the same, but
    #: for a PT or NM header that of emission imaging, PT + NM: :func:`contradicts`), its
    #: ``disagree_at`` and ``agree_at``, and how many.
    p_header: float
    p_evidence: float
    disagree_at: float
    agree_at: float
    tested: int


Groups = list[Group]


def _groups(session: Session) -> dict[str, Groups]:
    """:class:`Group` rows over the shown predictions for each column of :data:`RATE_SECTIONS`,
    ordered by the column's value (empty last), from one scan: it serves both the rates by each
    column and its contradictions. A scan per column took 4 s each on a million instances."""
    lp = views.latest_predictions
    columns = [lp.c[by] for by in RATE_SECTIONS]

    def count(verdict: Verdict) -> sa.ColumnElement[Any]:
        return sa.func.sum(sa.case((lp.c.verdict == verdict.value, 1), else_=0))

    p_header = sa.case(
        *(
            (lp.c.header_label == label.value, lp.c[column_name])
            for label, column_name in PROBABILITY_COLUMNS.items()
        ),
        else_=None,
    )
    p_evidence = sa.case(
        *(
            (
                lp.c.header_label == label.value,
                sum(
                    sa.func.coalesce(lp.c[PROBABILITY_COLUMNS[e]], 0.0)
                    for e in sorted(evidence_labels(label))
                ),
            )
            for label in PROBABILITY_COLUMNS
        ),
        else_=None,
    )
    tested = sa.and_(p_header.is_not(None), lp.c.disagree_at.is_not(None))
    stmt = sa.select(
        *columns,
        lp.c.header_label,
        lp.c.label,
        sa.func.count(),
        count(Verdict.DISAGREE),
        count(Verdict.UNCERTAIN),
        count(Verdict.AGREE),
        sa.func.sum(sa.case((tested, p_header), else_=0.0)),
        sa.func.sum(sa.case((tested, p_evidence), else_=0.0)),
        sa.func.sum(sa.case((tested, lp.c.disagree_at), else_=0.0)),
        sa.func.sum(sa.case((tested, lp.c.agree_at), else_=0.0)),
        sa.func.sum(sa.case((tested, 1), else_=0)),
    ).group_by(*columns, lp.c.header_label, lp.c.label)
    sums: dict[str, dict[tuple[Any, Any, Any], list[float]]] = {by: {} for by in RATE_SECTIONS}
    for row in session.execute(stmt):
        keys, (header, label, *values) = row[: len(columns)], row[len(columns) :]
        for by, key in zip(RATE_SECTIONS, keys, strict=True):
            total = sums[by].setdefault((key, header, label), [0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0])
            for i, value in enumerate(values):
                total[i] += value or 0

    def order(item: tuple[tuple[Any, Any, Any], list[float]]) -> tuple[Any, ...]:
        return tuple(part for value in item[0] for part in (value is None, "" if value is None else value))

    return {
        by: [
            Group(
                k, h, lab, int(n), int(d), int(u), int(a), float(sp), float(se), float(sd), float(sa_), int(t)
            )
            for (k, h, lab), (n, d, u, a, sp, se, sd, sa_, t) in sorted(totals.items(), key=order)
        ]
        for by, totals in sums.items()
    }


def _rates(column: str, groups: Groups) -> list[dict[str, Any]]:
    """Instances, disagree and uncertain counts and rates per value of ``column``, most disagreeing
    first (ties in :func:`_groups`' order of the values)."""
    rows: dict[Any, dict[str, Any]] = {}
    for group in groups:
        row = rows.setdefault(group.key, {column: group.key, "classified": 0, "disagree": 0, "uncertain": 0})
        row["classified"] += group.n
        row["disagree"] += group.disagree
        row["uncertain"] += group.uncertain
    for row in rows.values():
        n = row["classified"]
        row["rate"] = round(row["disagree"] / n, 4) if n else 0.0
        row["uncertain_rate"] = round(row["uncertain"] / n, 4) if n else 0.0
    return sorted(rows.values(), key=lambda r: -r["disagree"])  # stable: keeps the value order


#: A source whose images with one header label the model refutes this often, over at least this
#: many instances, is reported as a source-level discrepancy ...
CONTRADICTION_RATE = 0.3
CONTRADICTION_MIN_INSTANCES = 10
#: ... as is one whose images give that label, on average, at most the probability this far
#: along the (geometric) way from the label's ``disagree_at``, where the model refutes it in a
#: single image, to its ``agree_at``, where it confirms it (:func:`mean_bound`).
CONTRADICTION_TOWARDS = 0.6
#: The series verdict applies the same mean rule, at the same bound, to a series of at least this
#: many images (migration 0013); a single image keeps its own verdict, whose ``disagree_at``
#: already spends the budget the operating point allows.
SERIES_MEAN_MIN_IMAGES = 2


def evidence_labels(header: Label) -> frozenset[Label]:
    """The labels whose probabilities, summed, are the mean rule's evidence for ``header``
    (:func:`contradicts`): PT and NM together under either, else the header label alone."""
    return EMISSION if header in EMISSION else frozenset({header})


def mean_bound(disagree_at: float, agree_at: float | None, towards: float = CONTRADICTION_TOWARDS) -> float:
    """The mean rule's bound on a source's mean probability of its header label:
    ``disagree_at^(1-towards) * agree_at^towards``; ``disagree_at`` itself without an
    ``agree_at`` above it.

    Anchored at both thresholds rather than at a multiple of ``disagree_at``: since every
    ``disagree_at`` is shrunk to hold its 1 % budget on unseen sources (0.20 for the bundled
    model; ``train.operating_point.choose_shrink``), a multiple of it shrinks with it, and the
    rule of 1.5 x ``disagree_at`` reported 0.37 of systematic errors where this one reports
    0.6-0.8 without accusing an honest source (``tests/bench/bench_station.py --grid``; README,
    Adaptation benchmark).
    """
    if agree_at is None or agree_at <= disagree_at or disagree_at <= 0:
        return disagree_at
    return float(disagree_at ** (1 - towards) * agree_at**towards)


def contradicts(
    n: int,
    n_disagree: int,
    mean_p_header: float | None,
    mean_disagree_at: float | None,
    min_instances: int = CONTRADICTION_MIN_INSTANCES,
    min_rate: float = CONTRADICTION_RATE,
    n_agree: int = 0,
    mean_agree_at: float | None = None,
    towards: float = CONTRADICTION_TOWARDS,
) -> bool:
    """Whether ``n`` instances with one header label, from one source, contradict that label.

    One image refuted is evidence about one image; a source whose images are refuted far more
    often than the ~1 % of right headers the operating point allows (``min_rate``), or whose
    images all find the header's label implausible without each falling under the per-image
    threshold (the mean rule, :func:`mean_bound`: labels such as NM and PT, whose single-image
    ``disagree_at`` is very low because the model often doubts right headers of theirs), is a
    systematic error. Both bounds were chosen on two leave-sources-out runs' predictions, with a
    margin to the honest sources nearest them (``tests/bench/bench_station.py``; README,
    Adaptation benchmark). The mean rule stays silent where most of the images (``n_agree``)
    confirm the header: a PT or NM header its radionuclide confirms is ``agree`` on slices whose
    own label's probability is low (:func:`sorter.compare.compare`), and the mean of that label
    alone would accuse it. Callers pass as ``mean_p_header`` the mean of the header's
    :func:`evidence_labels`, PT and NM together under a PT or NM header: the pixels seldom tell
    SPECT from PET slices (README, Where the errors are), so an honest SPECT station whose images
    look like PET would otherwise be accused on the pixels alone; the radionuclide and the SOP
    class refute such headers image by image.
    """
    if n < min_instances:
        return False
    if n_disagree / n >= min_rate:
        return True
    if mean_p_header is None or mean_disagree_at is None or 2 * n_agree > n:
        return False
    return mean_p_header <= mean_bound(mean_disagree_at, mean_agree_at, towards)


def _contradictions(by: str, groups: Groups, min_instances: int, min_rate: float) -> list[dict[str, Any]]:
    totals: dict[tuple[str, str], list[float]] = {}
    pixels: dict[tuple[str, str], Counter[str]] = {}
    for group in groups:
        if group.key is None or group.header is None:
            continue
        pair = (str(group.key), str(group.header))
        sums = totals.setdefault(pair, [0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0])
        sums[0] += group.n
        sums[1] += group.disagree
        sums[2] += group.agree
        sums[3] += group.p_header
        sums[4] += group.p_evidence
        sums[5] += group.disagree_at
        sums[6] += group.agree_at
        sums[7] += group.tested
        if group.label != group.header:
            pixels.setdefault(pair, Counter())[str(group.label)] += group.n
    rows = []
    for (name, header), (n, n_disagree, n_agree, p_sum, e_sum, d_sum, a_sum, tested) in totals.items():
        mean_p = p_sum / tested if tested else None
        mean_e = e_sum / tested if tested else None
        mean_d = d_sum / tested if tested else None
        mean_a = a_sum / tested if tested else None
        if not contradicts(
            int(n), int(n_disagree), mean_e, mean_d, min_instances, min_rate, int(n_agree), mean_a
        ):
            continue
        shown = pixels.get((name, header))
        rows.append(
            {
                "by": by,
                "name": name,
                "header_label": header,
                "pixels": shown.most_common(1)[0][0] if shown else header,
                "classified": int(n),
                "disagree": int(n_disagree),
                "rate": round(n_disagree / n, 4),
                "mean_p_header": _rounded(mean_p),
                # What the mean rule compared (PT + NM under PT and NM) and with what bound.
                "mean_evidence": _rounded(mean_e),
                "bound": None if mean_d is None else _rounded(mean_bound(mean_d, mean_a)),
            }
        )
    return rows


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _all_contradictions(
    groups: dict[str, Groups],
    min_instances: int = CONTRADICTION_MIN_INSTANCES,
    min_rate: float = CONTRADICTION_RATE,
) -> list[dict[str, Any]]:
    """:func:`source_contradictions` from :func:`_groups`, highest rate first."""
    rows = [row for by, rows in groups.items() for row in _contradictions(by, rows, min_instances, min_rate)]
    return sorted(rows, key=lambda r: (-r["rate"], r["by"], r["name"], r["header_label"]))


def source_contradictions(
    session: Session,
    min_instances: int = CONTRADICTION_MIN_INSTANCES,
    min_rate: float = CONTRADICTION_RATE,
) -> list[dict[str, Any]]:
    """Sources, stations and calling AEs whose header label the model contradicts (:func:`contradicts`).

    A station that writes every SPECT as PT is no sporadic error: many of its PT-headed images
    disagree, or all of them find PT implausible. Rows: ``by`` (source, station_name,
    calling_ae), ``name``, ``header_label``, ``pixels`` (the label its images show most often
    instead), ``classified``, ``disagree``, ``rate``, ``mean_p_header`` (the header label's
    mean probability), ``mean_evidence`` (the mean the rule compares: PT + NM under PT and NM)
    and ``bound`` (:func:`mean_bound` of the thresholds' means), for every (name, header label)
    with at least ``min_instances`` classified instances that :func:`contradicts` its label,
    highest rate first.
    """
    return _all_contradictions(_groups(session), min_instances, min_rate)


def _labels_and_verdicts(session: Session) -> dict[str, list[dict[str, Any]]]:
    """``labels`` (header label x predicted label), ``verdicts`` and ``class_contradictions``
    of :func:`report`, from one scan.

    Asked alone, the verdict count made SQLite walk the predictions by their verdict index and
    fetch each instance out of order: 10 s of a 31 s report on a million instances.
    """
    lp = views.latest_predictions
    keys = (lp.c.header_label, lp.c.label, lp.c.verdict, lp.c.header_modality, lp.c.sop_class_uid)
    stmt = sa.select(*keys, sa.func.count()).group_by(*keys).order_by(lp.c.header_label, lp.c.label)
    labels: dict[tuple[Any, Any], int] = {}  # in the database's order of the pairs
    verdicts: Counter[str] = Counter()
    classes: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for header, label, verdict, modality, sop_class, count in session.execute(stmt):
        labels[(header, label)] = labels.get((header, label), 0) + count
        verdicts[verdict] += count
        if class_contradiction(modality, sop_class):
            classes[(sop_class, modality)][verdict] += count
    return {
        "labels": [{"header_label": h, "label": lab, "n": n} for (h, lab), n in labels.items()],
        # Verdicts are a few lower-case ASCII names: Python orders them as every database does.
        "verdicts": [{"verdict": v, "n": verdicts[v]} for v in sorted(verdicts)],
        "class_contradictions": _class_contradictions(classes),
    }


def _class_contradictions(classes: dict[tuple[str, str], Counter[str]]) -> list[dict[str, Any]]:
    """Per (SOP class, Modality) that contradict each other, most instances first: where a router,
    an anonymiser or a hand edit rewrote the Modality (see :func:`sorter.compare.compare`)."""
    from pydicom.uid import UID  # the report's one use of pydicom: the class's name

    rows = []
    for (sop_class, modality), counts in classes.items():
        allows = class_contradiction(modality, sop_class) or frozenset()
        rows.append(
            {
                "sop_class": UID(sop_class.strip()).name,
                "sop_class_uid": sop_class,
                "header_modality": modality,
                "class_allows": " or ".join(sorted(label.value for label in allows)),
                "n": sum(counts.values()),
                **{v.value: counts[v.value] for v in (Verdict.DISAGREE, Verdict.UNCERTAIN, Verdict.AGREE)},
            }
        )
    return sorted(rows, key=lambda r: (-r["n"], r["sop_class"], r["header_modality"]))


def _series_and_studies(session: Session) -> dict[str, list[dict[str, Any]]]:
    """``series`` and ``studies`` (verdict counts) of :func:`report`, from one scan of
    ``series_summary``: the study verdicts follow ``study_summary``'s rule
    (:func:`~sorter.db.views.study_verdict`). Asked of both views, the database computed the
    series twice: 3 s each on a million instances."""
    ss = views.series_summary
    stmt = sa.select(ss.c.study_instance_uid, ss.c.verdict, sa.func.count()).group_by(
        ss.c.study_instance_uid, ss.c.verdict
    )
    series: Counter[str] = Counter()
    of_study: dict[str, set[str]] = defaultdict(set)
    for study, verdict, count in session.execute(stmt):
        series[verdict] += count
        if study is not None:  # as study_summary: a series without a study is in no study
            of_study[study].add(verdict)
    studies = Counter(views.study_verdict(verdicts) for verdicts in of_study.values())
    # Verdicts are a few lower-case ASCII names: Python orders them as every database does.
    return {
        "series": [{"verdict": v, "n": series[v]} for v in sorted(series)],
        "studies": [{"verdict": v, "n": studies[v]} for v in sorted(studies)],
    }


def report(session: Session) -> dict[str, list[dict[str, Any]]]:
    """The whole database in a few tables.

    Returns
    -------
    dict
        Sections, each a list of rows: ``status`` (instances by status),
        ``labels`` (header label x predicted label), ``verdicts``, ``class_contradictions``
        (instances whose SOP class rules out their Modality's label, by class and Modality, with
        their verdicts), discrepancy
        rates ``by_source``, ``by_station`` and ``by_calling_ae``, ``source_contradictions``
        (sources whose header label the model refutes at a high rate, see
        :func:`source_contradictions`), ``failures``
        (failed and skipped by reason), ``series`` and ``studies`` (verdict counts),
        ``reviews`` (current decisions by level) and ``review_precision`` (the model's
        precision on reviewed discrepancies, per predicted label; see
        :func:`sorter.review.store.review_counts`).
    """
    n = sa.func.count().label("n")
    groups = _groups(session)
    return {
        "status": _rows(
            session,
            sa.select(instances.c.status, n).group_by(instances.c.status).order_by(instances.c.status),
        ),
        **_labels_and_verdicts(session),
        **{RATE_SECTIONS[by]: _rates(by, groups[by]) for by in RATE_SECTIONS},
        "source_contradictions": _all_contradictions(groups),
        "failures": _rows(
            session,
            sa.select(instances.c.status, instances.c.error, n)
            .where(instances.c.status.in_([Status.FAILED, Status.SKIPPED]))
            .group_by(instances.c.status, instances.c.error)
            .order_by(instances.c.status, n.desc()),
        ),
        **_series_and_studies(session),
        **review_counts(session),
        **adaptation_sections(session),
    }


def _latest_adaptation() -> sa.ScalarSelect[Any]:
    return sa.select(sa.func.max(adaptations.c.id)).where(adaptations.c.status == "done").scalar_subquery()


def has_adaptation(session: Session) -> bool:
    """Whether a ``sorter adapt`` run has finished on this database."""
    return session.execute(sa.select(_latest_adaptation())).scalar() is not None


def adaptation_sections(session: Session, top: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The latest adaptation (``sorter adapt``): its summary; the generic and the adapted verdict
    side by side over the instances it scored, with the label issues among them; the series the
    archive contradicts most; and the series both models doubt most (``joint_score``, the review
    order). Empty lists before any adaptation."""
    a = adaptations.alias("a")
    latest = session.execute(sa.select(a).where(a.c.id == _latest_adaptation())).mappings().first()
    if latest is None:
        return {"adaptation": [], "adapted_verdicts": [], "label_issue_series": [], "joint_series": []}
    summary = latest["summary"] or {}
    li, g, o = label_issue_rows.alias("li"), predictions.alias("g"), predictions.alias("o")
    n = sa.func.count().label("n")
    side_by_side = (
        sa.select(
            li.c.given_label.label("header_label"),
            g.c.verdict.label("generic_verdict"),
            o.c.verdict.label("adapted_verdict"),
            n,
            sa.func.sum(sa.case((li.c.is_issue, 1), else_=0)).label("label_issues"),
        )
        .select_from(li)
        .join(o, sa.and_(o.c.instance_id == li.c.instance_id, o.c.model_id == latest["oof_model_id"]))
        .outerjoin(g, sa.and_(g.c.instance_id == li.c.instance_id, g.c.model_id == latest["base_model_id"]))
        .where(li.c.adaptation_id == latest["id"])
        .group_by(li.c.given_label, g.c.verdict, o.c.verdict)
        .order_by(li.c.given_label, g.c.verdict, o.c.verdict)
    )
    return {
        "adaptation": [
            {
                "id": latest["id"],
                "finished_at": latest["finished_at"],
                "sampled": summary.get("n"),
                "cross_fitted_accuracy": summary.get("accuracy"),
                "balanced_accuracy": summary.get("balanced_accuracy"),
                "label_issues": summary.get("label_issues"),
                "work_dir": latest["work_dir"],
            }
        ],
        "adapted_verdicts": _rows(session, side_by_side),
        "label_issue_series": list(label_issues(session, "series", top)),
        "joint_series": list(label_issues(session, "series", top, by="joint_score")),
    }


#: ``sorter discrepancies --by label-issue``: what each level lists from the adapted views.
LABEL_ISSUE_FIELDS = {
    "instance": (
        "sop_instance_uid",
        "series_instance_uid",
        "study_instance_uid",
        "source",
        "station_name",
        "header_label",
        "generic_label",
        "generic_verdict",
        "adapted_label",
        "adapted_verdict",
        "label_issue_score",
        "joint_score",
        "is_label_issue",
    ),
    "series": (
        "series_instance_uid",
        "study_instance_uid",
        "source",
        "station_name",
        "header_label",
        "n_instances",
        "n_scored",
        "n_label_issues",
        "label_issue_score",
        "joint_score",
        "generic_verdict",
        "adapted_verdict",
        "is_label_issue",
    ),
    "study": (
        "study_instance_uid",
        "source",
        "n_series",
        "n_series_label_issues",
        "n_series_generic_disagree",
        "n_series_adapted_disagree",
        "label_issue_score",
        "joint_score",
    ),
}
#: What ``label_issues`` can rank by: the adaptation's opinion alone, or both models' (migration 0015).
LABEL_ISSUE_ORDERS = ("label_issue_score", "joint_score")


def label_issues(
    session: Session, level: str = "series", limit: int | None = None, by: str = "label_issue_score"
) -> Iterator[dict[str, Any]]:
    """What the latest ``sorter adapt`` scored at ``level``, highest score first: by
    ``label_issue_score`` the headers the rest of the archive contradicts most, by ``joint_score``
    those the generic model and the adaptation doubt most together (the better review order on
    ``tests/bench/bench_adapt.py``: README, Adaptation benchmark)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    if by not in LABEL_ISSUE_ORDERS:
        raise ValueError(f"by must be one of {LABEL_ISSUE_ORDERS}, not {by!r}")
    view, key = {
        "instance": (views.adapted_instances, "instance_id"),
        "series": (views.adapted_series, "series_instance_uid"),
        "study": (views.adapted_studies, "study_instance_uid"),
    }[level]
    stmt = (
        sa.select(*(view.c[f] for f in LABEL_ISSUE_FIELDS[level]))
        .where(view.c[by].is_not(None))  # joint_score: also what only the adapted model judged
        .order_by(view.c[by].desc(), view.c[key])
    )
    yield from _stream(session, stmt, limit)


def discrepancies(
    session: Session,
    level: str = "instance",
    min_confidence: float = 0.0,
    limit: int | None = None,
    *,
    unreviewed: bool = False,
) -> Iterator[dict[str, Any]]:
    """Header-versus-pixels disagreements at ``level``, most confident first.

    Parameters
    ----------
    session
        The caller's session.
    level
        ``instance``, ``series`` or ``study``. A study is listed when one of its
        series disagrees with at least ``min_confidence``.
    min_confidence
        Lowest (instance or series mean) confidence to list.
    limit
        At most this many rows.
    unreviewed
        Only what no reviewer has decided on yet (``sorter serve``): instances and series
        without a current decision, studies with a disagreeing series without one.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    stmt: sa.Select[Any]
    if level == "instance":
        d = views.discrepancies
        stmt = (
            sa.select(*(d.c[f] for f in INSTANCE_FIELDS))
            .where(d.c.confidence >= min_confidence)
            .order_by(d.c.confidence.desc(), d.c.instance_id)
        )
        if unreviewed:
            stmt = stmt.where(d.c.review_decision.is_(None))
    elif level == "series":
        s = views.series_discrepancies
        stmt = (
            sa.select(*(s.c[f] for f in SERIES_FIELDS))
            .where(s.c.confidence >= min_confidence)
            .order_by(s.c.confidence.desc(), s.c.series_instance_uid)
        )
        if unreviewed:
            stmt = stmt.where(s.c.review_decision.is_(None))
    else:
        st, sd = views.study_summary, views.series_discrepancies
        flagged = sa.select(sd.c.study_instance_uid).where(sd.c.confidence >= min_confidence)
        if unreviewed:
            flagged = flagged.where(sd.c.review_decision.is_(None))
        stmt = (
            sa.select(*(st.c[f] for f in STUDY_FIELDS))
            .where(st.c.study_instance_uid.in_(flagged))
            .order_by(st.c.n_series_disagree.desc(), st.c.study_instance_uid)
        )
    yield from _stream(session, stmt, limit)


def find(
    session: Session,
    label: Label,
    *,
    header: Sequence[Label] = (),
    sources: Sequence[str] = (),
    min_confidence: float = 0.0,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Instances whose pixels show ``label`` (by the prediction the views show: the active model's).

    Parameters
    ----------
    session
        The caller's session.
    label
        What the pixels show.
    header
        Only instances whose header label is one of these.
    sources
        Only instances from these sources.
    min_confidence
        Lowest confidence to list.
    limit
        At most this many rows.
    """
    lp = views.latest_predictions
    stmt = sa.select(*(lp.c[f] for f in INSTANCE_FIELDS)).where(
        lp.c.label == label.value, lp.c.confidence >= min_confidence
    )
    if header:
        stmt = stmt.where(lp.c.header_label.in_([h.value for h in header]))
    if sources:
        stmt = stmt.where(lp.c.source.in_(list(sources)))
    stmt = stmt.order_by(lp.c.instance_id)
    yield from _stream(session, stmt, limit)


def failures(
    session: Session,
    *,
    reasons: Sequence[str] = (),
    statuses: Sequence[Status] = (Status.FAILED,),
    under: Sequence[str] = (),
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Instances that ``failed`` (or were ``skipped``): path, reason and detail, oldest first.

    Parameters
    ----------
    session
        The caller's session.
    reasons
        Only these reasons (``permission_denied``, ``decode_error`` ...).
    statuses
        ``failed`` by default; ``skipped`` lists what was set aside on purpose.
    under
        Only paths under these folder prefixes.
    limit
        At most this many rows.
    """
    i = instances.c
    stmt = sa.select(
        i.status, i.error.label("reason"), i.detail, i.source, i.sop_instance_uid, i.updated_at, i.path
    ).where(i.status.in_(list(statuses)))
    if reasons:
        stmt = stmt.where(i.error.in_(list(reasons)))
    if under:
        stmt = stmt.where(path_under(i.path, under))
    stmt = stmt.order_by(i.id)
    for record in _stream(session, stmt, limit):
        record["status"] = getattr(record["status"], "value", record["status"])
        yield record
