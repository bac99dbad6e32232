"""Simulated SPECT (``spect_sim``): a PET frame degraded as a gamma camera records it, drawn in
place of NM frames in training and labelled NM; ``spect_sim: 0`` changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train import fit as fit_module
from train.augment import simulate_spect, spect_from_pet
from train.config import FitConfig, resolve_config
from train.data import ImageSet
from train.fit import fit


def _pet(n: int = 4, size: int = 64, peak: float = 7000.0) -> torch.Tensor:
    """PET-like frames in Bq/ml inside letterbox bars: a warm disc, a hot spot, empty corners."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    spot = ((yy - size / 2) ** 2 + (xx - size * 0.4) ** 2) < 9
    frame = disc.float() * peak / 4 + spot.float() * peak * 3 / 4
    return frame.repeat(n, 1, 1)


def test_spect_from_pet_records_counts_blurred_and_noisy():
    pet = _pet(1)[0]
    gen = torch.Generator().manual_seed(0)
    sims = [spect_from_pet(pet, gen) for _ in range(20)]
    for sim in sims:
        assert sim.shape == pet.shape and sim.min() >= 0
        assert sim[:6, :6].max() == 0  # no activity, no counts: the bars and background stay empty
        # the hot spot is still where the tracer is
        assert sim[29:35, 22:29].mean() > sim[29:35, 36:42].mean()
    # stored at a random scale: the peaks span decades, so the hu channel cannot learn one for NM
    peaks = torch.stack([sim.max() for sim in sims])
    assert peaks.max() / peaks.min() > 30
    # blur: the spot's edge, one sharp step in the PET, is spread over several pixels
    step = (pet[32, 27] - pet[32, 29]).abs() / pet.max()
    spread = torch.stack([(s[32, 27] - s[32, 29]).abs() / s.max() for s in sims]).mean()
    assert step == 0.75 and spread < 0.5
    # counting noise: the disc, uniform in the PET, varies from pixel to pixel in most simulations
    flat = [s[32, 36:42] for s in sims]
    assert sum(bool(f.std() / f.mean().clamp_min(1e-6) > 0.02) for f in flat) >= 10


def test_spect_from_pet_is_seeded():
    pet = _pet(1)[0]
    a = spect_from_pet(pet, torch.Generator().manual_seed(3))
    b = spect_from_pet(pet, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_simulate_spect_off_or_without_donors_draws_nothing():
    raw, feats, gen = _pet(), torch.zeros(4, 1), torch.Generator().manual_seed(0)
    flagged, donors = torch.ones(4, dtype=torch.bool), _pet(2)
    state = gen.get_state()
    for args in (
        (donors, torch.zeros(2, 1), torch.ones(2), gen, 0.0),
        (donors[:0], torch.zeros(0, 1), torch.ones(0), gen, 1.0),
    ):
        out, out_feats = simulate_spect(raw, feats, flagged, *args)
        assert out is raw and out_feats is feats
    out, _ = simulate_spect(
        raw, feats, torch.zeros(4, dtype=torch.bool), donors, torch.zeros(2, 1), torch.ones(2), gen, 1.0
    )
    assert out is raw
    assert torch.equal(gen.get_state(), state)  # runs without it stay bit for bit as before


def test_simulate_spect_replaces_only_flagged_frames_from_weighted_donors():
    raw = torch.full((6, 64, 64), -5.0)
    feats = torch.zeros(6, 1)
    flagged = torch.tensor([True, False, True, False, True, True])
    donors = torch.cat([_pet(1), torch.zeros(1, 64, 64)])  # the empty donor has no weight
    donors_feats = torch.tensor([[0.7], [0.1]])
    out, out_feats = simulate_spect(
        raw,
        feats,
        flagged,
        donors,
        donors_feats,
        torch.tensor([1.0, 0.0]),
        torch.Generator().manual_seed(0),
        1.0,
    )
    assert torch.equal(out[~flagged], raw[~flagged]) and torch.equal(out_feats[~flagged], feats[~flagged])
    for frame, feature in zip(out[flagged], out_feats[flagged], strict=True):
        assert frame.min() >= 0 and frame.max() > 0  # made from the PET donor, never the empty one
        assert feature.item() == pytest.approx(0.7)


def _images(n: int = 24) -> ImageSet:
    """CT, PT and NM frames of distinct constant values, so that a frame's origin can be told."""
    config = _config()
    size = config.cache_size
    labels = np.asarray(["CT", "PT", "NM"] * (n // 3))
    raw = np.stack([np.full((size, size), 1000.0 + i, np.float32) for i in range(n)])
    raw[labels == "PT"] = _pet(int((labels == "PT").sum()), size).numpy()
    return ImageSet(
        raw=raw,
        eval=np.zeros((n, 2, config.input_size, config.input_size), np.float32),
        features=np.zeros((n, 1), np.float32),
        labels=labels,
        sources=np.asarray([f"s{i % 6}" for i in range(n)]),
        groups=np.asarray([f"g{i}" for i in range(n)]),
        rows=np.arange(n),
        failures=[],
    )


def _config(**overrides: object) -> FitConfig:
    base = FitConfig(
        input_size=32,
        epoch_size=48,
        batch_size=16,
        labels=("CT", "NM", "PT"),
        threads=1,
        cache_dir=None,
        epochs=1,
    )
    return resolve_config(**{**base.__dict__, **overrides})


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_training_draws_simulations_for_nm_only_when_on(rate: float, tmp_path, monkeypatch):
    images, seen = _images(), []
    real = fit_module.augment_batch

    def spy(raw: torch.Tensor, *args: object, **kwargs: object):
        seen.append(raw.clone())
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(fit_module, "augment_batch", spy)
    fit(_config(spect_sim=rate), images, None, tmp_path, progress=False)
    images_pt = torch.from_numpy(images.raw[images.labels == "PT"][0])
    nm_values = {float(v) for v in images.raw[images.labels == "NM", 0, 0]}
    ct_values = {float(v) for v in images.raw[images.labels == "CT", 0, 0]}
    kinds = []
    for frame in torch.cat(seen):
        if (frame == frame[0, 0]).all():  # a CT or NM frame as stored
            kinds.append("NM" if float(frame[0, 0]) in nm_values else "CT")
            assert float(frame[0, 0]) in nm_values | ct_values
        else:  # the PET frame as stored, or a simulation made from it (blurred, noisy, rescaled)
            kinds.append("PT" if torch.equal(frame, images_pt) else "simulated")
    assert kinds.count("CT") > 0 and kinds.count("PT") > 0
    if rate == 0:
        assert kinds.count("simulated") == 0 and kinds.count("NM") > 0
    else:  # every NM draw was replaced
        assert kinds.count("simulated") > 0 and kinds.count("NM") == 0


def test_spect_sim_is_a_probability():
    assert resolve_config("default").spect_sim == 0.0  # the bundled recipe is unchanged
    assert resolve_config("default", spect_sim=0.3).spect_sim == 0.3
    with pytest.raises(ValueError, match=r"spect_sim must be in \[0, 1\], not 2"):
        resolve_config("default", spect_sim=2.0)
