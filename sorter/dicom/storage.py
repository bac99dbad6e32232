"""Durable writes of received instances into the spool (ARCHITECTURE §7).

A C-STORE is acknowledged only after :func:`store_instance` returns: the bytes
are in a temporary file in the destination folder, flushed to the disk
(``fsync``), renamed over the final name (``os.replace``, atomic on POSIX) and
the rename itself made durable by an ``fsync`` of the folder. A crash at any
point leaves either the old file, the new file, or a stray temporary file
(``.<sop>.dcm.XXXXXXXX.part``, :func:`is_temporary_name`) that readers skip and
:func:`remove_stale_temporaries` removes once it is old enough.

The calling AE title is recorded in the file itself, in the File Meta
Information element (0002,0016) Source Application Entity Title (PS3.10 §7.1;
dcmtk's storescp does the same). The meta is ours, built by the receiver, not
sent by the peer; the data set stays byte for byte as received. A file found by
a sweep after the registration queue was lost (an outage, a ``kill -9``) is
thus registered with its sender (:func:`source_ae`).

Layout: ``spool/<study>/<series>/<sop>.dcm``. UIDs come from the network and
are never trusted as path parts: a valid UID (PS3.5 §9.1: digits and dots, at
most 64 characters, no empty component) is used as is, anything else becomes
``x-`` and the first 40 hex digits of its SHA-256, so ``..``, slashes or NUL
bytes can never leave the spool.

Duplicate policy: the same SOP Instance UID received again with identical
content (data set and meta, the calling AE title aside) is a success that
rewrites nothing, so the first sender stays recorded; different bytes replace the spooled
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
import stat
import time
from pathlib import Path

from sorter.fsutil import atomic_file

log = logging.getLogger(__name__)

#: PS3.5 §9.1: components of digits without leading zeros (except "0"), dots between, 64 chars at most.
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SUFFIX = ".dcm"
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".part"
#: ``tempfile.mkstemp(prefix=".<final name>.", suffix=".part")``: random letters, digits and ``_``.
_TEMP_NAME = re.compile(
    rf"^{re.escape(_TEMP_PREFIX)}.+{re.escape(SUFFIX)}\.[a-z0-9_]+{re.escape(_TEMP_SUFFIX)}$"
)
#: Age after which a temporary file can only be the leftover of a writer that died.
#: A live writer holds one only while it writes bytes already in memory and
#: fsyncs them, and each write stamps the mtime: its age stays below that
#: duration, seconds, a few minutes for a very large instance on a saturated or
#: network disk. An hour is far beyond that, and beyond any clock skew between a
#: network file system's server and us, so no listener sharing the spool loses a
#: write in progress to the clean-up. (Names are never reused: mkstemp creates
#: each exclusively, so an old name cannot become a live write again.)
STALE_TEMPORARY_S = 3600.0

# File Meta Information: after the 128-byte preamble and "DICM", always explicit VR little endian.
_META_AT = 132
_GROUP_LENGTH, _SOURCE_AE = 0x00020000, 0x00020016
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
#: Enough for the File Meta Information we write (about 250 bytes).
_META_READ = 4096


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


def is_temporary_name(name: str) -> bool:
    """True for the name of a temporary file :func:`store_instance` writes (``.<sop>.dcm.XXXXXXXX.part``).

    Such a file is a write in flight (renamed into place when complete) or the
    leftover of a crash: never an instance to read.
    """
    return _TEMP_NAME.match(name) is not None


def remove_stale_temporaries(spool: Path, older_than_s: float = STALE_TEMPORARY_S) -> int:
    """Remove the temporary files under ``spool`` not modified for ``older_than_s``; return how many.

    Only names :func:`is_temporary_name` matches are touched, and only regular
    files. Errors are logged, never raised: the leftovers cost disk space only.
    """
    cutoff = time.time() - older_than_s
    removed = 0
    for folder, _folders, names in os.walk(spool):  # links not followed: nothing outside the spool
        for name in names:
            if not is_temporary_name(name):
                continue
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
                if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove the stale temporary file %s: %s", path, exc.strerror or exc)
                continue
            removed += 1
    if removed:
        log.info("removed %d temporary files left in the spool by interrupted writes", removed)
    return removed


def _meta(buf: bytes) -> tuple[list[tuple[int, bytes]], int] | None:
    """The File Meta Information elements of a Part 10 stream (tag, whole element) and where it ends.

    ``None`` when ``buf`` does not start like a Part 10 file or its meta is
    malformed or longer than ``buf``.
    """
    if len(buf) < _META_AT + 8 or buf[128:_META_AT] != b"DICM":
        return None
    elements: list[tuple[int, bytes]] = []
    pos = _META_AT
    while pos + 8 <= len(buf) and buf[pos : pos + 2] == b"\x02\x00":
        tag = 0x00020000 | int.from_bytes(buf[pos + 2 : pos + 4], "little")
        if buf[pos + 4 : pos + 6] in _LONG_VRS:
            start, length = pos + 12, int.from_bytes(buf[pos + 8 : pos + 12], "little")
        else:
            start, length = pos + 8, int.from_bytes(buf[pos + 6 : pos + 8], "little")
        end = start + length
        if end > len(buf):
            return None
        elements.append((tag, buf[pos:end]))
        pos = end
    return (elements, pos) if elements else None


def _ae_value(title: str | None) -> bytes | None:
    """``title`` as an AE value (PS3.5 §6.2: 16 ASCII characters at most, no control
    characters or backslash, padded to an even length with a space); ``None`` when it is not one."""
    text = (title or "").strip()
    if not text or len(text) > 16 or not text.isascii() or not text.isprintable() or "\\" in text:
        return None
    value = text.encode("ascii")
    return value + b" " * (len(value) % 2)


def _content(elements: list[tuple[int, bytes]]) -> tuple[bytes, ...]:
    """What identifies a stored instance in its meta: everything but the group length and the sender."""
    return tuple(raw for tag, raw in elements if tag not in (_GROUP_LENGTH, _SOURCE_AE))


def _with_source_ae(
    encoded: bytes, calling_ae: str | None
) -> tuple[bytes, memoryview, tuple[bytes, ...] | None]:
    """Split ``encoded`` into a new head (preamble and meta, with the sender) and the data set.

    Returns the head, the data set (a view, not a copy: instances can be large)
    and the meta's identifying content (``None`` when ``encoded`` is not a
    Part 10 stream: it is then all "data set", stored as is).
    """
    whole = memoryview(encoded)
    parsed = _meta(encoded[:_META_READ])
    if parsed is None:
        return b"", whole, None
    elements, end = parsed
    value = _ae_value(calling_ae)
    if value is not None:
        element = b"\x02\x00\x16\x00AE" + len(value).to_bytes(2, "little") + value
        elements = sorted([*(e for e in elements if e[0] != _SOURCE_AE), (_SOURCE_AE, element)])
    body = b"".join(raw for tag, raw in elements if tag != _GROUP_LENGTH)
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little")
    return encoded[:_META_AT] + group_length + body, whole[end:], _content(elements)


def source_ae(path: str | os.PathLike[str]) -> str | None:
    """The calling AE title :func:`store_instance` recorded in a spooled file's meta; ``None`` when absent.

    Reads only the File Meta Information (a few hundred bytes); never raises.
    """
    try:
        with open(path, "rb") as file:
            parsed = _meta(file.read(_META_READ))
    except OSError:
        return None  # the registration reads the file and records why it cannot
    if parsed is None:
        return None
    for tag, raw in parsed[0]:
        if tag == _SOURCE_AE:
            text = raw[8:].decode("ascii", "replace").strip(" \x00")
            return text if _ae_value(text) is not None else None
    return None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_content(path: Path, data_set: memoryview, content: tuple[bytes, ...] | None) -> bool:
    """True when ``path`` holds this data set and meta, the sender aside (read only when sizes match)."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            offset = 0
            if content is not None:
                parsed = _meta(file.read(_META_READ))
                if parsed is None or _content(parsed[0]) != content:
                    return False
                offset = parsed[1]
            if size - offset != len(data_set):
                return False
            file.seek(offset)
            return file.read() == data_set
    except FileNotFoundError:
        return False


