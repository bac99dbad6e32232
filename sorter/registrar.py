"""The one registration path: ledger lookup, skip what is unchanged, read headers, register, commit,
then submit the new pending instances (``../shared/ARCHITECTURE.md`` §1).

Every source produces batches of walked :class:`~sorter.walk.Entry` objects and hands them to a
:class:`Registrar`: the scan (a walk of its roots), the watcher (settled files) and the listener's
spool (received files and sweeps). What truly differs between them is a parameter here, not a copy:

- ``describe(entry, old)`` says where a file comes from (its ``source``, the ``calling_ae`` that
  sent it), or returns ``None`` to hold the file back this time (the spool's files written
  without their sender, until they are old enough);
- ``summary`` is counted into when given (scan and watch report files, unchanged, registered,
  duplicates and files rejected at registration; the listener's spool does not);
- ``drain`` finishes the submitted work before returning (the spool: its batch is the unit);
- ``retry_failed``: re-read unchanged files whose instance failed for a reason that can heal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from sorter.db import queries
from sorter.db.queries import LedgerEntry
from sorter.dicom.headers import read_header
from sorter.domain import FailureReason, Status
from sorter.errors import InputError, UnreadableFile
from sorter.ingest import Registered, Registration, failure, from_header, register
from sorter.jobs.executor import Executor
from sorter.summary import RunSummary
from sorter.walk import Entry, os_error_reason, walk

log = logging.getLogger(__name__)

#: Told the status and reason of a file rejected at registration (metrics).
Rejected = Callable[[Status, str | None], None]
#: Where an entry comes from: keyword arguments of the registration (``source``, ``calling_ae``),
#: or ``None`` to hold it back this time.
Describe = Callable[[Entry, LedgerEntry | None], dict[str, Any] | None]


def read_registration(entry: Entry, source: str | None, **extra: Any) -> Registration:
    """Read one walked file's header into a :class:`~sorter.ingest.Registration`; never raises.

    ``extra`` goes to the registration (``changed``, ``replaces``, ``calling_ae``).
    """
    common: dict[str, Any] = {
        "source": source,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "ctime_ns": entry.ctime_ns,
        "mode": entry.mode,
        **extra,
    }
    if entry.reason is not None:
        return failure(entry.path, entry.reason, entry.detail, entry.status, **common)
    try:
        header = read_header(entry.path)
    except UnreadableFile as exc:
        cause = exc.__cause__
        reason = (
            os_error_reason(cause, os.path.islink(entry.path)) if isinstance(cause, OSError) else exc.reason
        )
        return failure(entry.path, reason, exc.detail, **common)
    except InputError as exc:
        return failure(entry.path, exc.reason, exc.detail, **common)
    except Exception as exc:  # one malformed header must not stop a days-long scan; record it
        log.warning("unexpected %s reading the header of %s", type(exc).__name__, entry.path, exc_info=True)
        return failure(entry.path, FailureReason.HEADER_ERROR, f"{type(exc).__name__}: {exc}", **common)
    return from_header(header, **common)


#: Failure reasons that can heal without the file's content changing: a permission or mount
#: fixed, a file back in place, a codec plugin installed. A failed instance with one of these is
#: re-read when its file's ctime or mode changed (chmod, chown, a restore), or with
#: ``--retry-failed``. Content problems (``not_dicom``, ``truncated`` ...) wait for new content.
RETRYABLE = frozenset(
    {
        FailureReason.PERMISSION_DENIED,
        FailureReason.VANISHED,
        FailureReason.UNREADABLE,
        FailureReason.BROKEN_SYMLINK,
        FailureReason.DECODE_ERROR,
        FailureReason.UNSUPPORTED_TRANSFER_SYNTAX,
        FailureReason.RETRIES_EXHAUSTED,
        FailureReason.TASK_ERROR,
    }
)


def path_entry(path: str) -> Entry:
    """The walk's entry for one path: its stat, or the reason there is none."""
    return next(iter(walk([path])), None) or Entry(path, reason=FailureReason.VANISHED, detail="not found")


