"""Weight averaging (``average_from``): the trained network is the uniform average of the weights
after every step of the averaged epochs, and a run interrupted while averaging resumes to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train_probe import _config, _images, interrupted_and_resumed
from torch.optim.swa_utils import AveragedModel

from train import fit as fit_module
from train.fit import fit


def test_the_network_is_the_average_of_the_averaged_epochs_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images()
    snapshots: list[dict[str, torch.Tensor]] = []

    class Recording(AveragedModel):
        def update_parameters(self, model: torch.nn.Module) -> None:
            snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
            super().update_parameters(model)

    monkeypatch.setattr(fit_module, "AveragedModel", Recording)
    # 4 epochs of 2 steps, averaged from half-way: the steps of epochs 3 and 4.
    averaged, _ = fit(_config(epochs=4, average_from=0.5), images, None, tmp_path / "avg", progress=False)
    assert len(snapshots) == 4
    last, _ = fit(_config(epochs=4), images, None, tmp_path / "last", progress=False)

    for name, weight in averaged.named_parameters():
        mean = torch.stack([s[name] for s in snapshots]).mean(0)
        assert torch.allclose(weight, mean, atol=1e-6), name
    # Averaging changes no step (same seed, same trajectory): the last step is the plain run's.
    for name, weight in last.named_parameters():
        assert torch.equal(weight, snapshots[-1][name]), name
    assert any(not torch.equal(a, b) for a, b in zip(averaged.parameters(), last.parameters(), strict=True))


def test_a_run_interrupted_while_averaging_resumes_to_the_same_average(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, config = _images(), _config(epochs=3, average_from=0.4)
    checkpoint, _ = interrupted_and_resumed(config, images, tmp_path, monkeypatch, stop_in_epoch=3)
    assert int(checkpoint["averaged"]["n_averaged"]) == 2  # the Ctrl-C came after epoch 2's two steps


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_average_from_outside_the_run_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"average_from must be in \[0, 1\)"):
        _config(average_from=value)
