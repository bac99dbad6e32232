"""Small fields of view (``zoom_augment``): CT and MR frames cropped as a scanner reconstructs an
extremity or an inner ear, with no air around the body; ``zoom_augment: 0`` changes nothing;
``zoom_on_body`` keeps the crops on the body."""

from __future__ import annotations

import pytest
import torch

from sorter.model.spec import PreprocessParams
from train.augment import _body_boxes, _geometry, augment_batch
from train.config import resolve_config
from train.fit import frames_of


def _ct(n: int, size: int = 96) -> torch.Tensor:
    """CT-like frames in HU: a body (40 HU) filling the middle three quarters, air around it."""
    frame = torch.full((size, size), -1000.0)
    frame[size // 8 : 7 * size // 8, size // 8 : 7 * size // 8] = 40.0
    return frame.repeat(n, 1, 1)


def _air(frames: torch.Tensor) -> float:
    return float((frames < -500).float().mean())


def test_zoom_crops_flagged_frames_to_a_small_field_of_view():
    raw = _ct(64)
    flagged = torch.tensor([True, False] * 32)
    out = _geometry(raw, 64, torch.Generator().manual_seed(0), flagged, 1.0)
    plain = _geometry(raw, 64, torch.Generator().manual_seed(0))
    # Flagged frames are magnified: the body fills more of them than of the others.
    assert _air(out[flagged]) < 0.5 * _air(out[~flagged])
    # Some flagged frames hold no air at all: CT as a small-FOV reconstruction stores it.
    assert any(_air(frame[None]) == 0 for frame in out[flagged])
    assert 0.6 < _air(plain) / _air(out[~flagged]) < 1.6  # the others are drawn as before


def test_zoom_off_draws_nothing():
    raw = _ct(8)
    flagged = torch.ones(8, dtype=torch.bool)
    for zoom, zoomable in ((0.0, flagged), (1.0, None)):
        gen = torch.Generator().manual_seed(3)
        assert torch.equal(
            _geometry(raw, 64, gen, zoomable, zoom), _geometry(raw, 64, torch.Generator().manual_seed(3))
        )
        assert torch.equal(gen.get_state(), _draws_of_plain_geometry(raw))


def _draws_of_plain_geometry(raw: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    _geometry(raw, 64, gen)
    return gen.get_state()


def _trunk_in_a_corner(n: int, size: int = 96) -> torch.Tensor:
    """A body (40 HU) in the top-left two fifths of the frame, air elsewhere: crops placed
    anywhere often miss it."""
    frame = torch.full((size, size), -1000.0)
    frame[: 2 * size // 5, : 2 * size // 5] = 40.0
    return frame.repeat(n, 1, 1)


def test_zoom_on_body_keeps_every_crop_on_the_body():
    raw, flagged = _trunk_in_a_corner(64), torch.ones(64, dtype=torch.bool)
    anywhere = _geometry(raw, 64, torch.Generator().manual_seed(0), flagged, 1.0)
    on_body = _geometry(raw, 64, torch.Generator().manual_seed(0), flagged, 1.0, on_body=True)
    air = lambda frames: (frames < -500).float().mean(dim=(1, 2))  # noqa: E731
    assert int((air(anywhere) > 0.95).sum()) >= 10  # the suspect: crops of air alone
    assert float(air(on_body).max()) < 0.6 and _air(on_body) < 0.5 * _air(anywhere)


def test_body_box_is_found_and_a_blank_frame_is_the_whole_frame():
    raw = torch.stack([_trunk_in_a_corner(1)[0], torch.zeros(96, 96)])
    boxes = _body_boxes(raw)
    # left, right, top, bottom in affine_grid's -1..1: the body spans 0..38 of 96 pixels.
    assert torch.allclose(boxes[0], torch.tensor([-1.0, 2 * 38 / 96 - 1, -1.0, 2 * 38 / 96 - 1]))
    assert boxes[1].tolist() == [-1.0, 1.0, -1.0, 1.0]


def test_zoom_on_body_off_or_without_zoom_draws_as_before():
    raw, flagged = _ct(8), torch.ones(8, dtype=torch.bool)
    for zoom, on_body in ((0.0, True), (1.0, False)):
        gen, before = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        out = _geometry(raw, 64, gen, flagged, zoom, on_body)
        assert torch.equal(out, _geometry(raw, 64, before, flagged, zoom))
        assert torch.equal(gen.get_state(), before.get_state())


def test_augment_batch_passes_zoom_to_the_crop():
    raw, feats = _ct(32), torch.zeros(32, 1)
    params = PreprocessParams(input_size=64, channels=("scaled", "hu"))
    zoomed, _ = augment_batch(
        raw,
        feats,
        params,
        torch.Generator().manual_seed(0),
        zoomable=torch.ones(32, dtype=torch.bool),
        zoom=1.0,
    )
    plain, _ = augment_batch(raw, feats, params, torch.Generator().manual_seed(0))
    hu = params.channels.index("hu")
    # The hu channel shows air (0) around the body far less often in zoomed frames.
    assert (zoomed[:, hu] < 0.1).float().mean() < 0.5 * (plain[:, hu] < 0.1).float().mean()


def test_zoom_knobs_are_checked_by_name(tmp_path):
    assert resolve_config("default").zoom_augment == 0.0  # off unless a recipe asks
    config = resolve_config("default", zoom_augment=0.3)
    assert config.zoom_augment == 0.3 and config.zoom_labels == ("CT", "MR")
    labels = ["CT", "MR", "PT", "NM", "US"]
    assert frames_of(labels, config.zoom_labels).tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError, match=r"zoom_augment must be in \[0, 1\], not 1.5"):
        resolve_config("default", zoom_augment=1.5)
    with pytest.raises(ValueError, match="zoom_labels names SPECT, not among the labels"):
        resolve_config("default", zoom_labels=["CT", "SPECT"])
    assert resolve_config("default").zoom_on_body is False
    assert resolve_config("default", zoom_on_body=True).zoom_on_body is True
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("zoom_augment: 0.3\nzoom_on_body: sometimes\n")
    with pytest.raises(ValueError, match="zoom_on_body must be bool, not 'sometimes'"):
        resolve_config("default", recipe)