def unchanged(old: LedgerEntry, entry: Entry, retry_failed: bool = False) -> bool:
    """Whether the ledger's record of a path still holds, so the file needs no reading.

    A path that could not be stat'ed, changed in size or mtime, or whose instance failed for a
    :data:`RETRYABLE` reason since fixed (ctime or mode changed, or ``retry_failed``) is read again.
    """
    if entry.reason is not None or old.instance_id is None:
        return False
    if (old.size, old.mtime_ns) != (entry.size, entry.mtime_ns):
        return False
    if old.status == Status.FAILED.value and old.error in RETRYABLE:
        return not retry_failed and (old.ctime_ns, old.mode) == (entry.ctime_ns, entry.mode)
    return True


@dataclass(frozen=True)
class Batch:
    """What one :meth:`Registrar.register` call did."""

    registered: int
    pending: list[int]


class Registrar:
    """Registers batches of entries and submits what became pending; see the module docstring."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        executor: Executor,
        describe: Describe,
        *,
        summary: RunSummary | None = None,
        on_rejected: Rejected | None = None,
        retry_failed: bool = False,
        drain: bool = False,
    ) -> None:
        self.sessions = sessions
        self.executor = executor
        self.describe = describe
        self.summary = summary
        self.on_rejected = on_rejected
        self.retry_failed = retry_failed
        self.drain = drain

    def register(self, entries: Sequence[Entry]) -> Batch:
        """One transaction: the ledger drops unchanged files, headers of the rest are read without
        pixels, everything is registered and committed; then the new pending ids are submitted."""
        if self.summary is not None:
            self.summary.files += len(entries)
        with self.sessions() as session:
            known = queries.ledger_lookup(session, [entry.path for entry in entries])
            todo: list[Registration] = []
            for entry in entries:
                old = known.get(entry.path)
                if old is not None and unchanged(old, entry, self.retry_failed):
                    if self.summary is not None:
                        self.summary.unchanged += 1
                    continue
                where = self.describe(entry, old)
                if where is None:
                    continue
                replaces = old.instance_id if old is not None else None
                todo.append(read_registration(entry, changed=old is not None, replaces=replaces, **where))
            registered = register(session, todo) if todo else []
            session.commit()
        pending = self._count(todo, registered)
        self.executor.submit(pending)  # after the commit: the ids exist for every reader
        if self.drain:
            self.executor.drain()
        return Batch(len(registered), pending)

    def reregister(self, items: Sequence[tuple[Entry, str | None, int]]) -> Batch:
        """Read again, header first, the files of known instances ``(entry, source, instance id)``
        whatever the ledger says (``reclassify --include-failed``)."""
        if self.summary is not None:
            self.summary.files += len(items)
        todo = [read_registration(entry, source, changed=True, replaces=id_) for entry, source, id_ in items]
        with self.sessions() as session:
            registered = register(session, todo)
            session.commit()
        pending = self._count(todo, registered)
        self.executor.submit(pending)
        self.executor.drain()
        return Batch(len(registered), pending)

    def _count(self, todo: Sequence[Registration], registered: Sequence[Registered]) -> list[int]:
        pending: list[int] = []
        for item, result in zip(todo, registered, strict=True):
            if self.summary is not None:
                self.summary.registered += 1
                if result.lost:  # the instance this path held: its file now holds another one
                    self.summary.count_terminal(Status.FAILED, FailureReason.VANISHED)
            if result.duplicate:
                if self.summary is not None:
                    self.summary.duplicates += 1
                    self.summary.reused_uids += int(result.reused_uid)
            elif result.status is Status.PENDING:
                pending.append(result.instance_id)
            elif item.status is not Status.PENDING:
                if self.summary is not None:
                    self.summary.count_terminal(item.status, item.error)
                if self.on_rejected is not None:
                    self.on_rejected(item.status, item.error)
        return pending
