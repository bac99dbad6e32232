"""The models a database has seen, and which one is active (``sorter models``).

The active model is the one whose predictions every view, report and query shows: an instance's
``prediction_id`` points at the active model's prediction when it has one, else at the one written
last (:func:`sorter.db.queries.mark_done`). ``activate`` moves the pointers in one statement, so a
switch, and a rollback to the previous model, cost no inference when both have classified.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePath
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db.queries import active_model, instances, models, predicted_by, predictions
from sorter.domain import Status

#: Where the bundled artefact lies inside the package, whatever the install location.
_BUNDLED = ("sorter", "model", "default", "model.pt")


@dataclass(frozen=True)
class ModelRecord:
    """One row of ``sorter models``."""

    id: int
    sha256: str
    name: str
    arch: str
    path: str | None
    created_at: datetime | None
    activated_at: datetime | None
    active: bool
    predictions: int  # instances this model has classified
    shown: int  # instances whose views show this model's prediction
    summary: str  # from the artefact's card metrics, when it has them
    role: str | None = None  # "out_of_fold": an adaptation's cross-fitted predictions, never active

    def as_row(self) -> dict[str, Any]:
        """The printable columns."""
        return {
            "active": "*" if self.active else "",
            "name": self.name,
            "sha256": self.sha256[:12],
            "arch": self.arch,
            "created": self.created_at.strftime("%Y-%m-%d %H:%M") if self.created_at else None,
            "predictions": self.predictions,
            "shown": self.shown,
            "summary": self.summary,
            "path": self.path,
        }


COLUMNS = ("active", "name", "sha256", "arch", "created", "predictions", "shown", "summary", "path")


def is_bundled(path: str) -> bool:
    """Whether a stored artefact path is the package's own model (in whatever install wrote it)."""
    return tuple(PurePath(path).parts[-len(_BUNDLED) :]) == _BUNDLED


def model_name(path: str | None, sha256: str) -> str:
    """``bundled`` for the package's own model, else the artefact's file name (its sha256 prefix
    when the path is unknown)."""
    if not path:
        return sha256[:12]
    if is_bundled(path):
        return "bundled"
    return PurePath(path).name


def card_summary(spec: dict[str, Any] | None) -> str:
    """One line from the artefact's metrics: unseen-source balanced accuracy, ECE, header test."""
    metrics = (spec or {}).get("metrics") or {}
    loso = metrics.get("leave_sources_out") or {}
    parts = []
    if "balanced_accuracy" in loso:
        parts.append(f"LOSO bal. acc. {loso['balanced_accuracy']:.3f}")
    if "ece" in loso:
        parts.append(f"ECE {loso['ece']:.3f}")
    crossfit = metrics.get("cross_fitted") or {}
    if "accuracy" in crossfit:
        parts.append(
            f"adapted: cross-fitted acc. {crossfit['accuracy']:.3f} on {crossfit.get('n')} archive instances"
        )
    point = (metrics.get("operating_point") or {}).get("images") or {}
    if "agree" in point and "caught" in point:
        parts.append(f"right headers agree {point['agree']:.2f}, relabelled caught {point['caught']:.2f}")
    return ", ".join(parts) or "(no card metrics)"


def list_models(session: Session) -> list[ModelRecord]:
    """Every model the database knows, oldest first, with its instance counts."""
    active = session.execute(sa.select(active_model())).scalar()
    per_model = sa.select(predictions.c.model_id, sa.func.count()).group_by(predictions.c.model_id)
    made: dict[int, int] = {int(m): int(n) for m, n in session.execute(per_model).all()}
    pointed = per_model.select_from(
        instances.join(predictions, predictions.c.id == instances.c.prediction_id)
    )
    shown: dict[int, int] = {int(m): int(n) for m, n in session.execute(pointed).all()}
    rows = session.execute(sa.select(models).order_by(models.c.id)).mappings()
    return [
        ModelRecord(
            id=row["id"],
            sha256=row["sha256"],
            name=model_name(row["path"], row["sha256"]),
            arch=row["arch"],
            path=row["path"],
            created_at=row["created_at"],
            activated_at=row["activated_at"],
            active=row["id"] == active,
            predictions=int(made.get(row["id"], 0)),
            shown=int(shown.get(row["id"], 0)),
            summary=card_summary(row["spec"]),
            role=row["role"],
        )
        for row in rows
    ]


class UnknownModel(LookupError):
    """No model, or more than one, matches a name or sha256 prefix."""


def resolve(session: Session, ref: str) -> ModelRecord:
    """The model named ``ref`` (``bundled``, a file name) or whose sha256 starts with it (6+ hex)."""
    records = list_models(session)
    by_sha = [r for r in records if len(ref) >= 6 and r.sha256.startswith(ref.lower())]
    by_name = [r for r in records if r.name == ref or (r.path is not None and r.path == ref)]
    found = by_sha or by_name
    if len(found) == 1:
        return found[0]
    if not found:
        known = ", ".join(f"{r.name} ({r.sha256[:12]})" for r in records) or "none yet"
        short = ref and any(r.sha256.startswith(ref.lower()) for r in records)
        why = ": a sha256 prefix needs at least 6 characters" if short else ""
        raise UnknownModel(f"no model {ref!r} in this database{why}; known: {known}")
    raise UnknownModel(
        f"{ref!r} matches {len(found)} models ("
        + ", ".join(f"{r.name} {r.sha256[:12]}" for r in found)
        + "): give more of the sha256"
    )


def activate(session: Session, model_id: int) -> tuple[int, int]:
    """Make ``model_id`` the active model and point every instance it classified at its prediction.

    Returns ``(shown, missing)``: instances now showing its prediction, and ``done`` instances it
    has not classified (they keep showing another model's until it does). The caller commits.
    """
    session.execute(
        sa.update(models).where(models.c.id == model_id).values(activated_at=_after_every_stamp(session))
    )
    theirs = predicted_by(model_id).scalar_subquery()
    has = sa.exists(predicted_by(model_id))
    # Classified instances only: one whose file was overwritten, or changed and not read again
    # yet, must not show a prediction of pixels it no longer holds.
    result = session.execute(
        sa.update(instances).where(has, instances.c.status == Status.DONE).values(prediction_id=theirs)
    )
    shown = getattr(result, "rowcount", 0)  # a CursorResult for an UPDATE
    missing = session.execute(
        sa.select(sa.func.count()).select_from(instances).where(instances.c.status == Status.DONE, ~has)
    ).scalar_one()
    return int(shown or 0), int(missing)


def _after_every_stamp(session: Session) -> datetime:
    """Now, or just after the latest activation if that is not earlier.

    The active model is the one stamped last. SQLite's ``CURRENT_TIMESTAMP`` counts whole
    seconds, so a switch and its rollback within one second tied, and the tie went to the higher
    id: ``sorter models use A`` right after ``use B`` left B active. A clock behind another
    host's would do the same on PostgreSQL.
    """
    latest = session.execute(sa.select(sa.func.max(models.c.activated_at))).scalar_one_or_none()
    stamp = datetime.now(UTC)
    if latest is not None:
        latest = latest if latest.tzinfo else latest.replace(tzinfo=UTC)  # SQLite keeps no zone: UTC
        stamp = max(stamp, latest + timedelta(milliseconds=1))
    return stamp


def activate_if_none(session: Session, model_id: int) -> None:
    """The first model a database registers becomes its active model."""
    other = models.alias("other")  # not correlated with the row being updated
    session.execute(
        sa.update(models)
        .where(models.c.id == model_id, ~sa.exists().where(other.c.activated_at.is_not(None)))
        .values(activated_at=sa.func.now())
    )
