"""Writing a file so that no reader ever sees half of it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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
    syncs the folder if the new name must survive a power cut); ``permissions`` replaces
    ``mkstemp``'s 0600; ``open_kw`` goes to :func:`os.fdopen` (``newline``, ``encoding``).
    """
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix or path.name + ".", suffix=suffix)
    try:
        with os.fdopen(handle, mode, **open_kw) as out:
            yield out
            out.flush()
            if fsync:
                os.fsync(out.fileno())
        if permissions is not None:
            os.chmod(name, permissions)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
