"""The one preprocessing function, shared by training and serving (ARCHITECTURE §4).

Input is a decoded grey frame in physical units (Modality LUT applied,
MONOCHROME1 inverted); output is the network's (C, S, S) float32 input plus
the scalar feature vector. Resizing happens first, on raw values, so that the
intensity statistics are computed on S*S pixels instead of a full radiograph.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from sorter.imageops import finite_float32
from sorter.model.spec import PreprocessParams


def letterbox(frame: np.ndarray, fill: float) -> np.ndarray:
    height, width = frame.shape
    side = max(height, width)
    if height == width:
        return frame
    out = np.full((side, side), fill, dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = frame
    return out


Box = tuple[float, float, float, float]


def resize(frame: np.ndarray, size: int, method: str = "bilinear", box: Box | None = None) -> np.ndarray:
    """Antialiased resize of a float32 frame to ``size`` x ``size``.

    Pillow's 32-bit float mode resizes in C. ``bilinear`` uses a filter whose
    support grows with the scale factor (antialiasing over the whole
    reduction); ``reduce`` first averages blocks by the largest integer factor
    (a box filter, itself antialiasing: 512 -> 128 is exactly a 4 x 4 mean),
    then resizes the rest bilinearly, at less than half the cost. ``box``
    ``(x0, y0, x1, y1)``, in pixel coordinates and fractional, is the region
    to resize (:func:`cosited_box`); it may reach a pixel or two past the
    frame's edges, which are repeated there.
    """
    if box is None and frame.shape == (size, size):
        return frame.astype(np.float32, copy=False)
    if box is not None:
        # Pillow takes only a box inside the image: pad by repeating the edge.
        frame = np.pad(frame, _BOX_PAD, mode="edge")
        height, width = frame.shape
        x0, y0, x1, y1 = (v + _BOX_PAD for v in box)
        box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.float32), mode="F")
    gap = 1.0 if method == "reduce" else None
    resized = image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=gap)
    return np.asarray(resized, dtype=np.float32)


_BOX_PAD = 2  # a cosited box starts at most about one pixel before the frame and ends one after


def cosited_box(stored: tuple[int, int], decoded: tuple[int, int], step: int, letterboxed: bool) -> Box:
    """Where the stored image lies in a frame whose sample ``k`` is stored pixel ``step * k``.

    A resize takes sample ``k`` as a pixel of its own, centred at ``k + 0.5``, and the stored
    image as exactly covering the frame: right for a block mean (the full decode, DCT scaling).
    A JPEG 2000 low-pass band ``r`` levels down instead holds the filtered value *at* stored pixel
    ``2**r * k`` (ISO/IEC 15444-1 F.3: low-pass samples sit on the even positions), so resizing it
    as it is shifts the image by ``(2**r - 1) / 2`` stored pixels: 1.5 at 512 -> 128, 0.375 of an
    input pixel. Resizing this box instead puts every input pixel where the full decode's resize
    puts it. Over the 128 compressed test and corpus files, the network's input moves 3x closer to
    the full decode's: median mean-absolute difference 0.0041 -> 0.0012 decoding one octave above
    the input size, 0.014 -> 0.0046 decoding at it (what ships, ``sorter.dicom.reduced.OVERSAMPLE``).

    Parameters
    ----------
    stored
        ``(rows, columns)`` of the stored image.
    decoded
        ``(rows, columns)`` of the decoded frame, before any letterbox.
    step
        Stored pixels between samples (``2**r``).
    letterboxed
        Whether both are padded to a square (:func:`letterbox`) before the resize.

    Returns
    -------
    tuple of float
        ``(x0, y0, x1, y1)`` in the (letterboxed) frame's pixel coordinates.
    """
    side_stored, side_decoded = max(stored), max(decoded)
    spans = []
    for n_stored, n_decoded in zip(stored, decoded, strict=True):
        extent, top_stored, top_decoded = n_stored, 0, 0
        if letterboxed:
            extent, top_stored = side_stored, (side_stored - n_stored) // 2
            top_decoded = (side_decoded - n_decoded) // 2
        # Stored coordinate u (pixel i spans [i, i + 1)) is top_decoded + (u - top_stored - 0.5) / step + 0.5.
        start = top_decoded + 0.5 - (top_stored + 0.5) / step
        spans.append((start, start + extent / step))
    (y0, y1), (x0, x1) = spans
    return x0, y0, x1, y1


def fit_square(
    frame: np.ndarray,
    size: int,
    params: PreprocessParams,
    shape: tuple[int, int] | None = None,
    step: int = 1,
) -> np.ndarray:
    """``frame`` letterboxed (when ``params`` say so) and resized to ``size`` x ``size``.

    The network's input (:func:`preprocess_frame`) and training's cached images are both made
    here. ``shape`` and ``step`` describe a frame decoded at a reduced resolution: the stored
    ``(rows, columns)``, and ``2**r`` for a JPEG 2000 low-pass band (:func:`cosited_box`), 1 for
    block means.
    """
    height, width = frame.shape
    if params.letterbox and height != width:
        frame = letterbox(frame, float(frame.min()) if frame.size else 0.0)
    box = None
    if step > 1 and shape is not None:
        box = cosited_box(shape, (height, width), step, params.letterbox)
    return resize(frame, size, params.resize, box)


def percentiles(values: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(values, qs)`` (its default "linear" method), bit for bit, at about half the cost.

    One partition for both percentiles, and numpy's own interpolation formula
    (``_lerp``: ``a + (b - a) * t``, from the upper side when ``t >= 0.5``).
    """
    flat = values.ravel()
    if flat.size == 0:
        raise ValueError("percentiles of an empty array")
    index = np.asarray(qs, dtype=np.float64) / 100.0 * (flat.size - 1)
    below = np.floor(index).astype(np.intp)
    above = np.minimum(below + 1, flat.size - 1)
    t = index - below
    part = np.partition(flat, np.unique(np.concatenate([below, above])))
    a, b = part[below], part[above]
    diff = b - a
    out = np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)
    return float(out[0]), float(out[1])


