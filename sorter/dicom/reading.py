"""Open a DICOM file and turn every way that can fail into a typed error.

pydicom is lenient: it returns a partial data set for a file cut short, and
with ``force=True`` it "reads" any bytes at all. This module restores the
distinctions the pipeline stores as failure reasons: unreadable (the OS
said no), not DICOM, and truncated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sorter.errors import NotDicom, TruncatedFile, UnreadableFile

logger = logging.getLogger(__name__)

#: Groups a data set without preamble may start with, read as little or big endian:
#: file meta (0002), directory (0004), identification (0008).
_RAW_START_GROUPS = frozenset({0x0002, 0x0004, 0x0008})
#: (7FE0,0010) Pixel Data, (7FE0,0008) Float and (7FE0,0009) Double Float Pixel Data.
PIXEL_TAGS: tuple[int, ...] = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_BYTE_ORDERS: tuple[Literal["little", "big"], ...] = ("little", "big")
_UNDEFINED_LENGTH = 0xFFFFFFFF


class _TrackedFile:
    """A read-only file wrapper that remembers whether the reader ran off the end.

    pydicom silently returns short values for a truncated file; a read that
    comes back short, or a seek past the end, is the only evidence left.
    """

    def __init__(self, fp: BinaryIO, size: int, name: str) -> None:
        self._fp = fp
        self.size = size
        self.name = name
        self.hit_end = False  # some read returned fewer bytes than asked for
        self.overrun = False  # a seek skipped past the end (a length longer than the file)
        self.partial_tail = b""  # what the latest read returned if it was some, but not all

    def read(self, n: int = -1) -> bytes:
        data = self._fp.read(n)
        self.partial_tail = data if n is not None and 0 < len(data) < n else b""
        # Asking for the next 8-byte element header at the very end and getting
        # nothing is how every well-formed data set ends; anything else short is not.
        if n is not None and n > 0 and len(data) < n and (data or n != 8):
            self.hit_end = True
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        pos = self._fp.seek(offset, whence)
        if pos > self.size:
            self.overrun = True
        return pos

    def tell(self) -> int:
        return self._fp.tell()

    def at_end(self) -> bool:
        return self.hit_end or self.overrun or self._fp.tell() >= self.size


def _looks_like_raw_dataset(head: bytes, size: int) -> bool:
    """True when `head` starts like a data set without preamble (ACR-NEMA, raw dumps).

    The first element must be in an identifying group and either name an
    explicit VR (two capital letters) or have an implicit-VR length that fits the file.
    """
    if len(head) < 8:
        return False
    for order in _BYTE_ORDERS:
        group = int.from_bytes(head[0:2], order)
        if group not in _RAW_START_GROUPS:
            continue
        explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
        implicit_length = int.from_bytes(head[4:8], order)
        if explicit_vr or implicit_length <= size - 8:
            return True
    return False


def transfer_syntax_of(ds: Dataset) -> UID:
    """Return the data set's transfer syntax, guessing one when there is no file meta.

    Files without File Meta Information (ACR-NEMA, raw dumps) carry no
    (0002,0010); pydicom records the encoding it detected while reading,
    and implicit VR little endian is the default the standard gives such data.
    """
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        return UID(str(tsyntax).strip("\x00 "))
    implicit, little = ds.original_encoding
    if implicit is False:
        return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    return ImplicitVRLittleEndian


def _short_element(ds: Dataset) -> BaseTag | None:
    """Return the tag of a top-level element whose value is shorter than its length."""
    for tag, elem in ds._dict.items():
        if (
            isinstance(elem, RawDataElement)
            and elem.value is not None
            and elem.length != _UNDEFINED_LENGTH
            and len(elem.value) < elem.length
        ):
            return tag
    return None


def read_dataset(path: str | os.PathLike[str], specific_tags: Sequence[Any] | None = None) -> Dataset:
    """Read a DICOM file, falling back to ``force=True`` for files without preamble.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    specific_tags : sequence, optional
        When given, read only these elements and stop before the pixel data
        (a header read); otherwise read the whole file, pixel data included.

    Returns
    -------
    pydicom.dataset.Dataset
        The data set; ``file_meta.TransferSyntaxUID`` is always set (guessed
        for files without File Meta Information).

    Raises
    ------
    UnreadableFile
        The file is missing, a directory, or cannot be opened.
    NotDicom
        The bytes are neither a DICOM file nor a raw data set.
    TruncatedFile
        The file ends inside the data set.
    """
    name = os.fspath(path)
    try:
        with Path(name).open("rb") as fp:
            ds, tracked, forced = _parse(fp, name, specific_tags)
    except OSError as exc:  # pydicom's own OSErrors were turned into typed errors in _parse
        raise UnreadableFile(name, exc.strerror or type(exc).__name__) from exc
    header_only = specific_tags is not None
    _check_complete(ds, tracked, header_only=header_only, forced=forced)
    if not isinstance(ds, FileDataset) or not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = transfer_syntax_of(ds)
    return ds


#: Leading bytes of what lands in archives beside DICOM, and what to do about it. A handful of
#: signatures, so no file-type library: the message only has to tell "unpack it" from "not DICOM".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive, not DICOM: if it holds DICOM, unpack it and scan the folder"),
    (b"\x1f\x8b", "a gzip-compressed file, not DICOM: if it holds DICOM, unpack it and scan that"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive, not DICOM: if it holds DICOM, unpack it and scan the folder"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image, not DICOM"),
    (b"\xff\xd8\xff", "a JPEG image, not DICOM"),
    (b"%PDF-", "a PDF document, not DICOM"),
)
#: A NIfTI-1 (348) or NIfTI-2 (540) header starts with its own size, in either byte order.
_NIFTI_HEADER_SIZES = {n.to_bytes(4, order) for n in (348, 540) for order in ("little", "big")}


def _not_dicom_detail(head: bytes) -> str:
    """Why a file with no DICM prefix is not read: what it is where its first bytes say so."""
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head[:4] in _NIFTI_HEADER_SIZES:
        return "a NIfTI volume, not DICOM"
    return "no DICM prefix and no data set at the start of the file"


def _parse(
    fp: BinaryIO, name: str, specific_tags: Sequence[Any] | None
) -> tuple[Dataset, _TrackedFile, bool]:
    """Run dcmread on an open file; return the data set, the tracker and whether force was needed."""
    size = os.fstat(fp.fileno()).st_size
    head = fp.read(132)
    if size == 0:
        raise NotDicom(name, "empty file")
    forced = head[128:132] != b"DICM"
    if forced and not _looks_like_raw_dataset(head, size):
        raise NotDicom(name, _not_dicom_detail(head))
    fp.seek(0)
    tracked = _TrackedFile(fp, size, name)
    try:
        ds = dcmread(
            tracked,
            force=forced,
            stop_before_pixels=specific_tags is not None,
            specific_tags=list(specific_tags) if specific_tags is not None else None,
        )
    except InvalidDicomError as exc:
        raise NotDicom(name, str(exc)) from exc
    except Exception as exc:  # EOFError, OSError, struct.error, zlib.error ... from the parser
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a real I/O error (EIO, ESTALE ...), not a parse error: unreadable
        if tracked.at_end():
            raise TruncatedFile(name, f"{type(exc).__name__}: {exc}") from exc
        raise NotDicom(name, f"unparseable: {type(exc).__name__}: {exc}") from exc
    return ds, tracked, forced


def _check_complete(ds: Dataset, tracked: _TrackedFile, *, header_only: bool, forced: bool) -> None:
    """Raise when what pydicom returned shows that the file was cut short or is no data set."""
    name = tracked.name
    if tracked.overrun:
        raise TruncatedFile(name, "an element's length runs past the end of the file")
    if (tag := _short_element(ds)) is not None:
        raise TruncatedFile(name, f"the file ends inside element {tag}")
    if tracked.partial_tail.strip(b"\x00") and not any(tag in ds._dict for tag in PIXEL_TAGS):
        # The parser stops quietly when fewer than 8 bytes of an element header are
        # left. A few bytes of trailing padding look alike, so only non-zero bytes
        # where the pixel data should have been count as a cut.
        raise TruncatedFile(name, "the file ends inside an element header")
    if len(ds._dict) == 0:
        # pydicom swallows an EOFError inside undefined-length data and keeps nothing.
        if tracked.hit_end:
            raise TruncatedFile(name, "the file ends before the data set does")
        if forced or not header_only:
            raise NotDicom(name, "no data elements")
