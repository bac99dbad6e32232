"""Last-resort decoding of one greyscale frame with GDCM, called directly.

pydicom's GDCM plugin refuses 12-bit JPEG Extended (process 4) data, and
libjpeg rejects some such codestreams (Ss/Se scan parameters other than
0/63, e.g. the NEMA WG04 NM1_JPLY image). GDCM itself decodes them; this
module hands it one frame the same way pydicom's plugin does, without the
refusal. Only used after every pydicom plugin has failed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID

try:
    import gdcm

    HAVE_GDCM = True
except ImportError:  # python-gdcm is a dependency, but keep working without it
    HAVE_GDCM = False


def can_decode(tsyntax: UID, opts: dict[str, Any]) -> bool:
    """True when GDCM is installed and the data are encapsulated single-sample frames."""
    return (
        HAVE_GDCM
        and tsyntax.is_encapsulated
        and int(opts.get("samples_per_pixel") or 1) == 1
        and int(opts.get("bits_allocated") or 0) in (8, 16, 32)
    )


def decode_frame(ds: Dataset, index: int, tsyntax: UID, opts: dict[str, Any]) -> np.ndarray:
    """Decode frame `index` of encapsulated single-sample pixel data with GDCM.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The data set holding (7FE0,0010).
    index : int
        The frame to decode.
    tsyntax : pydicom.uid.UID
        The transfer syntax of the pixel data.
    opts : dict
        Image Pixel options as from :func:`pydicom.pixels.as_pixel_options`.

    Returns
    -------
    numpy.ndarray
        The stored values, shape ``(Rows, Columns)``.

    Raises
    ------
    ValueError
        When GDCM cannot decode the frame or returns fewer bytes than it needs.
    """
    rows, columns = int(opts["rows"]), int(opts["columns"])
    bits_allocated = int(opts["bits_allocated"])
    bits_stored = int(opts.get("bits_stored") or bits_allocated)
    signed = int(opts.get("pixel_representation") or 0)
    src = get_frame(ds.PixelData, index, number_of_frames=int(opts["number_of_frames"]))

    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())

    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((columns, rows, 1))
    img.SetDataElement(elem)
    photometric = str(opts.get("photometric_interpretation") or "MONOCHROME2")
    pi_type = gdcm.PhotometricInterpretation.GetPIType(photometric)
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(tsyntax))))
    img.SetPixelFormat(gdcm.PixelFormat(1, bits_allocated, bits_stored, bits_stored - 1, signed))

    # GDCM returns char* as str; surrogateescape gives the bytes back unchanged.
    decoded = img.GetBuffer()
    if decoded is None:
        raise ValueError("GDCM could not decode the frame")
    buffer = decoded.encode("utf-8", "surrogateescape")
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    needed = rows * columns * dtype.itemsize
    if len(buffer) < needed:
        raise ValueError(f"GDCM returned {len(buffer)} of {needed} bytes")
    return np.frombuffer(buffer[:needed], dtype=dtype).reshape(rows, columns).copy()
