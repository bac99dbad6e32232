"""Watch a drop folder: classify every file once it has stopped changing.

Three ways a file reaches the :class:`~sorter.stability.StabilityTracker`:
watchdog events (created, modified, closed, moved into place), a startup pass
over the folder, and a periodic rescan. Settled files are re-checked on disk
and handed in batches to the same registration and executor that ``sorter
scan`` uses; once their instances are ``done``/``failed``/``skipped`` in the
database, the ``--after`` action (keep, move, delete) is applied to them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from watchdog.events import FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from sorter.db import queries
from sorter.domain import FailureReason, Status
from sorter.jobs.executor import Executor, submit_pending
from sorter.registrar import Registrar, Rejected
from sorter.scan import source_of
from sorter.stability import Candidate, StabilityTracker
from sorter.summary import RunSummary
from sorter.walk import Entry, error_entry, file_entry, walk

log = logging.getLogger(__name__)

TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.SKIPPED})
#: Names writers use while a file is still being written; they are never read.
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", "~")


def is_temporary(path: str) -> bool:
    """Hidden files and names with a temporary-file suffix (renamed into place when complete)."""
    name = os.path.basename(path)
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


@dataclass(frozen=True)
class After:
    """What to do with a file once its instance is in a terminal state."""

    action: str = "keep"  # keep | move | delete
    dest: Path | None = None

    @classmethod
    def parse(cls, text: str) -> After:
        """``keep``, ``delete`` or ``move:DIR``; ``ValueError`` otherwise."""
        if text in ("keep", "delete"):
            return cls(text)
        if text.startswith("move:") and text[5:]:
            return cls("move", Path(text[5:]).expanduser().absolute())
        raise ValueError(f"--after must be keep, delete or move:DIR, not {text!r}")


def free_destination(dest: Path) -> Path:
    """``dest``, or ``name-1.ext``, ``name-2.ext`` ... when it exists."""
    candidate, n = dest, 0
    while os.path.lexists(candidate):
        n += 1
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
    return candidate


def move_without_overwrite(src: Path, dest: Path) -> Path:
    """Move ``src`` to ``dest`` or a free suffixed name beside it; never replaces a file.

    ``os.rename`` silently replaces an existing destination on POSIX, so the move
    is a hard link (which fails when the name is taken) then an unlink; across
    file systems, an exclusive-create copy (flushed to disk) then an unlink.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        target = free_destination(dest)
        try:
            os.link(src, target)
        except FileExistsError:
            continue  # taken since we looked: try the next suffix
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                raise
            try:
                with open(src, "rb") as reader, open(target, "xb") as writer:
                    shutil.copyfileobj(reader, writer)
                    writer.flush()
                    os.fsync(writer.fileno())
            except FileExistsError:
                continue
            shutil.copystat(src, target)
        os.unlink(src)
        return target


#: Seconds between looks at whether the watched folder itself is still there.
ROOT_CHECK_S = 2.0


def _stop_observer(observer: BaseObserver) -> None:
    observer.stop()
    if observer.is_alive():
        observer.join()


class _Events(FileSystemEventHandler):
    """The watchdog adapter: every event becomes a stat reported to the tracker."""

    def __init__(self, note: Callable[[str], None], forget: Callable[[str], None]) -> None:
        self.note, self.forget = note, forget

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.note(os.fsdecode(event.src_path))

    on_modified = on_created
    on_closed = on_created

    def on_moved(self, event: FileSystemMovedEvent) -> None:
        if not event.is_directory:
            self.forget(os.fsdecode(event.src_path))
            self.note(os.fsdecode(event.dest_path))

    def on_deleted(self, event: FileSystemEvent) -> None:
        self.forget(os.fsdecode(event.src_path))


