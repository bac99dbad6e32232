"""Spool retention: what the listener may delete from its spool, and when.

The listener keeps every received instance as a file until the database knows what it is. A
policy (``--spool-retention``) then frees the disk:

- ``keep`` (default): never delete;
- ``delete-after-classify``: delete a file once its instance is classified (``done``), skipped, or
  failed for a reason a retry cannot fix;
- ``age:7d`` (``s``, ``m``, ``h``, ``d``): the same, once the file is that old.

A file whose instance is ``pending``, or ``failed`` for a reason that can heal
(:data:`sorter.registrar.RETRYABLE`), is never deleted: a worker or a retry still needs it. The
instance row keeps its path and prediction; its ledger row goes with the file, which is how a
deleted file is never looked at again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sorter.db.queries import files, instances, path_under
from sorter.domain import Status
from sorter.registrar import RETRYABLE

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Files deleted per statement: bounded transactions on a spool of millions.
BATCH = 1000


@dataclass(frozen=True)
class Retention:
    """A parsed ``--spool-retention``: ``None`` age keeps everything."""

    keep: bool = True
    min_age_s: float = 0.0

    def __str__(self) -> str:
        if self.keep:
            return "keep"
        return f"age:{self.min_age_s:g}s" if self.min_age_s else "delete-after-classify"


#: The default policy: never delete.
KEEP = Retention()


def parse_retention(text: str) -> Retention:
    """``keep``, ``delete-after-classify`` or ``age:N[smhd]``; ``ValueError`` otherwise."""
    value = text.strip().lower()
    if value == "keep":
        return KEEP
    if value == "delete-after-classify":
        return Retention(keep=False)
    match = re.fullmatch(r"age:(\d+(?:\.\d+)?)([smhd])", value)
    if match:
        return Retention(keep=False, min_age_s=float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError(f"{text!r} is not a retention policy: keep, delete-after-classify or age:N[s|m|h|d]")


def deletable(session: Session, spool: str, policy: Retention, limit: int = BATCH) -> list[tuple[int, str]]:
    """Ledger rows ``(id, path)`` under ``spool`` whose files ``policy`` lets go, oldest first."""
    if policy.keep:
        return []
    finished = sa.or_(
        instances.c.status.in_([Status.DONE, Status.SKIPPED]),
        sa.and_(instances.c.status == Status.FAILED, instances.c.error.not_in(sorted(RETRYABLE))),
    )
    stmt = (
        sa.select(files.c.id, files.c.path)
        .select_from(files.join(instances, instances.c.id == files.c.instance_id))
        .where(finished, path_under(files.c.path, [os.path.join(spool, "")]))
        .order_by(files.c.id)
        .limit(limit)
    )
    if policy.min_age_s:
        stmt = stmt.where(files.c.mtime_ns <= time.time_ns() - int(policy.min_age_s * 1e9))
    return [(int(row.id), str(row.path)) for row in session.execute(stmt)]


def apply_retention(session: Session, spool: str, policy: Retention) -> int:
    """Delete what ``policy`` lets go under ``spool`` (files, then their ledger rows; the caller
    commits after each call); returns how many files went. Call until it returns 0."""
    rows = deletable(session, spool, policy)
    gone: list[int] = []
    for row_id, path in rows:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # removed by hand: forget it all the same
        except OSError as exc:
            log.warning("spool retention cannot delete %s: %s", path, exc.strerror or exc)
            continue
        gone.append(row_id)
    _forget(session, gone)
    return len(gone)


def _forget(session: Session, ids: Sequence[int]) -> None:
    if ids:
        session.execute(sa.delete(files).where(files.c.id.in_(list(ids))))
