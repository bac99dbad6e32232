"""Pure numpy image operations shared by the decoder and the model preprocessing; no I/O."""

from __future__ import annotations

import numpy as np

#: ITU-R BT.601 luma weights for R, G and B.
BT601_LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

#: Every how many pixels :func:`blank_frames` looks first (a prime: no alignment with rows).
_BLANK_SAMPLE_STEP = 97

#: Longest side of the pixel grid :func:`colourfulness` looks at.
_COLOURFULNESS_SIDE = 256


def blank_frames(frames: np.ndarray) -> np.ndarray:
    """One flag per frame of ``(k, H, W)``: True where every pixel holds the same value.

    Such a frame (a black padding frame, a failed reconstruction, a map that is all NaN) says
    nothing about what made it, yet the network answers anyway: an all-zero MR frame read as CT
    at 0.92 (zero is water in Hounsfield units), a false discrepancy.
    """
    flat = frames.reshape(len(frames), -1)
    # A sparse sample first: in a real image it differs at once, and only a frame whose sample is
    # one value is read in full (the full check took 10 % of a 512 x 512 CT file's load time).
    sample = flat[:, ::_BLANK_SAMPLE_STEP]
    blank = sample.min(axis=1) == sample.max(axis=1)
    if blank.any():
        maybe = np.flatnonzero(blank)
        whole = flat[maybe]
        blank[maybe] = whole.min(axis=1) == whole.max(axis=1)
    return np.asarray(blank)


def finite_float32(a: np.ndarray) -> np.ndarray:
    """Cast to float32 and replace NaN and infinities by zero.

    Parameters
    ----------
    a : numpy.ndarray
        Any numeric array.

    Returns
    -------
    numpy.ndarray
        A float32 array of the same shape with only finite values. A new
        array is returned unless `a` already was finite float32.
    """
    arr = np.asarray(a)
    if arr.dtype.kind in "biu":  # every integer is finite in float32 (its range reaches 3.4e38)
        return arr.astype(np.float32, copy=False)
    # Values beyond float32's range become inf on the cast; they are caught below.
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32, copy=False)
    finite = np.isfinite(out)
    if finite.all():
        return out
    if out is a:
        out = out.copy()
    out[~finite] = 0.0
    return out


def stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    """``np.stack(frames)``, without copying a single frame (a view with a new first axis)."""
    return frames[0][np.newaxis] if len(frames) == 1 else np.stack(frames)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """Convert RGB to grey with the ITU-R BT.601 luma weights.

    Parameters
    ----------
    rgb : numpy.ndarray
        Array of shape ``(..., H, W, 3)`` in any numeric dtype and range.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(..., H, W)`` in the input's units:
        ``0.299 R + 0.587 G + 0.114 B``.

    Raises
    ------
    ValueError
        If the last axis does not hold exactly three samples.
    """
    arr = np.asarray(rgb)
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an array of shape (..., H, W, 3), got {arr.shape}")
    weights = np.asarray(BT601_LUMA, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf become 0 just below
        grey = arr.astype(np.float32, copy=False) @ weights
    return finite_float32(grey)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Süsstrunk's colourfulness metric, scaled to [0, 1].

    With ``rg = R - G`` and ``yb = (R + G) / 2 - B`` the metric is
    ``sqrt(std(rg)² + std(yb)²) + 0.3 · sqrt(mean(rg)² + mean(yb)²)``
    (Hasler & Süsstrunk, "Measuring colourfulness in natural images", SPIE
    5007, 2003). It is defined on 8-bit RGB; about 100 means "extremely
    colourful", so the value is divided by 100 and clipped to [0, 1].

    Parameters
    ----------
    rgb : numpy.ndarray
        Array of shape ``(..., H, W, 3)`` with values on a 0-255 scale. Only
        a regular subsample of at most about 256 x 256 pixels per image is
        used, which keeps the cost flat for large images.

    Returns
    -------
    float
        0.0 for grey images (R = G = B everywhere) and for empty input.

    Raises
    ------
    ValueError
        If the last axis does not hold exactly three samples.
    """
    arr = np.asarray(rgb)
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an array of shape (..., H, W, 3), got {arr.shape}")
    if arr.size == 0:
        return 0.0
    h, w = arr.shape[-3], arr.shape[-2]
    step_h = max(1, -(-h // _COLOURFULNESS_SIDE))
    step_w = max(1, -(-w // _COLOURFULNESS_SIDE))
    sub = finite_float32(arr[..., ::step_h, ::step_w, :]).reshape(-1, 3).astype(np.float64)
    r, g, b = sub[:, 0], sub[:, 1], sub[:, 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = np.hypot(rg.std(), yb.std())
    mu = np.hypot(rg.mean(), yb.mean())
    value = float((sigma + 0.3 * mu) / 100.0)
    if not np.isfinite(value):
        return 0.0
    return min(1.0, max(0.0, value))
