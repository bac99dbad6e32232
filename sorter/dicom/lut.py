"""Greyscale pixel transforms: the Modality LUT and MONOCHROME1 inversion.

Pure ``(array, dataset) -> array`` functions (PS3.3 C.11.1, C.7.6.3.1.2).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

logger = logging.getLogger(__name__)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _rescale(item: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) when both are present and numeric."""
    slope = _number(item.get("RescaleSlope"))
    intercept = _number(item.get("RescaleIntercept"))
    return None if slope is None or intercept is None else (slope, intercept)


def _usable_lut(ds: Dataset) -> bool:
    """True when (0028,3000) holds an item with a 3-value descriptor and LUT data.

    Some writers leave an empty item behind (descriptor and data without values).
    """
    seq = ds.get("ModalityLUTSequence")
    if not seq:
        return False
    descriptor = seq[0].get("LUTDescriptor")
    data = seq[0].get("LUTData")
    return descriptor is not None and len(descriptor) == 3 and data is not None and len(data) > 0


def _functional_group_item(ds: Dataset, index: int) -> Dataset | None:
    """The Pixel Value Transformation item for frame `index` of an enhanced multi-frame object.

    Per-frame values win over shared ones (PS3.3 C.7.6.16).
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    groups: list[Dataset] = []
    if per_frame and 0 <= index < len(per_frame):
        groups.append(per_frame[index])
    if shared:
        groups.append(shared[0])
    for group in groups:
        transform = group.get("PixelValueTransformationSequence")
        if transform and _rescale(transform[0]) is not None:
            return transform[0]
    return None


def modality_lut(arr: np.ndarray, ds: Dataset, index: int = 0) -> np.ndarray:
    """Apply the Modality LUT or rescale slope/intercept to one greyscale frame.

    Parameters
    ----------
    arr : numpy.ndarray
        Stored values of frame `index`.
    ds : pydicom.dataset.Dataset
        The data set; (0028,3000) Modality LUT Sequence or (0028,1052/1053) at the
        top level, else the frame's Pixel Value Transformation functional group.
    index : int
        The frame's index, to find its per-frame functional group.

    Returns
    -------
    numpy.ndarray
        Output values in modality units (e.g. Hounsfield units), or `arr`
        unchanged when the data set defines no transformation or an unusable one.
    """
    if _usable_lut(ds):
        return apply_modality_lut(arr, ds)
    rescale_pair = _rescale(ds)
    if rescale_pair is None:
        item = _functional_group_item(ds, index)
        rescale_pair = _rescale(item) if item is not None else None
    if rescale_pair is None:
        return arr
    return rescale(arr, *rescale_pair)


def rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``arr * slope + intercept`` as pydicom's ``apply_modality_lut`` computes it (float64).

    Parameters
    ----------
    arr : numpy.ndarray
        Stored values.
    slope, intercept : float
        (0028,1053) Rescale Slope and (0028,1052) Rescale Intercept.

    Returns
    -------
    numpy.ndarray
        float64, or float32 when that holds the same values exactly.
    """
    exact = float(intercept).is_integer() and abs(intercept) < 2**23
    if slope == 1 and exact and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        # CT's usual rescale: integers that float32 holds exactly, so this gives the
        # same values as the float64 path below at a third of the cost.
        out = arr.astype(np.float32)
        out += np.float32(intercept)  # in place: one 1 MiB allocation per 512 x 512 slice, not two
        return out
    # The same arithmetic as pydicom's apply_modality_lut, which cannot be used here:
    # it would pick an unusable LUT sequence over a valid rescale.
    return arr.astype(np.float64) * slope + intercept


def invert_monochrome1(arr: np.ndarray) -> np.ndarray:
    """Map MONOCHROME1 (minimum shown white) to MONOCHROME2 order: ``max + min - x``.

    Parameters
    ----------
    arr : numpy.ndarray
        One frame after the Modality LUT.

    Returns
    -------
    numpy.ndarray
        float64 array with the same minimum and maximum as `arr`; an empty array
        is returned unchanged.
    """
    if arr.size == 0:
        return arr
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return values
    return finite.max() + finite.min() - values