def scale_intensity(frame: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Map a frame to [0, 1]: per-image min-max (the paper) or a percentile clip.

    A constant frame maps to zeros, never NaN.
    """
    if params.scaling == "minmax":
        low, high = float(frame.min()), float(frame.max())
    else:
        low, high = percentiles(frame, (params.p_low, params.p_high))
    span = high - low
    if not np.isfinite(span) or span <= 1e-6:
        return np.zeros_like(frame, dtype=np.float32)
    return np.clip((frame - low) / span, 0.0, 1.0).astype(np.float32)


def preprocess_frame(
    frame: np.ndarray,
    colourfulness: float,
    params: PreprocessParams,
    *,
    finite: bool = False,
    shape: tuple[int, int] | None = None,
    step: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn one decoded grey frame into network input.

    Parameters
    ----------
    frame
        (H, W) array in physical units (after the Modality LUT).
    colourfulness
        The source image's colourfulness in [0, 1] (0 for greyscale).
    params
        Preprocessing parameters from the model spec.
    finite
        The caller guarantees finite float32 (a :class:`~sorter.dicom.DecodedImage`):
        no pass to check it.
    shape
        ``(rows, columns)`` of the stored image when ``frame`` was decoded at a reduced
        resolution: the size features describe the image, not the decode.
    step
        Stored pixels between the frame's samples when it is a JPEG 2000 low-pass band
        (:attr:`~sorter.dicom.DecodedImage.grid_step`; see :func:`cosited_box`); 1 otherwise.

    Returns
    -------
    image : np.ndarray
        (C, S, S) float32, channels in ``params.channels`` order.
    features : np.ndarray
        (F,) float32, features in ``params.features`` order.
    """
    if not (finite and frame.dtype == np.float32):
        frame = finite_float32(frame)
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D grey frame, got shape {frame.shape}")
    height, width = frame.shape
    feature_height, feature_width = shape if shape is not None else (height, width)
    small = fit_square(frame, params.input_size, params, shape, step)
    channels = []
    for name in params.channels:
        if name == "scaled":
            channels.append(scale_intensity(small, params))
        else:  # "hu"
            low, high = params.hu_low, params.hu_high
            channels.append(np.clip((small - low) / (high - low), 0.0, 1.0))
    features = [_feature(name, colourfulness, feature_height, feature_width) for name in params.features]
    return np.stack(channels).astype(np.float32), np.asarray(features, dtype=np.float32)


def _feature(name: str, colourfulness: float, height: int, width: int) -> float:
    """One scalar input (see :data:`sorter.model.spec.FEATURES`); only those a model asks for are computed."""
    side = max(height, width, 1)
    if name == "colourfulness":
        value = colourfulness
    elif name == "matrix":
        value = (math.log2(side) - 6.0) / 6.0
    else:  # "aspect"
        value = min(height, width) / side
    return min(max(float(value), 0.0), 1.0)


def prepare_image(
    frames: np.ndarray,
    colourfulness: float,
    params: PreprocessParams,
    shape: tuple[int, int] | None = None,
    step: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocess every frame of one decoded instance: arrays (k, C, S, S) and (k, F).

    ``frames`` are a :class:`~sorter.dicom.DecodedImage`'s: finite float32; ``shape`` its
    stored ``(rows, columns)`` (:attr:`~sorter.dicom.DecodedImage.shape`) and ``step`` its
    :attr:`~sorter.dicom.DecodedImage.grid_step`.
    Torch-free, so that decode processes can run it without loading the model.
    """
    pairs = [
        preprocess_frame(frame, colourfulness, params, finite=True, shape=shape, step=step)
        for frame in frames
    ]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