class Watcher:
    """One watched folder: tracker, observer, batches through the scan machinery, ``--after``.

    Parameters
    ----------
    root
        The drop folder (watched recursively).
    sessions
        Session factory (one short session per batch step).
    executor
        Where committed instance ids are classified (the in-process executor).
    summary
        Counters of the whole run.
    tracker
        The stability tracker (its settle time decides when a file is read).
    after
        What to do with files whose instance reached a terminal state.
    source
        Fixed source name; ``None``: the first folder under ``root``.
    batch_size
        Settled files handed on per step.
    rescan_s
        Seconds between full rescans of ``root``.
    exclude
        Absolute paths never to read (the embedded database and its journals).
    on_rejected
        Told each file rejected at registration (see :class:`~sorter.scan.Scan`).
    """

    def __init__(
        self,
        root: str,
        sessions: sessionmaker[Session],
        executor: Executor,
        summary: RunSummary,
        *,
        tracker: StabilityTracker,
        after: After = After(),
        source: str | None = None,
        batch_size: int = 32,
        rescan_s: float = 60.0,
        exclude: frozenset[str] = frozenset(),
        on_rejected: Rejected | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.sessions = sessions
        self.executor = executor
        self.tracker = tracker
        self.after = after
        self.batch_size = max(1, batch_size)
        self.rescan_s = rescan_s
        self.exclude = exclude
        self.summary = summary
        # The scan's registration (sorter.registrar): the source is fixed, or the first folder
        # under the watched one.
        self.registrar = Registrar(
            sessions,
            executor,
            lambda entry, _old: {"source": source or source_of(entry.path, self.root)},
            summary=summary,
            on_rejected=on_rejected,
        )
        self._lock = threading.Lock()  # the observer thread and the main loop share the tracker
        self._resume_due = False
        #: Paths that are no readable file (a broken or looping link, a FIFO, an unreadable
        #: folder ...), waiting to be recorded with their reason, as ``sorter scan`` records them.
        self._problems: dict[str, Entry] = {}
        #: The reason recorded for each such path in this run: a rescan does not record it again.
        self._recorded: dict[str, str] = {}

    def note(self, path: str) -> None:
        """Report the current size and mtime of ``path`` to the tracker; never raises."""
        if path in self.exclude or is_temporary(path):
            return
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not os.path.lexists(path):
                # Gone already (a temp file renamed, a deletion): its own event follows.
                log.debug("cannot stat %s: %s", path, exc)
                self.forget(path)
            else:  # a dangling or looping link, a file we may not read
                self._problem(error_entry(path, exc, os.path.islink(path)))
            return
        entry = file_entry(path, st)
        if entry.reason is not None:
            self._problem(entry)  # a FIFO, socket or device: never opened
            return
        with self._lock:
            self._problems.pop(path, None)
            self._recorded.pop(path, None)
            self.tracker.observe(path, st.st_size, st.st_mtime_ns)

    def forget(self, path: str) -> None:
        """Stop tracking ``path``."""
        with self._lock:
            self.tracker.forget(path)
            self._problems.pop(path, None)

    def _problem(self, entry: Entry) -> None:
        assert entry.reason is not None
        with self._lock:
            self.tracker.forget(entry.path)
            if self._recorded.get(entry.path) != entry.reason:
                self._problems[entry.path] = entry

    def rescan(self) -> None:
        """Walk the folder and report every file (the startup pass, then every ``rescan_s``)."""
        for entry in walk([self.root], self.exclude):
            if entry.path == self.root and entry.reason == FailureReason.VANISHED:
                continue  # the folder itself, gone since it was last looked at (run() says so)
            if is_temporary(entry.path):
                continue
            if entry.reason is not None:
                self._problem(entry)
            elif entry.size is not None and entry.mtime_ns is not None:
                with self._lock:
                    self.tracker.observe(entry.path, entry.size, entry.mtime_ns)

    def root_identity(self) -> tuple[int, int] | None:
        """``(device, inode)`` of the watched folder; ``None`` while it is gone or no folder."""
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    def _start_observer(self) -> BaseObserver:
        observer = Observer()
        observer.schedule(_Events(self.note, self.forget), self.root, recursive=True)
        try:
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit: the rescan still finds every file
            log.warning(
                "no file events for %s (%s); relying on the rescan every %s s", self.root, exc, self.rescan_s
            )
        return observer

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set; the batch in progress is finished and committed first.

        A watched folder that disappears (deleted, moved away, a share unmounted) takes its file
        events with it, and one made again in its place (a remount, ``rm -rf`` and ``mkdir``) has
        none: the folder is looked at every :data:`ROOT_CHECK_S` seconds, its loss is logged once,
        and when it is back (or another folder stands in its place) it is watched and walked anew.
        """
        observer = self._start_observer()  # before the startup pass, so that no file falls between
        watched = self.root_identity()
        try:
            self.rescan()
            self._resume_pending()
            # inotify drops events when its queue overflows, and network file systems
            # (NFS, SMB) deliver none for changes made on another host: the periodic
            # rescan finds whatever the events missed, however long it takes to notice.
            next_rescan = time.monotonic() + self.rescan_s
            next_root_check = time.monotonic() + ROOT_CHECK_S
            tick = min(max(self.tracker.settle_s / 3, 0.05), 1.0)
            while not stop.is_set():
                with self._lock:
                    ready = self.tracker.ready(limit=self.batch_size)
                if ready:
                    self.step(ready)
                    continue
                if self._problems:
                    self.record_problems()
                    continue
                if time.monotonic() >= next_root_check:
                    next_root_check = time.monotonic() + ROOT_CHECK_S
                    identity = self.root_identity()
                    if identity != watched:
                        if identity is None:
                            log.warning(
                                "the watched folder %s is gone (deleted, moved or unmounted): waiting for it",
                                self.root,
                            )
                        else:
                            log.warning("the watched folder %s is there again: watching it anew", self.root)
                            _stop_observer(observer)
                            observer = self._start_observer()
                            next_rescan = 0.0  # walk it now: its files came without events
                        watched = identity
                if time.monotonic() >= next_rescan:
                    if watched is not None:
                        self.rescan()
                    if self._resume_due:
                        self._resume_pending()
                    next_rescan = time.monotonic() + self.rescan_s
                stop.wait(tick)
        finally:
            _stop_observer(observer)

    def _resume_pending(self) -> None:
        """Classify instances under the folder left ``pending`` (a killed run, a failed batch)."""
        self._resume_due = False
        try:
            submit_pending(
                self.sessions,
                self.executor,
                under=[self.root.rstrip(os.sep) + os.sep],
                on_page=self._count_resumed,
            )
        except Exception:
            log.exception("resuming pending instances failed; trying again at the next rescan")
            self._resume_due = True

    def _count_resumed(self, ids: list[int]) -> None:
        self.summary.resumed += len(ids)

    def step(self, ready: Sequence[Candidate]) -> None:
        """Register and classify one batch of settled files, then apply ``--after``; never raises."""
        entries: list[Entry] = []
        for item in ready:
            try:
                st = os.stat(item.path)
            except FileNotFoundError:
                continue  # removed or renamed since it settled; a new name has its own event
            except OSError as exc:  # recorded with its reason by the registration
                log.warning("cannot stat %s: %s", item.path, exc)
                entries.append(Entry(item.path, item.size, item.mtime_ns))
                continue
            if (st.st_size, st.st_mtime_ns) != (item.size, item.mtime_ns):
                self.forget(item.path)
                self.note(item.path)  # changed after its last observation: settle again
                continue
            entries.append(file_entry(item.path, st))
        if not entries:
            return
        try:
            # The same registration as ``sorter scan`` (ledger check, headers, one
            # commit), then every submitted batch classified and committed.
            self.registrar.register(entries)
            self.executor.drain()
            self._apply_after([entry.path for entry in entries])
        except Exception:  # a database outage must not end the watch; the files are tried again
            log.exception("batch of %d files failed; they will be retried", len(entries))
            self._resume_due = True  # registered but unclassified ones are pending in the database
            for entry in entries:
                self.forget(entry.path)

    def record_problems(self) -> None:
        """Record each path that is no readable file with its reason (``failed``/``skipped``); never raises.

        They are never moved or deleted by ``--after``: a FIFO or a link is not the watcher's to touch.
        """
        with self._lock:
            entries = list(self._problems.values())[: self.batch_size]
        try:
            self.registrar.register(entries)
        except Exception:  # a database outage must not end the watch; the next rescan finds them again
            log.exception("recording %d unreadable paths failed; they will be retried", len(entries))
            with self._lock:
                for entry in entries:
                    self._problems.pop(entry.path, None)
            return
        with self._lock:
            for entry in entries:
                assert entry.reason is not None
                if self._problems.get(entry.path) is entry:
                    del self._problems[entry.path]
                self._recorded[entry.path] = entry.reason

    def _apply_after(self, paths: Sequence[str]) -> None:
        if self.after.action == "keep":
            return
        with self.sessions() as session:
            rows = queries.finished_files(session, paths, TERMINAL)
        moves: dict[int, str] = {}
        ledger: list[dict[str, object]] = []
        for row in rows:
            src = Path(row.path)
            try:
                if self.after.action == "delete":
                    src.unlink()
                    continue
                assert self.after.dest is not None
                st = src.stat()
                dest = move_without_overwrite(src, self.after.dest / src.relative_to(self.root))
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot %s %s: %s", self.after.action, src, exc)
                continue
            if row.at == row.path:
                moves[row.id] = str(dest)
            ledger.append(
                {
                    "path": str(dest),
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "ctime_ns": st.st_ctime_ns,
                    "mode": st.st_mode,
                    "instance_id": row.id,
                }
            )
        if moves or ledger:
            # The instances follow their files, so reports and re-scans find them at the new place.
            with self.sessions() as session:
                queries.move_instances(session, moves)
                queries.upsert_files(session, ledger)
                session.commit()
