"""Linear probing before fine-tuning (``probe_epochs``): the backbone stays put while the head
learns, then everything trains; a run interrupted in either phase resumes where it was."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from train import fit as fit_module
from train.config import FitConfig, resolve_config
from train.data import ImageSet
from train.fit import fit

LABELS = ("CT", "MR")


def _images(n: int = 16, seed: int = 0) -> ImageSet:
    """Two labels of random frames in physical units: enough for the mechanics, not for accuracy."""
    config = _config()
    rng = np.random.default_rng(seed)
    raw = rng.uniform(-1000, 1000, (n, config.cache_size, config.cache_size)).astype(np.float32)
    size = config.input_size
    return ImageSet(
        raw=raw,
        eval=rng.uniform(0, 1, (n, 2, size, size)).astype(np.float32),
        features=np.zeros((n, 1), np.float32),
        labels=np.asarray([LABELS[i % 2] for i in range(n)]),
        sources=np.asarray([f"s{i % 4}" for i in range(n)]),
        groups=np.asarray([f"g{i}" for i in range(n)]),
        rows=np.arange(n),
        failures=[],
    )


def _config(**overrides: object) -> FitConfig:
    base = FitConfig(input_size=32, epoch_size=16, batch_size=8, labels=LABELS, threads=1, cache_dir=None)
    return resolve_config(**{**base.__dict__, **overrides})


def _backbone(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.backbone.named_parameters()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def interrupted_and_resumed(
    config: FitConfig, images: ImageSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_in_epoch: int
) -> tuple[dict, list[dict]]:
    """Fit ``config`` whole, then again with a Ctrl-C in epoch ``stop_in_epoch`` and ``--resume``;
    asserts both end with the same network and returns the checkpoint the Ctrl-C left and the
    resumed run's history."""
    whole, _ = fit(config, images, None, tmp_path / "whole", progress=False)
    real, calls = fit_module.train_one_epoch, []

    def stop(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == stop_in_epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        fit(config, images, None, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    resumed, history = fit(config, images, None, tmp_path / "cut", progress=False, resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    return checkpoint, history


def test_probe_epochs_train_the_head_alone_then_everything(tmp_path: Path) -> None:
    images = _images()
    # No epoch at all: the seed's initial network (resolve_config refuses such a run, fit does not).
    start = _backbone(fit(replace(_config(), epochs=0), images, None, tmp_path / "init", progress=False)[0])

    probed, history = fit(_config(probe_epochs=2, epochs=0), images, None, tmp_path / "probe", progress=False)
    assert [row["phase"] for row in history] == ["probe", "probe"]
    # Same seed, same initial backbone: probing moved no backbone weight (BatchNorm's running
    # statistics are buffers, not weights, and are re-estimated after training anyway).
    assert not _changed(start, _backbone(probed))

    tuned, history = fit(_config(probe_epochs=1, epochs=1), images, None, tmp_path / "lpft", progress=False)
    assert [row["phase"] for row in history] == ["probe", "fine-tune"]
    assert _changed(start, _backbone(tuned))
    assert all(p.requires_grad for p in tuned.parameters())


def test_a_run_interrupted_while_probing_resumes_to_the_same_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, config = _images(), _config(probe_epochs=2, epochs=1)
    checkpoint, history = interrupted_and_resumed(config, images, tmp_path, monkeypatch, stop_in_epoch=2)
    assert checkpoint["epoch"] == 1 and checkpoint["history"][0]["phase"] == "probe"
    assert [(row["epoch"], row["phase"]) for row in history] == [(1, "probe"), (2, "probe"), (3, "fine-tune")]
    assert json.dumps(history)


def test_probing_leaves_the_plateau_schedule_to_fine_tuning(tmp_path: Path) -> None:
    """The paper preset's decay on plateau counts fine-tuning's epochs only."""
    fit(_config(schedule="plateau", probe_epochs=2, epochs=1), _images(), None, tmp_path, progress=False)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["scheduler"]["last_epoch"] == 1


def test_negative_probe_epochs_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_epochs must be at least 0"):
        _config(probe_epochs=-1)
