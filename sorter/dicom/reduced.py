"""Decode a compressed frame at the coarsest resolution that still covers the model's input.

The model sees ``S`` x ``S`` pixels (128 for the bundled one); a radiograph or a mammogram is
2 000 to 4 000 pixels on a side, and decoding every one of them only for the resize to throw
them away is nearly all of a mixed archive's decode time. Two codecs can stop early:

* **JPEG 2000** (and HTJ2K) is a wavelet pyramid: discarding the ``r`` finest resolution levels
  gives the image at ``1 / 2**r`` of its size (each side ``ceil(side / 2**r)``), the low-pass band
  the encoder itself computed, without decoding the detail bands (its samples sit on every
  ``2**r``-th stored pixel, not at block centres: preprocessing resizes accordingly). The number
  of levels is read from the codestream's COD (and COC) markers; ``r`` is the largest that keeps
  the long side at ``OVERSAMPLE * min_side`` or more.
* **JPEG baseline / extended, 8-bit** (DCT): libjpeg-turbo scales by 1/2, 1/4 or 1/8 while it
  inverts the DCT (Pillow's ``draft``), again at the largest factor that keeps that side; a frame
  too small to scale is still decoded by libjpeg-turbo, the faster of the two libjpegs here.

Pillow does both: it is already a dependency, its wheels ship OpenJPEG and libjpeg-turbo, and
its OpenJPEG plugin takes the reduce factor (``tests/bench/bench_decoders.py`` compares it with
pylibjpeg-openjpeg, GDCM and imagecodecs, which only decode full resolution or, for JPEG, scale
no faster). Anything this module does not handle exactly — another transfer syntax, a codestream
whose precision or sign disagrees with the Image Pixel module (pydicom corrects those), colour
without the matching component transform, a codestream Pillow cannot read even one level down
(a deeper level it refuses gives way to a shallower one first) — returns ``None`` or raises, and
the caller decodes the whole frame as before. Values come back as the stored values pydicom would
give (same signedness and bit depth, unscaled), so the Modality LUT, MONOCHROME1 inversion and the
colour path downstream are the same code for both.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

#: Syntaxes whose codestream is a JPEG 2000 (Part 1 or Part 15) wavelet pyramid.
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})
#: Syntaxes that may hold 8-bit DCT JPEG (Process 1, and Process 2 of 2/4).
DCT_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})

#: Decode at least this many times the side the caller needs: 1, the coarsest level that still
#: covers the model's input. The wavelet's low-pass band and libjpeg's scaled IDCT are sharper
#: filters than the antialiasing resize the full decode goes through, so with an octave to spare
#: (2) the network's input is closer to the full decode's: mean absolute difference, inputs in
#: [0, 1], over the 128 compressed test files (tests/test_reduced_decode.py), median 0.0012 and at
#: most 0.0037 against 0.0046 and 0.023 (NEMA MR4) with 1; probabilities move up to 0.05 against
#: 0.16. Neither changes a label there, nor in a paired leave-sources-out run (balanced accuracy
#: 0.6621 both, against 0.6596 in full), and 1 scans 512 x 512 JPEG 2000 CT 1.7-1.9x faster (12.3x the
#: seed-style baseline against 7.4x; tests/bench/results-throughput-2core-oversample.json).
OVERSAMPLE = 1

_SOC, _SIZ, _COD, _COC, _SOT = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF90
_JPEG_SCALES = (8, 4, 2)  # the DCT scalings libjpeg-turbo does with Pillow's draft


@dataclass(frozen=True)
class Codestream:
    """What the main header of a JPEG 2000 codestream says (ISO/IEC 15444-1 A.5.1, A.6.1, A.6.2).

    ``levels`` is the smallest number of decomposition levels of any component in the main
    header (COD, then COC overrides); ``mct`` whether the multiple component transform is on.
    """

    width: int
    height: int
    precisions: tuple[int, ...]
    signed: tuple[bool, ...]
    levels: int
    mct: bool


def parse_codestream(data: bytes) -> Codestream:
    """Read SIZ, COD and COC from a raw JPEG 2000 codestream's main header.

    Raises
    ------
    ValueError
        Not a raw codestream (a JP2 file, say), or a main header without SIZ or COD.
    """
    if len(data) < 4 or struct.unpack_from(">H", data, 0)[0] != _SOC:
        raise ValueError("not a raw JPEG 2000 codestream")
    pos = 2
    size: tuple[int, int, tuple[int, ...], tuple[bool, ...]] | None = None
    levels: int | None = None
    component_levels: list[int] = []
    mct = False
    while pos + 4 <= len(data):
        marker, length = struct.unpack_from(">HH", data, pos)
        body = data[pos + 4 : pos + 2 + length]
        if marker == _SOT:
            break
        if marker == _SIZ:
            xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", body, 2)
            count = struct.unpack_from(">H", body, 34)[0]
            ssiz = body[36 : 36 + 3 * count : 3]
            if len(ssiz) != count:
                raise ValueError("truncated SIZ marker")
            precisions = tuple((s & 0x7F) + 1 for s in ssiz)  # Ssiz: bit depth - 1, sign in the top bit
            size = (xsiz - xo, ysiz - yo, precisions, tuple(bool(s & 0x80) for s in ssiz))
        elif marker == _COD:
            # Scod (1), progression order (1), layers (2), MCT (1), decomposition levels (1)
            mct = bool(body[4])
            levels = body[5]
        elif marker == _COC:
            # Ccoc is one byte below 257 components, two above; then Scoc (1), levels (1)
            wide = size is not None and len(size[2]) >= 257
            component_levels.append(body[3 if wide else 2])
        pos += 2 + length
    if size is None or levels is None:
        raise ValueError("no SIZ or COD marker in the main header")
    return Codestream(size[0], size[1], size[2], size[3], min([levels, *component_levels]), mct)


def reduction(side: int, min_side: int, limit: int) -> int:
    """The largest ``r <= limit`` with ``ceil(side / 2**r) >= min_side`` (0 when none is)."""
    r = 0
    while r < limit and math.ceil(side / 2 ** (r + 1)) >= min_side:
        r += 1
    return r


def decode_reduced(
    ds: Dataset, index: int, tsyntax: UID, opts: dict[str, Any], min_side: int
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """Frame ``index`` at the coarsest resolution whose long side is still ``OVERSAMPLE * min_side`` or more.

    Parameters
    ----------
    ds
        The data set with encapsulated pixel data.
    index
        The frame.
    tsyntax
        The pixel data's transfer syntax.
    opts
        Image Pixel options (:func:`pydicom.pixels.as_pixel_options`).
    min_side
        The long side the caller needs (the model's input size); the frame is decoded with
        :data:`OVERSAMPLE` times that to spare.

    Returns
    -------
    (numpy.ndarray, dict) or None
        Stored values, ``(h, w)`` or ``(h, w, 3)`` RGB, with pydicom-style properties
        (``photometric_interpretation`` of what the array holds; for JPEG 2000 also
        ``grid_step``, ``2**r``: sample ``k`` is the low-pass value at stored pixel ``2**r * k``,
        which :func:`sorter.model.preprocess.cosited_box` accounts for); ``None`` when this frame
        cannot be decoded here (not smaller than in full for JPEG 2000, or not exactly): decode
        it in full.

    Raises
    ------
    Exception
        Whatever Pillow or the codestream parser raise on bad data: decode it in full.
    """
    if tsyntax in J2K_SYNTAXES:
        return _j2k(_frame_bytes(ds, index, opts), opts, OVERSAMPLE * min_side)
    if tsyntax in DCT_SYNTAXES:
        return _dct(_frame_bytes(ds, index, opts), opts, OVERSAMPLE * min_side)
    return None


def _frame_bytes(ds: Dataset, index: int, opts: dict[str, Any]) -> bytes:
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return get_frame(
        ds.PixelData, index, extended_offsets=offsets, number_of_frames=int(opts["number_of_frames"])
    )


def _stored_dtype(bits_allocated: int, signed: bool) -> np.dtype[Any]:
    return np.dtype(f"{'i' if signed else 'u'}{max(1, bits_allocated // 8)}")


def _j2k(data: bytes, opts: dict[str, Any], min_side: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    info = parse_codestream(data)
    samples = int(opts.get("samples_per_pixel") or 1)
    stored = (int(opts["columns"]), int(opts["rows"]))
    if len(info.precisions) != samples or (info.width, info.height) != stored:
        return None  # the codestream and the Image Pixel module disagree: pydicom knows what to do
    r = reduction(max(info.width, info.height), min_side, info.levels)
    if r == 0:
        return None
    photometric = str(opts.get("photometric_interpretation") or "").strip().upper()
    if samples == 3:
        # Colour: 8-bit unsigned components, with the component transform the header names.
        transform = photometric in ("YBR_RCT", "YBR_ICT")
        if transform != info.mct or not (transform or photometric == "RGB"):
            return None
        if any(p != 8 for p in info.precisions) or any(info.signed):
            return None
    elif samples != 1:
        return None
    signed = int(opts.get("pixel_representation") or 0) == 1
    precision = info.precisions[0]
    if samples == 1 and (info.signed[0] != signed or precision > min(16, int(opts["bits_allocated"]))):
        # pydicom reinterprets a codestream whose sign disagrees with Pixel Representation; the
        # full decode has that correction. A precision below Bits Stored needs none: the samples
        # are the values (693_J2KR: 14-bit codestream, Bits Stored 16).
        return None
    image, r = open_j2k(data, r)
    expected = (math.ceil(info.width / 2**r), math.ceil(info.height / 2**r))
    if abs(image.size[0] - expected[0]) > 1 or abs(image.size[1] - expected[1]) > 1:
        raise ValueError(f"reduced to {image.size}, expected about {expected}")
    if samples == 3:
        if image.mode != "RGB":
            return None
        return np.asarray(image), {"photometric_interpretation": "RGB", "grid_step": 2**r}
    values = _unscale(np.asarray(image), image.mode, precision, signed)
    dtype = _stored_dtype(int(opts["bits_allocated"]), signed)
    return values.astype(dtype), {"photometric_interpretation": photometric, "grid_step": 2**r}


def open_j2k(data: bytes, r: int) -> tuple[Image.Image, int]:
    """The codestream decoded ``r`` levels down, or fewer where Pillow refuses that many.

    Pillow decodes tile by tile, and on some codestreams that path fails below a certain level
    although OpenJPEG itself reads them there (NEMA RG1, a Kakadu 2.2 stream of 1 841 x 1 955:
    Pillow 13 reads it 1 level down, not 2 or more; ``opj_decompress -r 3`` does). A refusal costs
    a few milliseconds and one level down is still several times cheaper than the full decode
    (RG1_J2KR: 118 ms against 454, one core, ``tests/bench/results-decoders-2core-rg1.json``), so
    each shallower level is tried before giving up. Raises Pillow's error when even one level
    down fails: the caller decodes in full.
    """
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=["JPEG2000"])
                # The plugin's setter: resolution levels to skip.
                image.reduce = r  # type: ignore[method-assign,assignment]
                image.load()
            return image, r
        except OSError:
            if r <= 1:
                raise
            r -= 1


def _unscale(arr: np.ndarray, mode: str, precision: int, signed: bool) -> np.ndarray:
    """Pillow's greyscale J2K samples back to stored values.

    Pillow offsets signed samples by ``2**(precision-1)`` and shifts every sample left to fill
    its mode (8 bits for ``L``, 16 for ``I;16``); both are undone exactly.
    """
    depth = {"L": 8, "I;16": 16, "I;16B": 16, "I;16L": 16}.get(mode)
    if depth is None or precision > depth:
        raise ValueError(f"unexpected Pillow mode {mode!r} for {precision}-bit samples")
    values = arr.astype(np.int32) >> (depth - precision)
    if signed:
        values -= 1 << (precision - 1)
    return values


def _dct(data: bytes, opts: dict[str, Any], min_side: int) -> tuple[np.ndarray, dict[str, Any]] | None:
    if int(opts["bits_allocated"]) != 8 or int(opts.get("bits_stored") or 8) != 8:
        return None  # 12-bit DCT: libjpeg-turbo in Pillow is 8-bit only
    rows, columns = int(opts["rows"]), int(opts["columns"])
    side = max(rows, columns)
    # Scale 1 too: libjpeg-turbo decodes 8-bit DCT JPEG several times faster than the libjpeg in
    # pylibjpeg-libjpeg (tests/bench/results-decoders-2core.json, both in full: 2.3 against 12.0 ms
    # for a 1 024 x 1 024 radiograph, 1.9 against 16.3 ms for a 640 x 480 ultrasound frame).
    scale = next((s for s in _JPEG_SCALES if math.ceil(side / s) >= min_side), 1)
    samples = int(opts.get("samples_per_pixel") or 1)
    photometric = str(opts.get("photometric_interpretation") or "").strip().upper()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=["JPEG"])
        if image.size != (columns, rows):
            return None
        wanted = "L" if samples == 1 else "RGB"
        if image.mode != wanted or (samples == 3 and not photometric.startswith("YBR")):
            # CMYK, a component count the header does not give, or RGB stored without the colour
            # transform (no JFIF or Adobe marker to say so): pydicom's decode knows those cases.
            return None
        if scale > 1:
            image.draft(wanted, (columns // scale, rows // scale))
        image.load()
    if image.size != (math.ceil(columns / scale), math.ceil(rows / scale)):
        raise ValueError(f"DCT scaling gave {image.size} for 1/{scale} of {columns} x {rows}")
    arr = np.asarray(image)
    if samples == 1:
        return arr, {"photometric_interpretation": photometric}
    return arr, {"photometric_interpretation": "RGB"}
