"""Classify a batch of registered instances end to end (ARCHITECTURE §1).

The same steps run under ``sorter scan`` (:mod:`sorter.jobs.local`) and in a
queue worker: :func:`claim_batch` locks the instances that still need work,
:func:`decode_one` turns one file into network input (in a worker process),
:func:`infer` runs one batched forward pass and compares with the header, and
:func:`write_outcomes` stores everything with a fixed number of statements.
Nothing here creates a session or commits: the caller owns the transaction,
which spans claim to write so that a crash leaves the batch ``pending``.

The decode side (:mod:`sorter.decode`, re-exported here) imports neither torch nor
SQLAlchemy, so decode processes start in a fraction of a second and stay small.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sorter.compare import compare
from sorter.copies import read_other_copies
from sorter.db import queries
from sorter.db.catalogue import activate_if_none
from sorter.db.models import PROBABILITY_COLUMNS
from sorter.decode import (
    Decoder,
    Prepared,
    decode_one,
    run_decoder,
)
from sorter.domain import Claimed, FailureReason, Label, Outcome, Status

if TYPE_CHECKING:  # torch stays out of the decode processes
    from sqlalchemy.orm import Session

    from sorter.model.classifier import Classifier
    from sorter.model.spec import ModelSpec

log = logging.getLogger(__name__)


def claim_batch(
    session: Session, ids: Sequence[int], statuses: Collection[Status] = (Status.PENDING,)
) -> list[Claimed]:
    """Lock the instances of ``ids`` that still need work (see :func:`sorter.db.queries.claim`)."""
    return queries.claim(session, ids, statuses)


def infer(
    classifier: Classifier, items: Sequence[Claimed], decoded: Sequence[Prepared | Outcome]
) -> list[Outcome]:
    """One batched forward pass over the decoded items; outcomes in ``items`` order."""
    ready = [d for d in decoded if isinstance(d, Prepared)]
    # Decode processes may have run the model already; the rest (all of them under a
    # queue worker or on CUDA) go through one forward pass here.
    headers = {item.id: item.header_label for item in items}
    todo = [d for d in ready if d.logits is None]
    missing = iter(
        classifier.logits_prepared(
            [(d.images, d.features) for d in todo], [headers[d.instance_id] for d in todo]
        )
    )
    logits = [d.logits if d.logits is not None else next(missing) for d in ready]
    predictions = iter(classifier.predict_logits(logits))
    thresholds = classifier.spec.thresholds
    out: list[Outcome] = []
    for item, result in zip(items, decoded, strict=True):
        if isinstance(result, Outcome):
            # A classified instance that cannot be read now keeps what it was; a blank one never
            # had anything to classify, so its earlier prediction goes.
            kept = item.status is Status.DONE and result.error != FailureReason.BLANK
            out.append(replace(result, kept=True) if kept else result)
            continue
        prediction = next(predictions)
        verdict = compare(
            item.header_label,
            prediction,
            classifier.labels,
            thresholds,
            item.witnesses,
        )
        out.append(Outcome(item.id, Status.DONE, item.header_label, prediction, verdict))
    return out


def prediction_row(outcome: Outcome, model_id: int) -> dict[str, Any]:
    """The ``predictions`` row of a classified instance's outcome."""
    p = outcome.prediction
    assert p is not None and outcome.verdict is not None
    row: dict[str, Any] = {
        "instance_id": outcome.instance_id,
        "model_id": model_id,
        "label": p.label,
        "confidence": p.confidence,
        "second_label": p.second_label,
        "second_confidence": p.second_confidence,
        "verdict": outcome.verdict,
    }
    for label in Label:
        value = p.probabilities.get(label)
        row[PROBABILITY_COLUMNS[label]] = None if value is None else float(value)
    return row


@dataclass(frozen=True)
class Written:
    """What :func:`write_outcomes` stored: the outcomes to report, and the instances to submit again.

    An instance that failed but has a copy elsewhere is ``pending`` at the copy (``again``, for the
    caller to submit after its commit); ``outcomes`` then reports the bad file's own failure row
    in its place (:mod:`sorter.copies`).
    """

    outcomes: list[Outcome]
    again: list[int] = field(default_factory=list)


def write_outcomes(session: Session, model_id: int, outcomes: Sequence[Outcome]) -> Written:
    """Store a batch's predictions and terminal statuses: three statements, whatever its size, and
    one more when instances failed (their copies; a few more when one is found)."""
    done = [o for o in outcomes if o.status is Status.DONE]
    queries.upsert_predictions(session, [prediction_row(o, model_id) for o in done])
    queries.mark_done(session, [o.instance_id for o in done], model_id)
    finished = [o for o in outcomes if o.status is not Status.DONE and not o.kept]
    moved = read_other_copies(session, finished)
    queries.mark_finished(
        session,
        [
            {"b_id": o.instance_id, "status": o.status, "error": o.error, "detail": o.detail}
            for o in finished
            if o.instance_id not in moved
        ],
    )
    if not moved:
        return Written(list(outcomes))
    reported = [moved.get(o.instance_id, o) for o in outcomes]
    return Written([o for o in reported if o is not None], list(moved))


def register_model(session: Session, classifier: Classifier) -> int:
    """The ``models`` row id of ``classifier``, created on first use (the database's first model
    becomes its active one)."""
    model_id = register_artefact(session, classifier.sha256, str(classifier.path), classifier.spec)
    activate_if_none(session, model_id)
    return model_id


def register_artefact(
    session: Session, sha256: str, path: str | None, spec: ModelSpec, role: str | None = None
) -> int:
    """The ``models`` row id of an artefact (with its header-test thresholds), created on first
    use; never activates it. ``role``: see :class:`sorter.db.models.Model`."""
    return queries.model_id_for(
        session,
        {
            "sha256": sha256,
            "arch": spec.network_name,
            "labels": ",".join(label.value for label in spec.labels),
            "min_confidence": spec.thresholds.min_confidence,
            "min_margin": spec.thresholds.min_margin,
            "path": path,
            "spec": spec.to_dict(),
            "role": role,
        },
        {
            label: (spec.thresholds.agree_at[label], spec.thresholds.disagree_at[label])
            for label in spec.thresholds.agree_at
        },
    )


def classify_batch(
    session: Session,
    ids: Sequence[int],
    classifier: Classifier,
    model_id: int,
    *,
    frames: int = 1,
    statuses: Collection[Status] = (Status.PENDING,),
    decode: Decoder = decode_one,
) -> Written:
    """Claim, decode (in this process), infer and write one batch; the caller commits, then
    submits what :class:`Written` says to classify again.

    This is the whole pipeline for a queue task; :mod:`sorter.jobs.local` runs
    the same steps with decoding spread over a process pool.
    """
    items = claim_batch(session, ids, statuses)
    params = classifier.spec.preprocess
    outcomes = infer(classifier, items, [run_decoder(decode, item, params, frames) for item in items])
    return write_outcomes(session, model_id, outcomes)
