"""What ``sorter adapt`` reads from and writes to the results database."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.adaptation.sample import Candidate
from sorter.adaptation.scoring import Issues
from sorter.compare import compare, witnesses_of
from sorter.db.models import Base
from sorter.db.queries import instances, query_groups, upsert_predictions
from sorter.domain import NO_WITNESSES, Label, Outcome, Status, Witnesses
from sorter.model.classifier import top_two
from sorter.model.spec import ModelSpec
from sorter.pipeline import prediction_row, register_artefact

adaptations = Base.metadata.tables["adaptations"]
label_issues = Base.metadata.tables["label_issues"]
#: Rows per INSERT.
CHUNK = 5000


def source_key(
    institution: str | None, station: str | None, calling_ae: str | None, source: str | None
) -> str:
    """Where an instance came from, for balancing the sample: its institution, station and calling
    AE as far as the header and the association tell, else the scan's source folder."""
    parts = [p for p in (institution, station, calling_ae) if p]
    return " / ".join(parts) if parts else (source or "unknown")


def candidates(session: Session) -> tuple[list[Candidate], dict[int, str]]:
    """Every classified instance with a header label the taxonomy knows, and its file."""
    i = instances.c
    stmt = sa.select(
        i.id,
        i.header_label,
        i.institution_name,
        i.station_name,
        i.calling_ae,
        i.source,
        i.study_instance_uid,
        i.series_instance_uid,
        i.sop_instance_uid,
        i.path,
    ).where(i.status == Status.DONE, i.header_label.is_not(None))
    pool: list[Candidate] = []
    paths: dict[int, str] = {}
    for row in session.execute(stmt).yield_per(10_000):
        # A file without a Series Instance UID (a broken exporter) was its own series and study: the
        # slices of one UID-less series escaped the per-series cap and crossed folds, so a
        # neighbouring slice trained the model that judged it. Its folder stands in for the series
        # (an export writes one series per folder); a missing study is the series.
        series = row.series_instance_uid or f"folder:{posixpath.dirname(row.path or row.sop_instance_uid)}"
        pool.append(
            Candidate(
                int(row.id),
                Label(row.header_label).value,
                source_key(row.institution_name, row.station_name, row.calling_ae, row.source),
                row.study_instance_uid or series,
                series,
            )
        )
        paths[int(row.id)] = row.path
    return pool, paths


def header_witnesses(session: Session, ids: Sequence[int]) -> dict[int, Witnesses]:
    """What the headers of ``ids`` say besides their Modality, as a scan reads them
    (:func:`sorter.compare.witnesses_of`): only the instances where it says something."""
    out = {}
    columns = (instances.c.header_modality, instances.c.sop_class_uid, instances.c.header_label)
    for group in query_groups(ids) if ids else []:
        stmt = sa.select(instances.c.id, *columns, instances.c.radionuclide).where(
            instances.c.id.in_(list(group))
        )
        for row in session.execute(stmt):
            said = witnesses_of(row.header_modality, row.sop_class_uid, row.header_label, row.radionuclide)
            if said != NO_WITNESSES:
                out[int(row.id)] = said
    return out


def register_models(
    session: Session,
    base: tuple[str, str, ModelSpec],
    adapted: tuple[str, str, ModelSpec],
    oof_spec: ModelSpec,
) -> tuple[int, int, int]:
    """Ids of the base model, the adapted model and the out-of-fold pseudo-model (registered
    when new; none is activated). Each tuple: sha256, path, spec."""
    base_id = register_artefact(session, *base)
    adapted_id = register_artefact(session, *adapted)
    # The out-of-fold predictions come from K heads, not one artefact: their identity is the
    # adapted model's, marked so that `sorter models use` refuses them.
    oof_id = register_artefact(
        session, f"oof-{adapted[0]}"[:64], f"{adapted[1]} (out-of-fold)", oof_spec, role="out_of_fold"
    )
    return base_id, adapted_id, oof_id


def write_adaptation(
    session: Session,
    *,
    ids: np.ndarray,
    headers: Sequence[str],
    probs: np.ndarray,
    folds: np.ndarray,
    issues: Issues,
    spec: ModelSpec,
    model_ids: tuple[int, int, int],
    work_dir: str,
    parameters: dict[str, Any],
    summary: dict[str, Any],
) -> int:
    """Store a finished adaptation: its row, the out-of-fold predictions (with the adapted
    model's verdicts) and the label issues. Returns the adaptation's id; the caller commits."""
    base_id, adapted_id, oof_id = model_ids
    adaptation_id = int(
        session.execute(
            sa.insert(adaptations)
            .values(
                # One transaction writes the row and everything below: no reader ever sees it
                # unfinished, so it is stored finished.
                status="done",
                finished_at=sa.func.now(),
                base_model_id=base_id,
                oof_model_id=oof_id,
                adapted_model_id=adapted_id,
                work_dir=work_dir,
                parameters=parameters,
                summary=summary,
            )
            .returning(adaptations.c.id)
        ).scalar_one()
    )
    labels = spec.labels
    witnesses = header_witnesses(session, ids.tolist())
    rows, issue_rows = [], []
    for n, instance_id in enumerate(ids.tolist()):
        header = Label(headers[n])
        prediction = top_two(probs[n], labels)
        verdict = compare(
            header, prediction, labels, spec.thresholds, witnesses.get(int(instance_id), NO_WITNESSES)
        )
        rows.append(
            prediction_row(Outcome(int(instance_id), Status.DONE, header, prediction, verdict), oof_id)
        )
        issue_rows.append(
            {
                "adaptation_id": adaptation_id,
                "instance_id": int(instance_id),
                "fold": int(folds[n]),
                "given_label": header.value,
                "self_confidence": float(issues.self_confidence[n]),
                "score": float(issues.score[n]),
                "is_issue": bool(issues.is_issue[n]),
            }
        )
    for start in range(0, len(rows), CHUNK):
        upsert_predictions(session, rows[start : start + CHUNK])
        session.execute(sa.insert(label_issues), issue_rows[start : start + CHUNK])
    return adaptation_id
