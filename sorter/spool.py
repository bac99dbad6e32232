"""Register and classify spooled instances, off the network thread (ARCHITECTURE §1, §7).

The listener acknowledges a C-STORE once the file is durably in the spool and
offers its path to :class:`SpoolWorker`, a bounded queue consumed by one
background thread. The thread registers paths in batches (size or flush
interval, whichever comes first) through :func:`sorter.ingest.register` with
the scan ledger, exactly as ``sorter scan`` does, and hands the newly pending
ids to the executor. A full queue drops the offer (never blocks the network
thread); a database or model that cannot be reached drops the queue. Both are
caught up by the sweep: at start-up, at each reconnection and every ``sweep_s``
the whole spool is walked, and the ledger makes every already registered,
unchanged file free. What the queue held is not lost with it: each file
records its calling AE title in its own meta (:func:`sorter.dicom.storage.source_ae`),
so the sweep registers it at once, with its sender, whether the queue was
dropped by an outage or died with the process (``kill -9``).

The worker also removes temporary files that interrupted writes left in the
spool (:func:`sorter.dicom.storage.remove_stale_temporaries`), at start-up and
then hourly.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from sorter.db.queries import LedgerEntry, pending_backlog
from sorter.dicom.storage import (
    STALE_TEMPORARY_S,
    is_spooled_file,
    remove_stale_temporaries,
    source_ae,
)
from sorter.domain import FailureReason
from sorter.errors import QueueUnavailable
from sorter.jobs.executor import Executor, submit_pending
from sorter.registrar import Registrar, Rejected
from sorter.retention import BATCH as RETENTION_BATCH
from sorter.retention import KEEP, Retention, apply_retention
from sorter.walk import Entry, file_entry, walk

log = logging.getLogger(__name__)

#: Default source of instances whose calling AE is unknown (found by a sweep).
DEFAULT_SOURCE = "dicom-listener"
_SWEEP_CHUNK = 500


@dataclass(frozen=True)
class Received:
    """One spooled file and the AE title that sent it (``None`` when found by a sweep)."""

    path: str
    calling_ae: str | None = None


Backend = Callable[[], AbstractContextManager[tuple[sessionmaker[Session], Executor]]]


class SpoolIngest:
    """Registers spool files with the ledger and classifies what became pending."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        executor: Executor,
        spool: Path,
        source: str | None = None,
        grace_s: float = 0.0,
        on_rejected: Rejected | None = None,
    ) -> None:
        self.sessions = sessions
        self.executor = executor
        self.spool = spool
        self.source = source
        self.grace_s = grace_s
        self.on_rejected = on_rejected

    def register(self, items: Sequence[Received]) -> int:
        """Register ``items`` (one transaction), classify the new ones; returns how many were registered.

        An item without a calling AE (found by a sweep) takes the one recorded in
        its file's meta; a file without one waits until it is ``grace_s`` old.
        """
        newest = time.time_ns() - int(self.grace_s * 1e9)
        senders = {item.path: item.calling_ae for item in items}  # one per path: the last offer

        def describe(entry: Entry, _old: LedgerEntry | None) -> dict[str, Any] | None:
            # Read for files to register only (the ledger skipped the rest): a few hundred bytes.
            calling_ae = senders[entry.path] or source_ae(entry.path)
            if calling_ae is None and (entry.mtime_ns or 0) > newest:
                return None  # written without its sender (an older version): it may be in the queue, with it
            return {"source": self.source or calling_ae or DEFAULT_SOURCE, "calling_ae": calling_ae}

        # A file replaced or removed since it was offered is left out: the newer copy is (or was)
        # offered itself.
        entries = [entry for entry in map(_entry, senders) if entry is not None]
        registrar = Registrar(
            self.sessions, self.executor, describe, on_rejected=self.on_rejected, drain=True
        )
        return registrar.register(entries).registered

    def sweep(self) -> int:
        """Register spool files the ledger lacks (or saw change), finish pending ones; returns the count."""
        count = 0
        for chunk in _chunks(self._spooled(), _SWEEP_CHUNK):
            count += self.register(chunk)
        self._resume()
        if count:
            log.info("spool sweep registered %d files", count)
        return count

    def retain(self, policy: Retention) -> int:
        """Delete what ``policy`` lets go from the spool; returns how many files went."""
        total = 0
        while True:
            with self.sessions() as session:
                deleted = apply_retention(session, str(os.path.abspath(self.spool)), policy)
                session.commit()
            total += deleted
            if deleted < RETENTION_BATCH:
                return total

    def backlog(self) -> tuple[int, float]:
        """The database's pending instances, and the age in seconds of the oldest (0 when none)."""
        with self.sessions() as session:
            count, oldest = pending_backlog(session)
        if oldest is None:
            return count, 0.0
        return count, max(0.0, (datetime.now(UTC) - oldest).total_seconds())

    def _spooled(self) -> Iterator[Received]:
        if not self.spool.is_dir():
            return
        # Young files too: those the queue lost must not wait for the next sweep, and
        # their calling AE is in their meta (register() holds back those without).
        for entry in walk([self.spool]):
            if entry.reason is None and is_spooled_file(os.path.basename(entry.path)):
                yield Received(entry.path)

    def _resume(self) -> None:
        submit_pending(self.sessions, self.executor, under=[os.path.join(os.path.abspath(self.spool), "")])


