"""Decide when a file in a drop folder has stopped changing; pure, no I/O.

A copy into the watched folder shows up long before it is complete: as a
created file of a few bytes, then as a stream of modifications. The watcher
reports every ``(size, mtime)`` it sees to a :class:`StabilityTracker`, which
hands a file out once that pair has not changed for ``settle_s`` seconds.
The caller re-checks the file on disk before using it (it may have changed
after the last observation) and reports it again if it did.

Memory is bounded twice: at most ``max_tracked`` files are waiting (the oldest
is dropped first; a periodic rescan finds it again), and at most ``max_tracked``
handed-out ``(path, size, mtime)`` signatures are remembered so that a rescan of
a folder whose files stay in place does not hand them out again (when one is
forgotten, the database ledger still recognises the unchanged file).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Files waiting to settle, and handed-out signatures remembered, at most.
MAX_TRACKED = 100_000


@dataclass(frozen=True)
class Candidate:
    """A file whose size and mtime have not changed for the settle time."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # clock time of the last change


class StabilityTracker:
    """Track file sizes and mtimes; report files that stayed the same for ``settle_s``.

    Parameters
    ----------
    settle_s
        Seconds a file's size and mtime must stay unchanged.
    clock
        Monotonic clock, in seconds (tests pass a fake one).
    max_tracked
        Bound on the files waiting and on the handed-out signatures remembered.

    Not thread-safe: the caller serialises calls (the watcher holds a lock).
    """

    def __init__(
        self, settle_s: float, clock: Callable[[], float] = time.monotonic, max_tracked: int = MAX_TRACKED
    ) -> None:
        self.settle_s = settle_s
        self.clock = clock
        self.max_tracked = max(1, max_tracked)
        self.dropped = 0  # waiting files dropped to stay within ``max_tracked``
        self._waiting: OrderedDict[str, _Seen] = OrderedDict()
        self._handed: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def observe(self, path: str, size: int, mtime_ns: int) -> None:
        """Record what ``path`` looks like now; a change restarts its settle time.

        A file already handed out with this very size and mtime is ignored.
        """
        seen = self._waiting.get(path)
        if seen is not None:
            if (seen.size, seen.mtime_ns) != (size, mtime_ns):
                seen.size, seen.mtime_ns, seen.since = size, mtime_ns, self.clock()
            return
        if self._handed.get(path) == (size, mtime_ns):
            return
        self._handed.pop(path, None)
        self._waiting[path] = _Seen(size, mtime_ns, self.clock())
        while len(self._waiting) > self.max_tracked:
            self._waiting.popitem(last=False)
            self.dropped += 1

    def forget(self, path: str) -> None:
        """Stop tracking ``path`` (deleted, moved away, or vanished before it was read)."""
        self._waiting.pop(path, None)
        self._handed.pop(path, None)

    def ready(self, now: float | None = None, limit: int | None = None) -> list[Candidate]:
        """Hand out the files unchanged for ``settle_s`` at ``now``, oldest first, and stop tracking them.

        Parameters
        ----------
        now
            Clock time (default: the tracker's clock).
        limit
            At most this many files (the rest stay for the next call).
        """
        now = self.clock() if now is None else now
        out: list[Candidate] = []
        for path, seen in list(self._waiting.items()):
            if limit is not None and len(out) >= limit:
                break
            if now - seen.since >= self.settle_s:
                out.append(Candidate(path, seen.size, seen.mtime_ns))
        for item in out:
            del self._waiting[item.path]
            self._handed[item.path] = (item.size, item.mtime_ns)
            self._handed.move_to_end(item.path)
        while len(self._handed) > self.max_tracked:
            self._handed.popitem(last=False)
        return out
