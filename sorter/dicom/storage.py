"""Durable writes of received instances into the spool (ARCHITECTURE §7).

A C-STORE is acknowledged only after :func:`store_instance` returns: the bytes
are in a temporary file in the destination folder, flushed to the disk
(``fsync``), renamed over the final name (``os.replace``, atomic on POSIX) and
the rename itself made durable by an ``fsync`` of the folder. A crash at any
point leaves either the old file, the new file, or a stray temporary file that
readers ignore (its name starts with a dot and does not end in ``.dcm``).

Layout: ``spool/<study>/<series>/<sop>.dcm``. UIDs come from the network and
are never trusted as path parts: a valid UID (PS3.5 §9.1: digits and dots, at
most 64 characters, no empty component) is used as is, anything else becomes
``x-`` and the first 40 hex digits of its SHA-256, so ``..``, slashes or NUL
bytes can never leave the spool.

Duplicate policy: the same SOP Instance UID received again with byte-identical
content is a success that rewrites nothing; different bytes replace the spooled
copy atomically (the newer copy wins, as a PACS re-send after a correction
should) and the UID is logged. The ledger then sees a changed file and the
instance is read and classified again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: PS3.5 §9.1: components of digits without leading zeros (except "0"), dots between, 64 chars at most.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SUFFIX = ".dcm"
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".part"


def is_valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 §9.1)."""
    return len(uid) <= 64 and _UID.match(uid) is not None


def safe_name(uid: str | None) -> str:
    """A file-name-safe stand-in for ``uid``: the UID itself when valid, else a hash of it."""
    text = (uid or "").strip().rstrip("\x00").strip()
    if text and is_valid_uid(text):
        return text
    return "x-" + hashlib.sha256((uid or "").encode("utf-8", "surrogateescape")).hexdigest()[:40]


def spool_path(spool: Path, study_uid: str | None, series_uid: str | None, sop_uid: str | None) -> Path:
    """Where an instance with these UIDs lives in the spool."""
    return spool / safe_name(study_uid) / safe_name(series_uid) / (safe_name(sop_uid) + SUFFIX)


def is_spooled_file(name: str) -> bool:
    """True for a final spool file name (temporary files are excluded)."""
    return name.endswith(SUFFIX) and not name.startswith(_TEMP_PREFIX)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


def store_instance(spool: Path, encoded: bytes, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Write one received instance durably into the spool; return its path.

    Parameters
    ----------
    spool
        The spool folder (created when missing).
    encoded
        The complete Part 10 file (preamble, file meta, data set) as received.
    study_uid, series_uid, sop_uid
        The instance's UIDs; invalid ones are hashed into safe names.

    Returns
    -------
    Path
        The final path. When it already held identical bytes nothing was written.

    Raises
    ------
    OSError
        The write or its ``fsync`` failed (disk full, I/O error): nothing was
        stored under the final name, and the caller must not acknowledge.
    """
    target = spool_path(spool, study_uid, series_uid, sop_uid)
    folder = target.parent
    if _same_bytes(target, encoded):
        log.debug("SOP Instance UID %s already spooled with identical bytes", sop_uid)
        return target
    existed = target.exists()
    created = [d for d in (folder, folder.parent) if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for new in created:  # a new folder's entry in its parent must be durable too
        _fsync_dir(new.parent)
    fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX + target.name + ".", suffix=_TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(encoded)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    if existed:
        log.warning(
            "SOP Instance UID %s received again with different bytes; the newer copy replaced it", sop_uid
        )
    return target


def has_free_space(path: Path, floor_bytes: int) -> bool:
    """True when the volume holding ``path`` (or its nearest existing parent) has ``floor_bytes`` free."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free >= floor_bytes
