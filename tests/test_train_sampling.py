"""The balanced sampler's weights: labels equal, large groups and sources damped as configured."""

from __future__ import annotations

import numpy as np
import pytest

from train.data import ImageSet
from train.fit import sample_weights


def image_set(labels: list[str], sources: list[str], groups: list[str]) -> ImageSet:
    """An image set with only the columns the sampler reads filled in."""
    n = len(labels)
    return ImageSet(
        raw=np.zeros((n, 2, 2), np.float32),
        eval=np.zeros((n, 1, 2, 2), np.float32),
        features=np.zeros((n, 0), np.float32),
        labels=np.asarray(labels),
        sources=np.asarray(sources),
        groups=np.asarray(groups),
        rows=np.arange(n),
        failures=[],
    )


# NM: one source of six slices of one series, one source of two planar scans.
# XR: two radiographs of one source.
IMAGES = image_set(
    labels=["NM"] * 8 + ["XR"] * 2,
    sources=["spect"] * 6 + ["planar"] * 2 + ["cxr"] * 2,
    groups=["s1"] * 6 + ["p1", "p2"] + ["x1", "x2"],
)


def by_source(weights: np.ndarray) -> dict[str, float]:
    return {str(s): float(weights[IMAGES.sources == s].sum()) for s in np.unique(IMAGES.sources)}


def test_labels_equally_likely_whatever_the_balance() -> None:
    for group_balance in (0.0, 0.5, 1.0):
        for source_balance in (0.0, 0.5, 1.0):
            w = sample_weights(IMAGES, group_balance, source_balance)
            assert w.sum() == pytest.approx(1.0)
            assert w[IMAGES.labels == "NM"].sum() == pytest.approx(0.5)
            assert w[IMAGES.labels == "XR"].sum() == pytest.approx(0.5)


def test_without_balance_every_image_of_a_label_weighs_the_same() -> None:
    shares = by_source(sample_weights(IMAGES, 0.0, 0.0))
    assert shares["spect"] == pytest.approx(0.5 * 6 / 8)
    assert shares["planar"] == pytest.approx(0.5 * 2 / 8)


def test_group_balance_makes_a_series_weigh_as_one_image() -> None:
    shares = by_source(sample_weights(IMAGES, 1.0, 0.0))
    # Three groups in NM: the six-slice series is one of them.
    assert shares["spect"] == pytest.approx(0.5 / 3)
    assert shares["planar"] == pytest.approx(0.5 * 2 / 3)


def test_source_balance_makes_every_source_of_a_label_equally_likely() -> None:
    for group_balance in (0.0, 0.5, 1.0):
        shares = by_source(sample_weights(IMAGES, group_balance, 1.0))
        assert shares["spect"] == pytest.approx(0.25)
        assert shares["planar"] == pytest.approx(0.25)
        assert shares["cxr"] == pytest.approx(0.5)


def test_source_balance_keeps_the_group_damping_inside_a_source() -> None:
    images = image_set(
        labels=["MR"] * 4,
        sources=["a"] * 4,
        groups=["g1", "g1", "g1", "g2"],
    )
    w = sample_weights(images, 1.0, 1.0)
    assert w[:3].sum() == pytest.approx(0.5)
    assert w[3] == pytest.approx(0.5)
