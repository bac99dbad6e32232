"""Export classified instances as a training manifest, optionally balanced.

The manifest is the one ``sorter-train`` reads (ARCHITECTURE §6): columns
``path,label,source,group,format`` plus ``header_modality``,
``sop_instance_uid`` and ``confidence``; ``path`` relative to the manifest's
folder; ``group`` a hash of the Study Instance UID so that a study never
straddles a train/validation split.

Balancing happens in SQL with window functions, so millions of rows never
reach Python: within a label, instances are dealt round-robin across series
(and across sources with ``by_source``), and the first ``per_label`` are kept.
One series or one hospital therefore cannot fill a label on its own.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db import views
from sorter.domain import Verdict
from sorter.fspath import decode_path, is_utf8
from sorter.manifests import RelativePaths, group_key, write_csv_atomic

LABEL_SOURCES = ("agree", "predicted", "header", "reviewed")
COLUMNS = ("path", "label", "source", "group", "format", "header_modality", "sop_instance_uid", "confidence")


def _candidates(label_from: str, min_confidence: float) -> sa.Subquery:
    """Rows eligible for export, with the label they will carry."""
    lp = views.latest_predictions
    label = {"header": lp.c.header_label, "reviewed": lp.c.review_label}.get(label_from, lp.c.label)
    stmt = sa.select(
        label.label("export_label"),
        sa.func.coalesce(lp.c.source, "unknown").label("export_source"),
        sa.func.coalesce(lp.c.series_instance_uid, lp.c.path).label("series_key"),
        lp.c.study_instance_uid,
        lp.c.sop_instance_uid,
        lp.c.header_modality,
        lp.c.confidence,
        lp.c.path,
        lp.c.instance_id,
    ).where(label.is_not(None), lp.c.confidence >= min_confidence)
    if label_from == "agree":
        stmt = stmt.where(lp.c.verdict == Verdict.AGREE.value)
    return stmt.subquery("candidates")


def _balanced(candidates: sa.Subquery, per_label: int, by_source: bool) -> sa.Select[Any]:
    c = candidates.c
    in_series = sa.func.row_number().over(
        partition_by=(c.export_label, c.export_source, c.series_key), order_by=(c.sop_instance_uid,)
    )
    ranked1 = sa.select(candidates, in_series.label("r_series")).subquery("ranked1")
    r1 = ranked1.c
    if by_source:
        # Deal series round-robin inside each source, then sources round-robin inside the label.
        in_source = sa.func.row_number().over(
            partition_by=(r1.export_label, r1.export_source), order_by=(r1.r_series, r1.series_key)
        )
        ranked2 = sa.select(ranked1, in_source.label("r_source")).subquery("ranked2")
        r2 = ranked2.c
        final = sa.func.row_number().over(
            partition_by=(r2.export_label,), order_by=(r2.r_source, r2.export_source)
        )
        ranked = sa.select(ranked2, final.label("r_label")).subquery("ranked")
    else:
        final = sa.func.row_number().over(
            partition_by=(r1.export_label,), order_by=(r1.r_series, r1.series_key)
        )
        ranked = sa.select(ranked1, final.label("r_label")).subquery("ranked")
    return (
        sa.select(ranked)
        .where(ranked.c.r_label <= per_label)
        .order_by(ranked.c.export_label, ranked.c.r_label)
    )


def selection(
    session: Session,
    *,
    label_from: str = "agree",
    per_label: int | None = None,
    by_source: bool = False,
    min_confidence: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """The instances to export, streamed.

    Parameters
    ----------
    session
        The caller's session.
    label_from
        ``agree``: only instances whose header and pixels agree (the label both
        give); ``predicted``: the model's label; ``header``: the header's label;
        ``reviewed``: only instances a reviewer decided on (``sorter serve``), with the
        label the decision stands for (confirmed: the reviewer's; rejected: the header's).
    per_label
        Keep at most this many per label (balanced); ``None`` keeps all.
    by_source
        Spread each label's quota evenly over sources.
    min_confidence
        Lowest prediction confidence to export.
    """
    if label_from not in LABEL_SOURCES:
        raise ValueError(f"label_from must be one of {LABEL_SOURCES}, not {label_from!r}")
    candidates = _candidates(label_from, min_confidence)
    if per_label is None:
        stmt = sa.select(candidates).order_by(candidates.c.export_label, candidates.c.instance_id)
    else:
        stmt = _balanced(candidates, per_label, by_source)
    for row in session.execute(stmt.execution_options(yield_per=1000)):
        yield dict(row._mapping)


@dataclass
class Written:
    """What :func:`write_manifest` wrote: rows by (label, source), and rows it had to leave out."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Files whose names are not valid UTF-8: a manifest is UTF-8 text and cannot name them.
    not_utf8: int = 0
    #: Files that are gone (`watch --after delete`, spool retention): training could not read them.
    gone: int = 0


def write_manifest(rows: Iterator[dict[str, Any]], out: Path, stream: TextIO | None = None) -> Written:
    """Write ``rows`` as a manifest at ``out`` atomically, or to ``stream`` with paths relative to
    ``out``'s folder (``Path("-")``: the working directory); return what was written."""
    written = Written()
    relative = RelativePaths(out)

    def lines() -> Iterator[list[str]]:
        for row in rows:
            path = decode_path(row["path"])
            if not is_utf8(path):
                written.not_utf8 += 1
                continue
            if not os.path.isfile(path):  # one stat per row: cheap beside what training reads
                written.gone += 1
                continue
            label, source = str(row["export_label"]), str(row["export_source"])
            confidence = "" if row["confidence"] is None else f"{row['confidence']:.4f}"
            written.counts[(label, source)] += 1
            yield [
                relative(path),
                label,
                source,
                group_key(row["study_instance_uid"], path),
                "dcm",
                row["header_modality"] or "",
                row["sop_instance_uid"],
                confidence,
            ]

    if stream is None:
        write_csv_atomic(out, COLUMNS, lines())
    else:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        writer.writerows(lines())
    return written
