"""Readers for the non-DICOM formats of training manifests: NIfTI, NRRD and 2-D pictures.

Each reader returns grey 2-D frames in physical units plus the source's
colourfulness, the same shape of data that :func:`sorter.dicom.pixels.load_image`
gives for DICOM, so that one preprocessing function serves both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sorter.imageops import colourfulness, rgb_to_grey


def volume_slices(volume: np.ndarray, axial: int, reformats: int) -> list[np.ndarray]:
    """Evenly spaced slices over the central 80 % of a volume in canonical (RAS) orientation.

    ``axial`` slices along the last axis, plus ``reformats`` sagittal and as
    many coronal slices, so that the model also sees reformatted planes.
    """
    while volume.ndim > 3:  # 4-D (time or diffusion): the middle volume of the last axis
        volume = volume[..., volume.shape[-1] // 2]
    if volume.ndim == 2:
        return [volume.astype(np.float32)]
    slices: list[np.ndarray] = []
    for axis, count in ((2, axial), (0, reformats), (1, reformats)):
        n = volume.shape[axis]
        if count <= 0 or (n < 8 and axis != 2):
            continue
        lo, hi = int(n * 0.1), max(int(n * 0.9) - 1, int(n * 0.1))
        for index in sorted({round(i) for i in np.linspace(lo, hi, min(count, n))}):
            plane = np.take(volume, index, axis=axis)
            slices.append(np.rot90(plane).astype(np.float32))
    return slices


def read_nifti(path: Path, axial: int, reformats: int) -> tuple[list[np.ndarray], float]:
    """Slices of a NIfTI volume (scaling slope/intercept applied)."""
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.dataobj, dtype=np.float32)  # the array proxy applies scl_slope/inter
    return volume_slices(np.nan_to_num(data), axial, reformats), 0.0


def read_nrrd(path: Path, axial: int, reformats: int) -> tuple[list[np.ndarray], float]:
    """Slices of an NRRD volume."""
    import nrrd

    data, _header = nrrd.read(str(path))
    return volume_slices(np.nan_to_num(np.asarray(data, dtype=np.float32)), axial, reformats), 0.0


def read_picture(path: Path) -> tuple[list[np.ndarray], float]:
    """A PNG/JPEG/TIFF/JPEG 2000 picture as one grey frame and its colourfulness."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return [np.asarray(image, dtype=np.float32)], 0.0
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return [rgb_to_grey(rgb)], colourfulness(rgb)
