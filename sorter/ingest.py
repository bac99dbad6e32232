"""Register instances in the database: idempotent on SOP Instance UID, in bulk.

The scan, the watcher and the listener all come through :func:`register`. It
takes what was learnt from one file each (a header, or the reason there is
none) and records it with a constant number of statements per batch:

- a new SOP Instance UID becomes a row (``pending``, or ``skipped`` for
  objects without an image);
- the same UID at the same path, when the file changed since it was last
  seen, is re-read: header columns overwritten, back to ``pending``, current
  prediction dropped (an unchanged re-registration changes nothing);
- the same UID at another path is a duplicate copy: the first row stays,
  unless its file has vanished (then the instance moved), or failed (then it
  is read from the copy; :mod:`sorter.copies` does the same when the first
  file fails later, at decoding);
- a file without a usable SOP Instance UID (not DICOM, unreadable, ...) gets
  a UID derived from its path, so every failure has a row and a reason.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.orm import Session

from sorter.db import queries
from sorter.dicom.nonimage import non_image_reason
from sorter.domain import FailureReason, InstanceHeader, Status
from sorter.fspath import display_path, encode_path
from sorter.taxonomy import expected_label, normalise_modality

log = logging.getLogger(__name__)

#: Length limits of the ``instances`` columns (PostgreSQL refuses longer values).
_LIMITS = {
    "uid": 64,
    "code": 64,
    "modality": 16,
    "institution": 128,
    "station": 64,
    "ae": 16,
    "source": 255,
    "error": 64,
}


def path_uid(path: str) -> str:
    """A valid DICOM UID derived from ``path`` (the ``2.25`` UUID form, PS3.5 B.2).

    Used for files that have no SOP Instance UID of their own, so that their
    failure is recorded once, however often the archive is scanned.
    """
    # The stored form of the path: the path itself when it is valid UTF-8 (as ever), and
    # encodable when it is not.
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'file://' + encode_path(path)).int}"


@dataclass(frozen=True)
class Registration:
    """What one file contributes: its header, or the reason it has none."""

    path: str
    header: InstanceHeader | None = None
    status: Status = Status.PENDING
    error: str | None = None
    detail: str | None = None
    source: str | None = None
    calling_ae: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    mode: int | None = None
    #: The file at this path changed since it was registered (the ledger's size or mtime differ).
    changed: bool = False
    #: The instance the ledger linked this path to before it changed.
    replaces: int | None = None


@dataclass(frozen=True)
class Registered:
    """The outcome of registering one file."""

    path: str
    instance_id: int
    status: Status
    duplicate: bool = False
    #: A duplicate from another series: another image under a SOP Instance UID already registered.
    reused_uid: bool = False
    lost: bool = False  # the instance this path held before lost its file (``failed/vanished``)


def from_header(header: InstanceHeader, **extra: Any) -> Registration:
    """A registration for a header that was read: ``pending``, or ``skipped`` without an image."""
    reason = non_image_reason(header)
    if reason:
        return Registration(header.path, header, Status.SKIPPED, FailureReason.NON_IMAGE, reason, **extra)
    return Registration(header.path, header, **extra)


def failure(
    path: str, reason: str, detail: str | None = None, status: Status = Status.FAILED, **extra: Any
) -> Registration:
    """A registration for a file whose header could not be read."""
    return Registration(path, None, status, reason, detail, **extra)


def _text(value: str | None, limit: int) -> str | None:
    # PostgreSQL text cannot hold NUL, and a malformed header must not fail the whole batch.
    if value is None:
        return None
    cleaned = value.replace("\x00", "").strip()
    return cleaned[:limit] or None


def _uid(item: Registration) -> str:
    uid = _text(item.header.sop_instance_uid if item.header else None, 1000)
    if uid is None or len(uid) > _LIMITS["uid"]:
        return path_uid(item.path)
    return uid


def instance_row(item: Registration) -> dict[str, Any]:
    """The ``instances`` row of a registration (a path-derived UID when it has no usable one)."""
    h = item.header
    modality = normalise_modality(_text(h.modality, _LIMITS["modality"])) if h else None
    return {
        "sop_instance_uid": _uid(item),
        "study_instance_uid": _text(h.study_instance_uid if h else None, _LIMITS["uid"]),
        "series_instance_uid": _text(h.series_instance_uid if h else None, _LIMITS["uid"]),
        "sop_class_uid": _text(h.sop_class_uid if h else None, _LIMITS["uid"]),
        "header_modality": modality,
        # From the cleaned Modality (a NUL inside "C\0T" is dropped), so not taxonomy.label_of(h).
        "header_label": expected_label(
            modality, localizer=h.localizer, sop_class_uid=_text(h.sop_class_uid, _LIMITS["uid"])
        )
        if h
        else None,
        "radionuclide": _text(h.radionuclide if h else None, _LIMITS["code"]),
        "transfer_syntax_uid": _text(h.transfer_syntax_uid if h else None, _LIMITS["uid"]),
        "rows": h.rows if h else None,
        "columns": h.columns if h else None,
        "number_of_frames": h.number_of_frames if h else None,
        "institution_name": _text(h.institution_name if h else None, _LIMITS["institution"]),
        "station_name": _text(h.station_name if h else None, _LIMITS["station"]),
        "calling_ae": _text(item.calling_ae, _LIMITS["ae"]),
        "source": _text(item.source, _LIMITS["source"]),
        "path": item.path,
        "status": item.status,
        "error": _text(item.error, _LIMITS["error"]),
        "detail": _text(item.detail, 2000),
    }


def register(session: Session, items: Sequence[Registration]) -> list[Registered]:
    """Record ``items`` and their ledger entries; return one :class:`Registered` per item.

    Parameters
    ----------
    session
        The caller's session; the caller commits (one transaction per batch).
    items
        One registration per file, each path at most once.

    Returns
    -------
    list of Registered
        In input order. ``status`` is the instance's status after registration:
        ``pending`` ones are the caller's to classify (after its commit).
    """
    rows = [instance_row(item) for item in items]
    uids = {row["sop_instance_uid"] for row in rows}
    before = queries.instances_by_uid(session, uids)

    new: dict[str, dict[str, Any]] = {}
    reread: list[dict[str, Any]] = []
    moves: dict[int, str] = {}
    found_again: set[int] = set()
    for item, row in zip(items, rows, strict=True):
        uid, old = row["sop_instance_uid"], before.get(row["sop_instance_uid"])
        if old is None:
            new.setdefault(uid, row)  # a second copy within the batch is a duplicate
        elif old.path == row["path"]:
            if item.changed:
                reread.append({**row, "b_id": old.id})
        elif (
            old.status == Status.FAILED
            and row["status"] is Status.PENDING
            and old.id not in found_again
            and not other_series(old.series_instance_uid, row["series_instance_uid"])
        ):
            # A failed instance (its file overwritten, or unreadable) read well at another path:
            # it lives here now, and is classified again. (Not another image under its UID.)
            found_again.add(old.id)
            reread.append({**row, "b_id": old.id})
        elif not os.path.lexists(old.path):
            moves[old.id] = row["path"]  # rare: one stat per duplicate, never per file
    queries.insert_instances(session, list(new.values()))
    queries.reset_instances(session, reread)
    queries.move_instances(session, moves)

    after = queries.instances_by_uid(session, uids)
    out: list[Registered] = []
    for row in rows:
        found = after[row["sop_instance_uid"]]
        duplicate = found.path != row["path"]
        reused = duplicate and other_series(found.series_instance_uid, row["series_instance_uid"])
        if reused:  # rare and a data problem at the source: said even by a service that logs warnings only
            log.warning(
                "SOP Instance UID %s is another image's too (series %s, not %s): %s is not classified",
                found.sop_instance_uid,
                row["series_instance_uid"],
                found.series_instance_uid,
                display_path(row["path"]),
            )
        elif duplicate:
            log.info("duplicate of SOP Instance UID %s at %s", found.sop_instance_uid, row["path"])
        out.append(Registered(row["path"], found.id, found.status, duplicate, reused))
    _forget_stale_path_rows(session, items, out)
    lost = _lose_overwritten(session, items, out)
    out = [replace(r, lost=True) if i.replaces in lost else r for i, r in zip(items, out, strict=True)]
    queries.upsert_files(
        session,
        [
            {
                "path": i.path,
                "size": i.size,
                "mtime_ns": i.mtime_ns,
                "ctime_ns": i.ctime_ns,
                "mode": i.mode,
                "instance_id": r.instance_id,
            }
            for i, r in zip(items, out, strict=True)
        ],
    )
    return out


def other_series(stored: str | None, found: str | None) -> bool:
    """Whether two files under one SOP Instance UID belong to different series: two images, not
    two copies of one (a device or an anonymiser that reuses UIDs)."""
    return stored is not None and found is not None and stored != found


def _lose_overwritten(session: Session, items: Sequence[Registration], out: Sequence[Registered]) -> set[int]:
    """A real instance whose file now holds another instance (a drop folder that reuses file
    names) has no file any more: it keeps its row and predictions, but becomes ``failed``
    (``vanished``), so that `reclassify`, `export`, `adapt` and the review page never take the
    other instance's pixels for its own (reclassify called such a CT "pixels say US", and
    export listed the US file under the CT label)."""
    lost = {
        i.replaces: i.path
        for i, r in zip(items, out, strict=True)
        if i.replaces is not None and i.replaces != r.instance_id
    }
    if not lost:
        return set()
    gone = queries.instance_paths(session, list(lost))  # path-derived rows are deleted already
    overwritten = [instance_id for instance_id, path in gone.items() if path == lost[instance_id]]
    # A copy registered as its duplicate elsewhere (moved there before the name was reused) is
    # where it lives now.
    at_risk = set(overwritten)
    candidates = queries.ledger_paths_of(session, overwritten)
    candidates += [(r.path, r.instance_id) for r in out if r.duplicate]  # this batch's, not in the ledger yet
    copies = {
        instance_id: path
        for path, instance_id in candidates
        if instance_id in at_risk and path != lost[instance_id] and os.path.lexists(path)
    }
    queries.move_instances(session, copies)
    overwritten = [instance_id for instance_id in overwritten if instance_id not in copies]
    queries.lose_instances(session, overwritten, "its file was overwritten by another instance")
    for instance_id in overwritten:
        log.info("instance %d: its file %s now holds another instance", instance_id, lost[instance_id])
    return set(overwritten)


def _forget_stale_path_rows(
    session: Session, items: Sequence[Registration], out: Sequence[Registered]
) -> None:
    """Delete the path-derived failure row of a changed path that now holds another instance.

    A file that was half-written (``truncated``) at the last scan and is complete
    now must not keep its old failure in the reports. Real instances that were
    overwritten by another file keep their row: their pixels were classified.
    """
    replaced = {
        i.replaces: path_uid(i.path)
        for i, r in zip(items, out, strict=True)
        if i.replaces is not None and i.replaces != r.instance_id
    }
    if replaced:
        found = queries.instances_by_uid(session, set(replaced.values()))
        queries.delete_instances(session, [row.id for row in found.values() if row.id in replaced])