def _entry(path: str) -> Entry | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Entry(path, reason=FailureReason.UNREADABLE, detail=exc.strerror or type(exc).__name__)
    return file_entry(path, st)


def _chunks(items: Iterator[Received], size: int) -> Iterator[list[Received]]:
    chunk: list[Received] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class SpoolWorker:
    """The background thread between the listener and the database.

    Parameters
    ----------
    spool
        The spool folder.
    connect
        Opens the database and the executor (a context manager factory);
        called again after a failure, every ``retry_s``.
    source
        Fixed source for every instance; ``None``: the calling AE title.
    queue_size, batch_size, flush_s
        Bounded queue length; paths registered per transaction; longest wait for a batch to fill.
    sweep_s, retry_s
        Interval of the spool sweep (0: only at start-up and reconnection); wait before
        reconnecting after a failure.
    grace_s
        Age a file without its calling AE title in its meta (written by an older
        version) must reach before a sweep registers it: a younger one may still
        be in the queue with its sender. Files that record it are registered at once.
    on_rejected
        Told each file rejected at registration (metrics).
    stale_s
        Age of a temporary file left by an interrupted write before it is removed
        (at start-up, then every ``stale_s``); see :data:`~sorter.dicom.storage.STALE_TEMPORARY_S`.
    retention
        What may be deleted from the spool once the database knows it (:mod:`sorter.retention`),
        applied every ``tick_s``.
    on_backlog
        Told the database's pending count and the oldest pending instance's age every
        ``tick_s``, and ``(None, None)`` while the database is away (metrics).
    """

    def __init__(
        self,
        spool: Path,
        connect: Backend,
        *,
        source: str | None = None,
        queue_size: int = 10_000,
        batch_size: int = 32,
        flush_s: float = 1.0,
        sweep_s: float = 300.0,
        retry_s: float = 10.0,
        grace_s: float = 60.0,
        on_rejected: Rejected | None = None,
        stale_s: float = STALE_TEMPORARY_S,
        retention: Retention = KEEP,
        on_backlog: Callable[[int | None, float | None], None] | None = None,
        tick_s: float = 15.0,
    ) -> None:
        self.retention = retention
        self.on_backlog = on_backlog
        self.tick_s = tick_s
        #: Whether the database is connected now (``/healthz``).
        self.connected = False
        self.spool = spool
        self.connect = connect
        self.source = source
        self.batch_size = max(1, batch_size)
        self.flush_s = flush_s
        self.sweep_s = sweep_s
        self.retry_s = retry_s
        self.grace_s = grace_s
        self.on_rejected = on_rejected
        self.stale_s = stale_s
        self._next_tidy = 0.0
        self._queue: queue.Queue[Received] = queue.Queue(maxsize=max(1, queue_size))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-worker", daemon=True)

    def offer(self, path: Path, calling_ae: str | None) -> bool:
        """Queue a spooled file without ever blocking; ``False`` when full (the sweep will find it)."""
        try:
            self._queue.put_nowait(Received(str(path), calling_ae))
        except queue.Full:
            log.warning("registration queue full; %s left to the next sweep", path.name)
            return False
        return True

    def start(self) -> None:
        """Start the thread (its first acts: removing stale temporary files, then the start-up sweep)."""
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Register what is queued, then end the thread (when the database is reachable)."""
        self._stopping.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._tidy()  # also while the database is away: it needs the disk only
            try:
                with self.connect() as (sessions, executor):
                    ingest = SpoolIngest(
                        sessions, executor, self.spool, self.source, self.grace_s, self.on_rejected
                    )
                    self.connected = True
                    try:
                        self._serve(ingest)
                    finally:
                        self.connected = False
                return
            except Exception as exc:  # database, model or broker away; the spool keeps the files
                if isinstance(exc, QueueUnavailable):  # registered, only the enqueue failed
                    log.warning("%s; retry in %.0f s", exc, self.retry_s)
                else:
                    log.warning(
                        "cannot register received instances (%s: %s); they stay in the spool, "
                        "retry in %.0f s",
                        type(exc).__name__,
                        exc,
                        self.retry_s,
                    )
                # Dropped: the sweep at reconnection registers these files at once, with the
                # sender from their meta, so a queue kept through the outage would only be re-checked.
                self._discard_queue()
                if self.on_backlog is not None:
                    self.on_backlog(None, None)
                if self._stopping.wait(self.retry_s):
                    return

    def _serve(self, ingest: SpoolIngest) -> None:
        ingest.sweep()
        next_sweep = self._next_sweep()
        next_tick = 0.0
        while True:
            batch = self._next_batch()
            if batch:
                ingest.register(batch)
            elif self._stopping.is_set():
                return
            if time.monotonic() >= next_sweep:
                self._tidy()
                ingest.sweep()
                next_sweep = self._next_sweep()
            if time.monotonic() >= next_tick:
                self._tick(ingest)
                next_tick = time.monotonic() + self.tick_s

    def _next_sweep(self) -> float:
        """When the next periodic sweep is due; never while ``sweep_s`` is 0 (off)."""
        return time.monotonic() + self.sweep_s if self.sweep_s > 0 else math.inf

    def _tick(self, ingest: SpoolIngest) -> None:
        """Retention and the backlog gauges; a database error here surfaces in the next batch."""
        deleted = ingest.retain(self.retention)
        if deleted:
            log.info("spool retention (%s) deleted %d files", self.retention, deleted)
        if self.on_backlog is not None:
            self.on_backlog(*ingest.backlog())

    def _tidy(self) -> None:
        """Remove stale temporary files, at most once per ``stale_s``; never raises."""
        if time.monotonic() < self._next_tidy:
            return
        self._next_tidy = time.monotonic() + self.stale_s
        try:
            remove_stale_temporaries(self.spool, self.stale_s)
        except Exception:  # disk space only: it must not stop registration
            log.exception("cannot remove stale temporary files from the spool")

    def _next_batch(self) -> list[Received]:
        batch: list[Received] = []
        deadline = time.monotonic() + self.flush_s
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            if self._stopping.is_set():
                remaining = 0.0
            try:
                batch.append(
                    self._queue.get(timeout=max(remaining, 0.0))
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _discard_queue(self) -> None:
        dropped = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            dropped += 1
        if dropped:
            log.info("%d queued files left to the sweep at reconnection", dropped)
