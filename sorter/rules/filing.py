"""The ``file`` action: put an instance's file at its rule's target, atomically, never over another.

A copy is written to a temporary name in the target's folder and hard-linked to the target:
``link`` fails when the name exists, so two workers filing at once, or a file that appeared
meanwhile, are never overwritten (``os.replace`` would overwrite). A target that already holds the
same bytes counts as done, which makes every retry and re-run safe.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sorter.errors import describe

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Filed:
    """What one ``file`` action did: ``error`` is ``None`` when the file is in place."""

    target: Path
    error: str | None = None
    detail: str | None = None


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def same_content(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file or hold the same bytes."""
    try:
        if os.path.samefile(a, b):
            return True
        return os.path.getsize(a) == os.path.getsize(b) and _digest(a) == _digest(b)
    except OSError:
        return False


def _reason(exc: OSError) -> str:
    return {
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
        errno.ENOSPC: "no_space",
        errno.EXDEV: "cross_device",
        errno.ENOENT: "source_missing",
        errno.EROFS: "read_only",
    }.get(exc.errno or 0, "os_error")


def file_instance(source: Path, target: Path, how: str) -> Filed:
    """Copy, hard-link or move ``source`` to ``target``; never overwrite a different file."""
    if target.exists() or target.is_symlink():
        if source.exists() and same_content(source, target):
            if how == "move" and not os.path.samefile(source, target):
                source.unlink()
            return Filed(target)
        if how == "move" and not source.exists():
            return Filed(target)  # moved by an earlier try that was cut off before it was recorded
        return Filed(target, "target_exists", f"{target} exists and holds other content; not overwritten")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if how == "link":
            os.link(source, target)
        else:
            _copy_then_link(source, target)
            if how == "move":
                source.unlink()
    except FileExistsError:
        return file_instance(source, target, how)  # appeared meanwhile: the same bytes, or refused
    except OSError as exc:
        hint = '; a hard link cannot cross file systems: use how = "copy"' if exc.errno == errno.EXDEV else ""
        return Filed(target, _reason(exc), describe(exc) + hint)
    return Filed(target)


def _copy_then_link(source: Path, target: Path) -> None:
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _CHUNK)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(source, name)
        os.link(name, target)
    finally:
        Path(name).unlink(missing_ok=True)
