"""A lean reader for the common case: uncompressed little-endian greyscale images.

pydicom builds a Python object for every element of a file and runs a
general pixel handler; for a 512 x 512 CT slice that is most of the cost of
reading it. This module walks the element headers of a Part 10 file in
Implicit or Explicit VR Little Endian, keeps the few values the sorter uses,
and decodes native greyscale pixel data with numpy.

It only claims the well-formed common case and returns ``None`` for anything
else: compressed, big endian or deflated data, colour, LUT sequences,
enhanced multi-frame objects, non-ASCII or multi-valued text, lengths that
run past the end of the file, values it cannot parse. Those files take the
pydicom path (:mod:`sorter.dicom.reading`), which also produces every typed
error, so this module never raises for bad input. Its results equal the
pydicom path's, value for value: ``tests/test_dicom_lean.py`` compares both
over pydicom's test files and the corpus.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sorter.dicom.lut import invert_monochrome1, rescale
from sorter.domain import InstanceHeader
from sorter.imageops import finite_float32, stack_frames

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

#: How much of a file a header read looks at before leaving the file to pydicom.
HEADER_BYTES = 64 * 1024
#: Larger files are not read into memory whole: pydicom reads only the frames asked for.
MAX_FILE_BYTES = 256 * 1024 * 1024

_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_VRS = _LONG_VRS | _SHORT_VRS

#: Elements whose raw value is kept: the header's and the Image Pixel module's.
_KEEP: dict[int, str] = {
    0x00020010: "TransferSyntaxUID",
    0x00080008: "ImageType",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x00080080: "InstitutionName",
    0x00081010: "StationName",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00280002: "SamplesPerPixel",
    0x00280004: "PhotometricInterpretation",
    0x00280008: "NumberOfFrames",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280103: "PixelRepresentation",
    0x00281052: "RescaleIntercept",
    0x00281053: "RescaleSlope",
}
#: Top-level elements after which a header needs pydicom: a DICOMDIR's.
_HEADER_DECLINE = frozenset({0x00041130, 0x00041200, 0x00041220})
#: Top-level elements after which decoding needs pydicom: LUTs, palettes,
#: functional groups (per-frame rescale), float pixel data.
_PIXEL_DECLINE = frozenset(
    {
        0x00283000,  # Modality LUT Sequence
        0x00281101, 0x00281102, 0x00281103, 0x00281201, 0x00281202, 0x00281203, 0x00281221,
        0x52009229, 0x52009230,  # shared and per-frame functional groups
        0x7FE00008, 0x7FE00009,  # float and double float pixel data
    }
)  # fmt: skip
_WATCHED = _HEADER_DECLINE | _PIXEL_DECLINE
#: Radiopharmaceutical Information Sequence > Radionuclide Code Sequence > Code Value: the one
#: nested value kept (:func:`_first_nested`), under the keyword ``Radionuclide``.
_RADIONUCLIDE_PATH = (0x00540016, 0x00540300, 0x00080100)


class _Decline(Exception):
    """Not the common case: the caller falls back to pydicom."""


@dataclass
class LeanFile:
    """What a walk over a file found.

    Attributes
    ----------
    values
        Raw bytes of the kept elements, by keyword.
    transfer_syntax
        Implicit or Explicit VR Little Endian.
    seen
        Watched top-level tags that are present (LUTs, functional groups ...).
    pixel_offset, pixel_length
        Where the (7FE0,0010) value is; ``None`` when the walk found none.
    """

    values: dict[str, bytes]
    transfer_syntax: str
    seen: set[int] = field(default_factory=set)
    pixel_offset: int | None = None
    pixel_length: int = 0


def _tag(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 2], "little") << 16 | int.from_bytes(
        buf[pos + 2 : pos + 4], "little"
    )


def _element(buf: bytes, pos: int, end: int, explicit: bool) -> tuple[int, int, int, bool]:
    """Decode the element header at ``pos``: (tag, value position, length, is a sequence)."""
    if pos + 8 > end:
        raise _Decline  # a few bytes that are not an element header: pydicom decides
    tag = _tag(buf, pos)
    if not explicit:
        length = int.from_bytes(buf[pos + 4 : pos + 8], "little")
        return tag, pos + 8, length, length == _UNDEFINED
    vr = buf[pos + 4 : pos + 6]
    if vr in _SHORT_VRS:
        return tag, pos + 8, int.from_bytes(buf[pos + 6 : pos + 8], "little"), False
    if vr not in _LONG_VRS or pos + 12 > end:
        raise _Decline
    length = int.from_bytes(buf[pos + 8 : pos + 12], "little")
    if length == _UNDEFINED and vr != b"SQ":
        raise _Decline  # encapsulated or UN data outside the pixel data element
    return tag, pos + 12, length, vr == b"SQ"


def _skip_sequence(buf: bytes, pos: int, end: int, explicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence; return the position after its delimiter."""
    if depth > _MAX_DEPTH:
        raise _Decline
    while pos + 8 <= end:
        tag = _tag(buf, pos)
        length = int.from_bytes(buf[pos + 4 : pos + 8], "little")
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Decline
        pos = _skip_item(buf, pos, end, explicit, depth) if length == _UNDEFINED else pos + length
    raise _Decline


