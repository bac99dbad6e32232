"""Acquisition-shift augmentation: each transform does what archives do, and ``shift=0`` is off."""

from __future__ import annotations

import torch

from train.augment import _border, _export8, _text, acquisition_shift


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
