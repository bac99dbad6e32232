"""Knowledge distillation's loss: zero when the student matches the teacher, and it pulls towards it."""

from __future__ import annotations

import torch

from train.fit import distillation_loss


def test_distillation_loss_is_zero_only_at_the_teacher():
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 0.5]])
    assert distillation_loss(teacher.clone(), teacher, 2.0).item() < 1e-6
    assert distillation_loss(torch.zeros_like(teacher), teacher, 2.0).item() > 0.1


def test_its_gradient_moves_the_student_towards_the_teacher():
    teacher = torch.tensor([[4.0, 0.0, 0.0]])
    student = torch.zeros(1, 3, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert student.grad is not None
    assert student.grad[0, 0] < 0 < student.grad[0, 1]  # raise the teacher's class, lower the others


def test_the_shipped_recipes_resolve():
    """train/recipes/*.yaml hold only known keys and valid values (the model card cites them)."""
    from dataclasses import replace
    from pathlib import Path

    from train.config import resolve_config

    recipes = sorted((Path(__file__).resolve().parents[1] / "train" / "recipes").glob("*.yaml"))
    assert len(recipes) == 19
    configs = {path.stem: resolve_config("default", path) for path in recipes}
    assert configs["pretrained"].pretrained and configs["pretrained"].arch == "efficientnet_lite0"
    for n in (1, 2):  # the larger candidates: the bundled recipe but for the backbone
        candidate = configs[f"pretrained-lite{n}"]
        assert candidate.pretrained and candidate.arch == f"efficientnet_lite{n}"
        assert candidate.epochs == configs["pretrained"].epochs
        assert candidate.preprocess() == configs["pretrained"].preprocess()
    assert configs["pretrained-shift"].shift_augment > 0
    # The input-size candidate: the bundled recipe but for the input size.
    larger = configs["pretrained-192"]
    assert larger.input_size == 192 and larger.arch == configs["pretrained"].arch and larger.pretrained
    assert larger.epochs == configs["pretrained"].epochs
    assert replace(larger.preprocess(), input_size=128) == configs["pretrained"].preprocess()
    # The unit-augmentation candidate: the bundled recipe but for unit_augment.
    units = configs["pretrained-units"]
    assert units.unit_augment == 1.0 and replace(units, unit_augment=0.0) == configs["pretrained"]
    # The polarity candidates: the bundled recipe but for inverting NM and PT (or NM alone) in training.
    polarity = configs["pretrained-polarity"]
    assert (
        polarity.polarity_augment == 0.5 and replace(polarity, polarity_augment=0.0) == configs["pretrained"]
    )
    nm_only = configs["pretrained-polarity-nm"]
    assert nm_only.polarity_labels == ("NM",)
    assert replace(nm_only, polarity_labels=("NM", "PT")) == polarity
    # The linear-probing candidate: the bundled recipe but for the probing epochs before it.
    lpft = configs["pretrained-lpft"]
    assert lpft.probe_epochs > 0 and replace(lpft, probe_epochs=0) == configs["pretrained"]
    # The weight-averaging candidate: the bundled recipe but for averaging its last epochs.
    swa = configs["pretrained-swa"]
    assert swa.average_from > 0 and replace(swa, average_from=0.0) == configs["pretrained"]
    # The simulated-SPECT candidates: the bundled recipe, and the default one, but for spect_sim.
    spect = configs["pretrained-spect-sim"]
    assert spect.spect_sim > 0 and replace(spect, spect_sim=0.0) == configs["pretrained"]
    assert replace(configs["spect-sim"], spect_sim=0.0) == resolve_config("default")
    zoom = configs["pretrained-spect-sim-zoom"]  # and small fields of view of CT and MR on top
    assert zoom.zoom_augment > 0 and replace(zoom, zoom_augment=0.0) == spect
    body = configs["pretrained-spect-sim-zoom-body"]  # the same crops, kept on the body
    assert body.zoom_on_body and replace(body, zoom_on_body=False) == zoom
    body_xr = configs["pretrained-spect-sim-zoom-body-xr"]  # radiographs cropped too
    assert body_xr.zoom_labels == ("CT", "MR", "XR") and replace(body_xr, zoom_labels=("CT", "MR")) == body
    assert configs["student"].teacher and configs["student"].arch == "mobilenet_v3_small"
    assert configs["student"].preprocess() == configs["pretrained"].preprocess()  # the same inputs
    # The bundled ensemble's partner and its leave-sources-out twin: the main network's inputs.
    for name in ("screen", "screen-loso"):
        assert configs[name].arch == "mobilenet_v3_small" and configs[name].teacher
        assert configs[name].preprocess() == configs["pretrained"].preprocess()
