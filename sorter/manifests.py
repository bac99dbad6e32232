"""What ``sorter export`` and ``sorter-train manifest`` share: group keys and atomic CSV writes.

Both write manifests that ``sorter-train`` reads, so the group of an instance
(a hashed Study Instance UID, never a patient identifier) and the on-disk
format must be computed in one place.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from sorter.fsutil import atomic_file


def group_key(study_uid: str | None, fallback: str) -> str:
    """16 hex digits of sha256 over the Study Instance UID (``path:<fallback>`` without one)."""
    return hashlib.sha256((study_uid or f"path:{fallback}").encode()).hexdigest()[:16]


def relative_path(path: str | os.PathLike[str], manifest: Path) -> str:
    """``path`` relative to the manifest's folder, with forward slashes (the manifest convention)."""
    return Path(os.path.relpath(path, Path(manifest).absolute().parent)).as_posix()


class RelativePaths:
    """:func:`relative_path` for the many rows of one manifest.

    ``os.path.relpath`` makes both paths absolute and normal again on every call: it was half of
    ``sorter export``'s time on an archive of a million instances. Files share folders, so each
    folder is made relative once and its files' names are appended.
    """

    def __init__(self, manifest: Path) -> None:
        self._base = Path(manifest).absolute().parent
        self._folders: dict[str, str] = {}

    def __call__(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to the manifest's folder, as :func:`relative_path` gives it."""
        path = os.fspath(path)
        folder, name = os.path.split(path)
        if name in ("", os.curdir, os.pardir):  # not a file's name: normalising changes the folder
            return relative_path(path, self._base / "manifest")
        rel = self._folders.get(folder)
        if rel is None:
            rel = self._folders[folder] = Path(os.path.relpath(folder or os.curdir, self._base)).as_posix()
        return name if rel == "." else f"{rel}/{name}"


def write_csv_atomic(out: Path, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV via a temporary file and a rename: an interrupted run never leaves half a file."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "w", prefix=f".{out.name}.", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
