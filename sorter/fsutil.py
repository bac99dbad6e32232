"""Writing a file so that no reader ever sees half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask_from_proc() -> int | None:
    """The process's umask as Linux (>= 4.7) tells it, without changing it; ``None`` elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_by_setting() -> int:
    # Where the kernel cannot tell, the only way to read the umask is to set it: done once, at
    # import, before any thread of ours creates files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FROM_PROC = _umask_from_proc()
_IMPORT_UMASK: int = _umask_by_setting() if _FROM_PROC is None else _FROM_PROC


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file now: 0666 less the umask.

    ``mkstemp`` creates 0600 whatever the umask, so a file written through a temporary name would
    be unreadable to the group a service's ``UMask=0027`` is there to let in (a rule filing into a
    folder researchers read, a manifest for the training team).
    """
    mask = _umask_from_proc()
    return 0o666 & ~(_IMPORT_UMASK if mask is None else mask)


@contextmanager
def atomic_file(
    path: Path,
    mode: str = "wb",
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
    fsync: bool = False,
    permissions: int | None = None,
    **open_kw: Any,
) -> Iterator[IO[Any]]:
    """A file object whose content replaces ``path`` only once the ``with`` block succeeds.

    It is a temporary file of its own in the same folder (so concurrent writers never write into
    each other's), renamed over ``path`` (atomic on POSIX); on any error it is removed and
    ``path`` is untouched. ``fsync`` flushes it to the disk before the rename (the caller then
    syncs the folder if the new name must survive a power cut); the file gets ``permissions``,
    by default those of any new file (:func:`new_file_mode`, not ``mkstemp``'s 0600);
    ``open_kw`` goes to :func:`os.fdopen` (``newline``, ``encoding``).
    """
    path = Path(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix or path.name + ".", suffix=suffix)
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(handle, mode, **open_kw) as out:
            yield out
            out.flush()
            # Before the fsync, so that the mode is as durable as the content.
            os.fchmod(out.fileno(), new_file_mode() if permissions is None else permissions)
            if fsync:
                os.fsync(out.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
