"""Acquisition-shift augmentation: each transform does what archives do, and ``shift=0`` is off."""

from __future__ import annotations

import torch

from sorter.model.preprocess import preprocess_frame
from train.augment import _border, _export8, _text, acquisition_shift, polarity_flip, unit_gain


def _ct(n: int = 8, size: int = 64) -> torch.Tensor:
    """CT-like frames in Hounsfield units: air around a soft-tissue disc."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    frame = torch.where(disc, 40.0, -1000.0)
    return frame.repeat(n, 1, 1) + torch.randn(n, size, size, generator=torch.Generator().manual_seed(1))


def test_shift_zero_leaves_frames_alone():
    x = _ct()
    assert torch.equal(acquisition_shift(x, torch.Generator().manual_seed(0), 0.0), x)


def test_export8_makes_a_windowed_picture():
    x = _ct(1)[0]
    for jpeg in (0.0, 1.0):
        v = _export8(x, torch.Generator().manual_seed(0), jpeg)
        assert v.min() >= 0 and v.max() <= 255 and torch.equal(v, v.round())
        assert v.max() - v.min() > 200  # the window spans the picture's grey range


def test_borders_and_text_use_the_frame_extremes():
    x = _ct(1)[0]
    bordered = _border(x, torch.Generator().manual_seed(3))
    changed = bordered != x
    assert changed.any() and set(bordered[changed].unique().tolist()) <= {x.min().item(), x.max().item()}
    text = _text(x, torch.Generator().manual_seed(4))
    assert (text != x).any() and torch.all(text[text != x] == x.max())


def test_shift_is_seeded_and_varied():
    x = _ct(32)
    a = acquisition_shift(x, torch.Generator().manual_seed(0), 1.0)
    b = acquisition_shift(x, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(a, b) and a.shape == x.shape
    touched = [(a[i] != x[i]).any().item() for i in range(len(x))]
    assert 0 < sum(touched) < len(x)  # some frames change, some stay as they were
    exported = [i for i in range(len(x)) if a[i].min() >= 0 and torch.equal(a[i], a[i].round())]
    assert exported  # at least one frame went out as an 8-bit picture


def _pet(n: int = 4, size: int = 64, peak: float = 7000.0) -> torch.Tensor:
    """PET-like frames in Bq/ml: zero background, a hot disc and a hotter spot."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    spot = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2) < 16
    frame = disc.float() * peak / 4 + spot.float() * peak * 3 / 4
    return frame.repeat(n, 1, 1) + torch.rand(n, size, size, generator=torch.Generator().manual_seed(2))


def test_unit_gain_off_draws_nothing():
    x, gen = _pet(), torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(unit_gain(x, torch.ones(len(x), dtype=torch.bool), gen, 0.0), x)
    assert torch.equal(gen.get_state(), state)  # runs without it stay bit for bit as before


def test_unit_gain_moves_only_unitless_frames_and_only_the_hu_channel():
    from sorter.model.spec import PreprocessParams

    x = torch.cat([_ct(4), _pet(4)])
    unitless = torch.tensor([False] * 4 + [True] * 4)
    out = unit_gain(x, unitless, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(out[:4], x[:4])  # CT keeps its Hounsfield units
    ratios = (out[4:].flatten(1).amax(1) / x[4:].flatten(1).amax(1)).tolist()
    assert all(r > 0 for r in ratios) and len({round(r, 6) for r in ratios}) == 4  # a gain per frame
    assert max(ratios) / min(ratios) > 10  # spread over decades, not a nudge
    params = PreprocessParams(input_size=64, channels=("scaled", "hu"))
    before = torch.stack([torch.from_numpy(preprocess_frame(f.numpy(), 0.0, params)[0]) for f in x[4:]])
    after = torch.stack([torch.from_numpy(preprocess_frame(f.numpy(), 0.0, params)[0]) for f in out[4:]])
    assert torch.allclose(before[:, 0], after[:, 0], atol=1e-4)  # the scaled channel cannot tell
    assert (before[:, 1] - after[:, 1]).abs().amax() > 0.1  # what the hu channel sees moves


def test_unit_augment_is_a_probability():
    import pytest

    from train.config import resolve_config

    assert resolve_config("default", unit_augment=0.5).unit_augment == 0.5
    with pytest.raises(ValueError, match=r"unit_augment must be in \[0, 1\], not 1.5"):
        resolve_config("default", unit_augment=1.5)


def test_polarity_flip_off_draws_nothing():
    x, gen = _pet(), torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(polarity_flip(x, torch.ones(len(x), dtype=torch.bool), gen, 0.0), x)
    assert torch.equal(gen.get_state(), state)  # runs without it stay bit for bit as before


def test_polarity_flip_inverts_only_flagged_frames_and_keeps_letterbox_bars():
    # A non-square PET frame letterboxed as training caches it: bars at the frame's minimum.
    pet = _pet(4, size=64)
    boxed = torch.zeros(4, 64, 96)
    boxed[:, :, 16:80] = pet + 1.0  # content above the bars' minimum
    x = torch.cat([_ct(2, size=96)[:, :64, :], boxed])
    flippable = torch.tensor([False, False, True, True, True, True])
    out = polarity_flip(x, flippable, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(out[:2], x[:2])  # CT is never shown inverted
    for frame, before in zip(out[2:], x[2:], strict=True):
        low, high = before.min(), before.max()
        assert torch.equal(frame[:, :16], before[:, :16]) and torch.equal(frame[:, 80:], before[:, 80:])
        assert torch.allclose(frame[:, 16:80], high + low - before[:, 16:80])  # the hot spot is now darkest
        assert frame[:, 16:80].argmin() == before[:, 16:80].argmax()
    some = polarity_flip(x, flippable, torch.Generator().manual_seed(0), 0.5)
    flipped = [not torch.equal(some[i], x[i]) for i in range(2, 6)]
    assert 0 < sum(flipped) < 4 or len(set(flipped)) == 1  # a draw per frame, seeded
    assert torch.equal(some, polarity_flip(x, flippable, torch.Generator().manual_seed(0), 0.5))


def test_polarity_augment_is_a_probability():
    import pytest

    from train.config import resolve_config

    assert resolve_config("default", polarity_augment=0.5).polarity_augment == 0.5
    with pytest.raises(ValueError, match=r"polarity_augment must be in \[0, 1\], not 2"):
        resolve_config("default", polarity_augment=2.0)


def test_polarity_labels_choose_the_frames_training_may_invert():
    import pytest

    from train.config import resolve_config
    from train.fit import frames_of

    assert resolve_config("default").polarity_labels == ("NM", "PT")  # runs before the knob unchanged
    nm_only = resolve_config("default", polarity_labels=["NM"])
    labels = ["CT", "NM", "PT", "NM", "MR"]
    assert frames_of(labels, nm_only.polarity_labels).tolist() == [False, True, False, True, False]
    assert frames_of(labels, ("NM", "PT")).tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="polarity_labels names SPECT, not among the labels CT, MR, PT"):
        resolve_config("default", polarity_labels=["NM", "SPECT"])
    assert resolve_config("default", labels=["CT", "MR"]).polarity_labels == ("NM", "PT")  # none to invert