def store_instance(
    spool: Path, encoded: bytes, study_uid: str, series_uid: str, sop_uid: str, calling_ae: str | None = None
) -> Path:
    """Write one received instance durably into the spool; return its path.

    Parameters
    ----------
    spool
        The spool folder (created when missing).
    encoded
        The complete Part 10 file (preamble, file meta, data set) as received.
    study_uid, series_uid, sop_uid
        The instance's UIDs; invalid ones are hashed into safe names.
    calling_ae
        The sender, recorded in the meta as (0002,0016) Source Application
        Entity Title; ``None`` or an invalid AE title leaves the meta as given.

    Returns
    -------
    Path
        The final path. When it already held the same content (from any sender)
        nothing was written.

    Raises
    ------
    OSError
        The write or its ``fsync`` failed (disk full, I/O error): nothing was
        stored under the final name, and the caller must not acknowledge.
    """
    target = spool_path(spool, study_uid, series_uid, sop_uid)
    folder = target.parent
    head, data_set, content = _with_source_ae(encoded, calling_ae)
    if _same_content(target, data_set, content):
        log.debug("SOP Instance UID %s already spooled with identical content", sop_uid)
        return target
    existed = target.exists()
    created = [d for d in (folder, folder.parent) if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for new in created:  # a new folder's entry in its parent must be durable too
        _fsync_dir(new.parent)
    with atomic_file(target, prefix=_TEMP_PREFIX + target.name + ".", suffix=_TEMP_SUFFIX, fsync=True) as out:
        out.write(head)
        out.write(data_set)
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