def _skip_item(buf: bytes, pos: int, end: int, explicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item; return the position after its delimiter."""
    while pos + 8 <= end:
        if _tag(buf, pos) == _ITEM_END:
            return pos + 8
        _, value_at, length, sequence = _element(buf, pos, end, explicit)
        if length == _UNDEFINED:
            if not sequence:
                raise _Decline
            pos = _skip_sequence(buf, value_at, end, explicit, depth + 1)
        else:
            pos = value_at + length
    raise _Decline


def _first_nested(
    buf: bytes, pos: int, stop: int, explicit: bool, path: tuple[int, ...], depth: int
) -> bytes | None:
    """The first non-empty value at ``path`` inside the items of a sequence whose value is ``buf[pos:stop]``.

    ``path`` names the elements below the sequence, the last one a plain value; every other one
    is a sequence (known by its tag, as in Implicit VR a defined-length sequence has no VR).
    """
    if depth > _MAX_DEPTH:
        raise _Decline
    while pos + 8 <= stop:
        tag, length = _tag(buf, pos), int.from_bytes(buf[pos + 4 : pos + 8], "little")
        pos += 8
        if tag == _SEQUENCE_END:
            return None
        if tag != _ITEM:
            raise _Decline
        item_end = _skip_item(buf, pos, stop, explicit, depth) if length == _UNDEFINED else pos + length
        at = pos
        while at < item_end and _tag(buf, at) != _ITEM_END:
            tag, value_at, length, _ = _element(buf, at, item_end, explicit)
            if length == _UNDEFINED:
                at = _skip_sequence(buf, value_at, item_end, explicit, depth + 1)
            else:
                at = value_at + length
            if at > item_end:
                raise _Decline
            if tag != path[0]:
                continue
            if len(path) == 1:
                if length != _UNDEFINED and buf[value_at:at].strip(b"\0 "):
                    return buf[value_at:at]
                continue  # an empty value: the next item's, as pydicom's reading takes it
            found = _first_nested(buf, value_at, at, explicit, path[1:], depth + 1)
            if found is not None:
                return found
        pos = item_end
    return None


def _walk_top(buf: bytes, pos: int, end: int, found: LeanFile) -> int:
    """Walk top-level elements from ``pos``; return where the pixel data element starts, or ``end``."""
    explicit = found.transfer_syntax == EXPLICIT_LE
    while pos < end:
        tag, value_at, length, sequence = _element(buf, pos, end, explicit)
        if tag >> 16 == 0xFFFE:
            raise _Decline
        if tag == _PIXEL_DATA:
            return pos
        if tag in _WATCHED:
            found.seen.add(tag)
        if length == _UNDEFINED:
            if not sequence:
                raise _Decline
            pos = _skip_sequence(buf, value_at, end, explicit, 1)
        else:
            pos = value_at + length
            if pos > end:
                raise _Decline  # truncated, or a header read that needs more bytes
            if (name := _KEEP.get(tag)) is not None:
                found.values[name] = buf[value_at:pos]
        if tag == _RADIONUCLIDE_PATH[0] and "Radionuclide" not in found.values:
            code = _first_nested(buf, value_at, pos, explicit, _RADIONUCLIDE_PATH[1:], 1)
            if code is not None:
                found.values["Radionuclide"] = code
    return end


def _read_meta(buf: bytes) -> tuple[dict[str, bytes], int]:
    """The File Meta Information's kept values (always explicit VR little endian) and where it ends."""
    meta: dict[str, bytes] = {}
    pos = 132
    while pos + 8 <= len(buf) and buf[pos : pos + 2] == b"\x02\x00":
        tag, value_at, length, _ = _element(buf, pos, len(buf), True)
        if length == _UNDEFINED or value_at + length > len(buf):
            raise _Decline
        pos = value_at + length
        if (name := _KEEP.get(tag)) is not None:
            meta[name] = buf[value_at:pos]
    return meta, pos


def scan(buf: bytes, size: int) -> LeanFile | None:
    """Walk a Part 10 file's elements; ``None`` when it is not the common case.

    Parameters
    ----------
    buf
        The file's bytes, or only its first bytes for a header read.
    size
        The file's size. When ``buf`` is shorter, the walk must reach the
        pixel data element inside ``buf``.

    Returns
    -------
    LeanFile or None
        The kept values and where the pixel data is; the pixel value itself
        may lie beyond ``buf``.
    """
    if len(buf) < 140 or buf[128:132] != b"DICM":
        return None
    try:
        meta, pos = _read_meta(buf)
        syntax = _text(meta.get("TransferSyntaxUID"))
        if syntax not in (IMPLICIT_LE, EXPLICIT_LE):
            return None
        if syntax == IMPLICIT_LE and buf[pos + 4 : pos + 6] in _VRS:
            return None  # explicit VR data under an implicit transfer syntax: pydicom guesses
        found = LeanFile({}, syntax)
        stop = _walk_top(buf, pos, len(buf), found)
    except _Decline:
        return None
    if stop == len(buf):
        return found if len(buf) == size else None  # else: the header did not fit in ``buf``
    header = 12 if syntax == EXPLICIT_LE else 8
    if stop + header > len(buf) or (syntax == EXPLICIT_LE and buf[stop + 4 : stop + 6] not in (b"OB", b"OW")):
        return None
    length = int.from_bytes(buf[stop + header - 4 : stop + header], "little")
    if length == _UNDEFINED:
        return None  # encapsulated pixel data under a native transfer syntax
    found.pixel_offset, found.pixel_length = stop + header, length
    return found


def _text(raw: bytes | None) -> str | None:
    """A single-valued ASCII text value, stripped of padding; ``None`` when empty or absent.

    Raises ``_Decline`` for what pydicom would interpret: other character
    sets (bytes >= 0x80, ISO 2022 escapes) and multiple values.
    """
    if raw is None:
        return None
    if b"\\" in raw or b"\x1b" in raw or not raw.isascii():
        raise _Decline
    return raw.decode("ascii").strip("\x00 ") or None


def _localizer(raw: bytes | None) -> bool:
    """Whether a raw Image Type value (CS, backslash-separated) names LOCALIZER."""
    return raw is not None and b"LOCALIZER" in (value.strip(b"\x00 ").upper() for value in raw.split(b"\\"))


def _us(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    if len(raw) != 2:
        raise _Decline
    return int.from_bytes(raw, "little")


def _integer_string(raw: bytes | None) -> int | None:
    value = _text(raw)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise _Decline from None


def _decimal_string(raw: bytes | None) -> float | None:
    value = _text(raw)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise _Decline from None
    if not math.isfinite(number):
        raise _Decline
    return number


def _read(path: str, limit: int | None = None) -> tuple[bytes, int] | None:
    """The first ``limit`` bytes of the file (all of it when ``None``) and its size.

    ``None`` on any OS error (pydicom reports it), and for a whole read of a
    file over :data:`MAX_FILE_BYTES` (pydicom then reads only the frames asked for).
    """
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            if limit is None and size > MAX_FILE_BYTES:
                return None
            # read() to the end when it all fits: read(n) allocates n bytes up front
            return (fp.read() if limit is None or size <= limit else fp.read(limit)), size
    except OSError:
        return None


def read_header(path: str) -> InstanceHeader | None:
    """A common-case file's header, as :func:`sorter.dicom.headers.read_header` reads it; else ``None``."""
    got = _read(path, HEADER_BYTES)
    if got is None:
        return None
    found = scan(*got)
    if found is None or found.seen & _HEADER_DECLINE:
        return None
    v = found.values
    try:
        sop_class = _text(v.get("SOPClassUID"))
        if sop_class is None:
            return None  # pydicom looks further: Media Storage SOP Class, DICOMDIR
        frames = _integer_string(v.get("NumberOfFrames"))
        return InstanceHeader(
            path=path,
            sop_instance_uid=_text(v.get("SOPInstanceUID")),
            study_instance_uid=_text(v.get("StudyInstanceUID")),
            series_instance_uid=_text(v.get("SeriesInstanceUID")),
            sop_class_uid=sop_class,
            modality=_text(v.get("Modality")),
            transfer_syntax_uid=found.transfer_syntax,
            rows=_us(v.get("Rows")),
            columns=_us(v.get("Columns")),
            number_of_frames=frames if frames is not None and frames > 0 else 1,
            institution_name=_text(v.get("InstitutionName")),
            station_name=_text(v.get("StationName")),
            localizer=_localizer(v.get("ImageType")),
            radionuclide=_text(v.get("Radionuclide")),
        )
    except _Decline:
        return None


@dataclass(frozen=True)
class LeanImage:
    """Grey frames of a common-case file (see :class:`sorter.dicom.pixels.DecodedImage`)."""

    frames: np.ndarray
    n_frames_total: int
    photometric: str


def _trailer_ok(buf: bytes, pos: int, transfer_syntax: str) -> bool:
    """True when what follows the pixel data is whole elements (pydicom would flag a cut one)."""
    found = LeanFile({}, transfer_syntax)
    try:
        return _walk_top(buf, pos, len(buf), found) == len(buf)
    except _Decline:
        return False


def load_frames(path: str, select: Callable[[int], Sequence[int]]) -> LeanImage | None:
    """Decode the frames ``select(number_of_frames)`` names of a common-case file; else ``None``.

    The values equal the pydicom path's: stored values with unused high bits
    cleared (pydicom's ``correct_unused_bits``), then the rescale, then the
    MONOCHROME1 inversion.
    """
    got = _read(path)
    if got is None:
        return None
    buf, size = got
    found = scan(buf, size)
    if found is None or found.pixel_offset is None or found.seen:
        return None
    v = found.values
    try:
        samples, photometric = _us(v.get("SamplesPerPixel")), _text(v.get("PhotometricInterpretation"))
        allocated, stored = _us(v.get("BitsAllocated")), _us(v.get("BitsStored"))
        signed, rows, columns = _us(v.get("PixelRepresentation")), _us(v.get("Rows")), _us(v.get("Columns"))
        frames = _integer_string(v.get("NumberOfFrames"))
        slope, intercept = _decimal_string(v.get("RescaleSlope")), _decimal_string(v.get("RescaleIntercept"))
    except _Decline:
        return None
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2") or signed not in (0, 1):
        return None
    if allocated not in (8, 16, 32) or stored is None or not 1 <= stored <= allocated:
        return None
    if not rows or not columns or (frames is not None and frames < 1):
        return None
    n_total = frames or 1
    frame_bytes = rows * columns * allocated // 8
    end = found.pixel_offset + found.pixel_length
    if found.pixel_length < frame_bytes * n_total or end > len(buf):
        return None
    if end < len(buf) and not _trailer_ok(buf, end, found.transfer_syntax):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    greys = []
    for index in select(n_total):
        offset = found.pixel_offset + index * frame_bytes
        arr = np.frombuffer(buf, dtype=dtype, count=rows * columns, offset=offset).reshape(rows, columns)
        if stored < allocated:
            shift = allocated - stored
            arr = np.right_shift(np.left_shift(arr, shift), shift)
        values: np.ndarray = arr if slope is None or intercept is None else rescale(arr, slope, intercept)
        if photometric == "MONOCHROME1":
            values = invert_monochrome1(values)
        # float32 from integers here can only come from the exact integer rescale: finite
        greys.append(values if values.dtype == np.float32 else finite_float32(values))
    return LeanImage(stack_frames(greys), n_total, photometric)
