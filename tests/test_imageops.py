"""Unit tests for the pure numpy image operations."""

from __future__ import annotations

import numpy as np
import pytest

from sorter.imageops import colourfulness, finite_float32, rgb_to_grey


def _hasler(rgb: np.ndarray) -> float:
    """The metric written out in full, on every pixel, for comparison."""
    r, g, b = (rgb[..., i].astype(np.float64).ravel() for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    value = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(min(1.0, value / 100.0))


# --- rgb_to_grey -------------------------------------------------------------------------


def test_rgb_to_grey_uses_bt601_weights() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    grey = rgb_to_grey(rgb)
    assert grey.dtype == np.float32
    assert grey.shape == (1, 4)
    np.testing.assert_allclose(grey[0], [0.299 * 255, 0.587 * 255, 0.114 * 255, 255.0], rtol=1e-6)


def test_rgb_to_grey_keeps_leading_axes_and_units() -> None:
    rgb = np.full((2, 3, 5, 3), 1000, dtype=np.uint16)
    grey = rgb_to_grey(rgb)
    assert grey.shape == (2, 3, 5)
    np.testing.assert_allclose(grey, 1000.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 4), (3,)])
def test_rgb_to_grey_rejects_non_rgb(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="H, W, 3"):
        rgb_to_grey(np.zeros(shape))


def test_rgb_to_grey_replaces_non_finite_values() -> None:
    rgb = np.array([[[np.nan, 0.0, 0.0], [np.inf, 1.0, 1.0]]])
    grey = rgb_to_grey(rgb)
    assert np.isfinite(grey).all()
    assert grey[0, 0] == 0.0


# --- colourfulness -----------------------------------------------------------------------


def test_colourfulness_of_grey_images_is_zero() -> None:
    ramp = np.linspace(0, 255, 64 * 64).reshape(64, 64)
    grey_rgb = np.repeat(ramp[..., None], 3, axis=-1)
    assert colourfulness(grey_rgb) == 0.0
    assert colourfulness(np.zeros((8, 8, 3), dtype=np.uint8)) == 0.0


def test_colourfulness_matches_the_published_formula() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(60, 120, size=(40, 50, 3)).astype(np.uint8)
    rgb[..., 0] += 20  # a reddish cast so the mean term counts too
    assert colourfulness(rgb) == pytest.approx(_hasler(rgb), rel=1e-9)


def test_colourfulness_is_clipped_to_one() -> None:
    bars = np.zeros((30, 30, 3), dtype=np.uint8)
    bars[:10, :, 0] = 255
    bars[10:20, :, 1] = 255
    bars[20:, :, 2] = 255
    assert colourfulness(bars) == 1.0


def test_colourfulness_orders_images_by_saturation() -> None:
    base = np.full((32, 32, 3), 128.0)
    mild, strong = base.copy(), base.copy()
    mild[:16, :, 0] += 20
    strong[:16, :, 0] += 80
    assert 0.0 < colourfulness(mild) < colourfulness(strong) <= 1.0


def test_colourfulness_subsamples_large_images() -> None:
    # A periodic pattern whose period divides the subsampling step looks the same
    # at every scale, so the subsample must give the full-resolution value.
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, size=(1, 1, 3)).astype(np.float32)
    small = np.tile(tile, (256, 256, 1))
    small[::2, :, 0] = 0  # stripes of two colours
    large = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)  # 2048 x 2048
    assert colourfulness(large) == pytest.approx(colourfulness(small), rel=1e-6)


def test_colourfulness_accepts_frame_stacks_and_rejects_grey_arrays() -> None:
    frames = np.zeros((3, 16, 16, 3))
    frames[1, ..., 2] = 200
    assert 0.0 < colourfulness(frames) <= 1.0
    with pytest.raises(ValueError):
        colourfulness(np.zeros((16, 16)))


def test_colourfulness_of_empty_input_is_zero() -> None:
    assert colourfulness(np.zeros((0, 5, 3))) == 0.0


# --- finite_float32 ----------------------------------------------------------------------


def test_finite_float32_replaces_nan_and_infinities() -> None:
    a = np.array([1.0, np.nan, np.inf, -np.inf, 1e300], dtype=np.float64)
    out = finite_float32(a)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.0, 0.0, 0.0])  # 1e300 overflows float32


def test_finite_float32_does_not_modify_its_input() -> None:
    a = np.array([np.nan, 2.0], dtype=np.float32)
    out = finite_float32(a)
    assert np.isnan(a[0])
    np.testing.assert_array_equal(out, [0.0, 2.0])


def test_finite_float32_passes_clean_float32_through() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert finite_float32(a) is a
    ints = np.arange(4, dtype=np.int16)
    out = finite_float32(ints)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0, 1, 2, 3])


def test_integers_become_float32_without_a_finiteness_pass():
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.int64, np.bool_):
        a = np.arange(12, dtype=dtype).reshape(3, 4) if dtype is not np.bool_ else np.ones((3, 4), dtype)
        out = finite_float32(a)
        assert out.dtype == np.float32 and np.array_equal(out, a.astype(np.float32))


def test_percentiles_match_numpy_bit_for_bit():
    from sorter.model.preprocess import percentiles

    rng = np.random.default_rng(7)
    for trial in range(300):
        n = int(rng.integers(1, 5000))
        values = [
            rng.random(n).astype(np.float32),
            rng.integers(-1024, 3000, n).astype(np.float32),
            rng.normal(size=n) * 1e3,
        ][trial % 3]
        qs = (0.5, 99.5) if trial % 2 else (float(rng.uniform(0, 100)), float(rng.uniform(0, 100)))
        expected = tuple(float(v) for v in np.percentile(values, qs))
        assert percentiles(values, qs) == expected
