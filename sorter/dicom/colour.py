"""Colour pixel transforms: palette and YCbCr to RGB on a common 0-255 scale.

Colour images reach the model as grey (:func:`sorter.imageops.rgb_to_grey`),
so 8-bit, 16-bit and palette images must land on one scale first; 0-255 is
also the scale the colourfulness metric is defined on.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, convert_color_space

#: Photometric interpretations pydicom's decoders may hand back as three samples.
RGB_LIKE = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420"})


def scale_to_255(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Rescale unsigned samples of `bits` bits to 0-255 as float32.

    Parameters
    ----------
    rgb : numpy.ndarray
        Colour samples stored with `bits` significant bits.
    bits : int
        Bits Stored (or the palette's bits per entry); 8 or fewer leaves values as they are.

    Returns
    -------
    numpy.ndarray
        float32 array on a 0-255 scale.
    """
    out = rgb.astype(np.float32)
    if bits > 8:
        out *= np.float32(255.0 / float(2**bits - 1))
    return out


def palette_to_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the Palette Color LUT (PS3.3 C.7.6.3.1.5), segmented 16-bit tables included.

    Parameters
    ----------
    arr : numpy.ndarray
        Stored palette indices, shape ``(H, W)``.
    ds : pydicom.dataset.Dataset
        The data set holding the (0028,1101-1103) descriptors and the LUT data
        or segmented LUT data.

    Returns
    -------
    numpy.ndarray
        float32 RGB on a 0-255 scale, shape ``(H, W, 3)``; an alpha channel is dropped.
    """
    rgb = apply_color_lut(arr, ds)[..., :3]
    # 16-bit entries are meant to span 0-65535, but some writers put 8-bit
    # values into 16-bit tables; the data tell which one this is.
    bits = 16 if rgb.dtype.itemsize > 1 and int(rgb.max(initial=0)) > 255 else 8
    return scale_to_255(rgb, bits)


def ybr_partial_to_rgb(ybr: np.ndarray, bits: int = 8) -> np.ndarray:
    """Convert limited-range YCbCr (YBR_PARTIAL_422/420, ITU-R BT.601) to RGB.

    pydicom converts only the full-range YBR_FULL and YBR_FULL_422 itself.

    Parameters
    ----------
    ybr : numpy.ndarray
        Samples of shape ``(..., 3)``: Y in 16-235 and Cb, Cr in 16-240 (for 8 bits).
    bits : int
        Bits Stored; the ranges scale with it.

    Returns
    -------
    numpy.ndarray
        float32 RGB on a 0-255 scale, clipped to that range.
    """
    unit = float(2 ** (bits - 8)) if bits > 8 else 1.0
    y = ybr[..., 0].astype(np.float32) / unit - 16.0
    cb = ybr[..., 1].astype(np.float32) / unit - 128.0
    cr = ybr[..., 2].astype(np.float32) / unit - 128.0
    y *= np.float32(255.0 / 219.0)
    r = y + 1.596027 * cr
    g = y - 0.391762 * cb - 0.812968 * cr
    b = y + 2.017232 * cb
    return np.clip(np.stack([r, g, b], axis=-1), 0.0, 255.0).astype(np.float32)


def _ybr_full_to_rgb(ybr: np.ndarray, bits: int) -> np.ndarray:
    """Full-range YCbCr (PS3.3 C.7.6.3.1.2) of any bit depth to RGB on a 0-255 scale."""
    half = float(2 ** (max(bits, 1) - 1))
    y = ybr[..., 0].astype(np.float64)
    cb = ybr[..., 1].astype(np.float64) - half
    cr = ybr[..., 2].astype(np.float64) - half
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return scale_to_255(np.clip(rgb, 0.0, 2.0 * half - 1.0), bits)


def to_rgb255(arr: np.ndarray, photometric: str, bits: int) -> np.ndarray:
    """Bring decoded three-sample data to RGB on a 0-255 scale.

    Parameters
    ----------
    arr : numpy.ndarray
        Decoded samples, shape ``(H, W, 3)``.
    photometric : str
        The photometric interpretation *of the decoded array*, which is not
        always the data set's: pydicom and the JPEG codecs already turn
        YBR_FULL(_422) and YBR_ICT/RCT into RGB and report it.
    bits : int
        Bits Stored.

    Returns
    -------
    numpy.ndarray
        float32 RGB, shape ``(H, W, 3)``, on a 0-255 scale.

    Raises
    ------
    ValueError
        For a photometric interpretation that is not RGB-like.
    """
    if photometric == "RGB":
        return scale_to_255(arr, bits)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        if arr.dtype == np.uint8:
            return convert_color_space(arr, "YBR_FULL", "RGB").astype(np.float32)
        return _ybr_full_to_rgb(arr, bits)  # pydicom converts 8-bit data only
    if photometric in ("YBR_PARTIAL_422", "YBR_PARTIAL_420"):
        return ybr_partial_to_rgb(arr, bits)
    raise ValueError(f"unsupported photometric interpretation for 3 samples: {photometric!r}")
