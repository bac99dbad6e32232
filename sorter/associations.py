"""One log line and one count per DICOM association the listener sees.

pynetdicom reports an association's steps as separate events (requested, accepted or rejected,
each C-STORE, released or aborted, connection closed). :class:`AssociationTracker` gathers them per
association and, when its connection closes, logs a single line at the default level — calling AE,
address, how it ended, instances stored and failed, and why it was rejected — and hands the record
to an observer (the Prometheus counters). UIDs and patient data never appear.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.events import Event

#: Its own logger at INFO, so that one line per association shows at the default level (warnings).
log = logging.getLogger("sorter.associations")
log.setLevel(logging.INFO)

#: Rejection reasons (a label value: keep them stable).
SPOOL_FULL = "spool_below_free_space_floor"
NOT_ALLOWED = "calling_ae_not_allowed"
CALLED_AE = "called_ae_not_recognised"
TOO_MANY = "too_many_associations"
OTHER = "rejected"


@dataclass
class AssociationRecord:
    """What happened on one association."""

    calling_ae: str
    address: str
    result: str = "requested"  # then accepted; at the end rejected, released, aborted or closed
    reason: str | None = None  # why it was rejected
    stored: int = 0
    failed: int = 0

    def line(self) -> str:
        """The log line."""
        who = f"association from {self.calling_ae or '-'} at {self.address}"
        if self.result == "rejected":
            return f"{who}: rejected ({self.reason or OTHER})"
        return f"{who}: {self.result}, stored {self.stored}, failed {self.failed}"


Observer = Callable[[AssociationRecord], None]


def _address(event: Event) -> str:
    requestor = event.assoc.requestor
    return f"{requestor.address}:{requestor.port}"


def _calling(event: Event) -> str:
    primitive = event.assoc.requestor.primitive
    title = getattr(primitive, "calling_ae_title", None) if primitive is not None else None
    return str(title or "").strip()


class AssociationTracker:
    """Gathers an association's events into an :class:`AssociationRecord`; thread-safe.

    Parameters
    ----------
    observer
        Called with each finished record (after the log line), e.g. to count it.
    """

    def __init__(self, observer: Observer | None = None) -> None:
        self.observer = observer
        self._records: dict[int, AssociationRecord] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[Any, Callable[[Event], None]]]:
        """pynetdicom event handlers to bind alongside the listener's own."""
        return [
            (evt.EVT_REQUESTED, self._requested),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_RELEASED, lambda event: self._ended(event, "released")),
            (evt.EVT_ABORTED, lambda event: self._ended(event, "aborted")),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]

    def _record(self, event: Event) -> AssociationRecord:
        with self._lock:
            record = self._records.get(id(event.assoc))
            if record is None:
                record = AssociationRecord(_calling(event), _address(event))
                self._records[id(event.assoc)] = record
            return record

    def _requested(self, event: Event) -> None:
        self._record(event).calling_ae = _calling(event)

    def _accepted(self, event: Event) -> None:
        self._record(event).result = "accepted"

    def _rejected(self, event: Event) -> None:
        record = self._record(event)
        if record.result != "rejected":  # our own rejection named its reason already
            self.reject(event, _rejection_reason(event, record.calling_ae))

    def reject(self, event: Event, reason: str) -> None:
        """Record that the listener itself rejected this association, and why."""
        record = self._record(event)
        record.result, record.reason = "rejected", reason

    def stored(self, event: Event, ok: bool) -> None:
        """Count one C-STORE's outcome."""
        record = self._record(event)
        if ok:
            record.stored += 1
        else:
            record.failed += 1

    def _ended(self, event: Event, how: str) -> None:
        record = self._record(event)
        if record.result != "rejected":
            record.result = how

    def _closed(self, event: Event) -> None:
        with self._lock:
            record = self._records.pop(id(event.assoc), None)
        if record is None or (record.result == "requested" and not record.calling_ae):
            return  # a connection that never sent an association request: nothing to report
        if record.result == "accepted":
            record.result = "closed"  # the peer dropped the connection without release or abort
        log.info(record.line())
        if self.observer is not None:
            try:
                self.observer(record)
            except Exception:  # metrics must never cost an association
                log.warning("association not counted", exc_info=True)


def _rejection_reason(event: Event, calling: str) -> str:
    """Why pynetdicom's ACSE rejected the association (it does not say), by its own checks."""
    ae = event.assoc.ae
    allowed = [title.strip() for title in (ae.require_calling_aet or [])]
    if allowed and calling not in allowed:
        # An admin who typed `--allow-ae pacs01` for PACS01 saw only "calling_ae_not_allowed".
        near = [title for title in allowed if title.upper() == calling.upper()]
        if near:
            log.warning(
                "calling AE title %r is not allowed, but %r is: AE titles are case-sensitive; "
                "allow the title exactly as the sender sends it (--allow-ae / SORTER_ALLOW_AE)",
                calling,
                near[0],
            )
        return NOT_ALLOWED
    primitive = event.assoc.requestor.primitive
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    if ae.require_called_aet and called != str(event.assoc.acceptor.ae_title).strip():
        return CALLED_AE
    if len([a for a in ae.active_associations if a.is_acceptor]) > ae.maximum_associations:
        return TOO_MANY
    return OTHER
