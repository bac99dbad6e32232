"""A cascade artefact: the screen answers where it is sure, the main network takes the rest, in torch
and in the exported ONNX graph alike, and the leave-sources-out rule in train/cascade.py is the
network's own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sorter.domain import ALL_LABELS
from sorter.model.artefact import load_artefact, save_artefact
from sorter.model.network import CascadeNet, SorterNet, build_network
from sorter.model.ort import OnnxRunner
from sorter.model.runtime import export_onnx
from sorter.model.spec import ModelSpec, PreprocessParams, ScreenSpec
from train.cascade import LosoRun, assemble, cascade_logits, choose_threshold

PRE = PreprocessParams(input_size=64, channels=("scaled", "hu"), features=("colourfulness",))
MAIN_T, SCREEN_T = 1.4, 2.0


def _spec(arch: str = "mobilenet_v3_small", screen: ScreenSpec | None = None) -> ModelSpec:
    return ModelSpec(arch=arch, labels=tuple(ALL_LABELS), preprocess=PRE, temperature=MAIN_T, screen=screen)


def _cascade(threshold: float) -> tuple[CascadeNet, ModelSpec]:
    spec = _spec("efficientnet_lite0", ScreenSpec("mobilenet_v3_small", SCREEN_T, threshold))
    torch.manual_seed(0)
    network = build_network(spec).eval()
    assert isinstance(network, CascadeNet)
    with torch.no_grad():  # a random screen is near-uniform: spread its confidences over (0, 1)
        network.screen.head.weight.mul_(200.0)
    return network, spec


def _batch(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 2, 64, 64, generator=gen), torch.rand(n, 1, generator=gen)


def _parts(network: CascadeNet, images: torch.Tensor, features: torch.Tensor) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        fast = network.screen(images, features).numpy()
        slow = SorterNet.forward(network, images, features).numpy()
    return fast, slow


def _between(confidence: np.ndarray) -> float:
    """A threshold in the middle of the widest gap between confidences: no frame sits on it."""
    ordered = np.sort(confidence)
    gap = int(np.argmax(np.diff(ordered[2:-2]))) + 2
    return float((ordered[gap] + ordered[gap + 1]) / 2)


def test_the_screen_answers_where_it_is_sure_and_the_main_network_takes_the_rest():
    network, _ = _cascade(0.5)
    images, features = _batch()
    fast, slow = _parts(network, images, features)
    confidence = torch.softmax(torch.from_numpy(fast) / SCREEN_T, dim=1).amax(dim=1).numpy()
    threshold = _between(confidence)
    unsure = confidence < threshold
    assert 0 < unsure.sum() < len(unsure)
    network.threshold = threshold
    with torch.no_grad():
        out = network(images, features).numpy()
    np.testing.assert_allclose(out[unsure], slow[unsure], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[~unsure], fast[~unsure] * MAIN_T / SCREEN_T, rtol=1e-5, atol=1e-5)
    # train/cascade.py applies the same rule to the two networks' out-of-fold logits.
    rule, sent = cascade_logits(slow, fast, MAIN_T, SCREEN_T, threshold)
    assert (sent == unsure).all()
    np.testing.assert_allclose(rule, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["between", "none", "all"])
def test_the_exported_graph_routes_frames_as_torch_does(where):
    network, spec = _cascade(0.5)
    images, features = _batch()
    fast, _ = _parts(network, images, features)
    confidence = torch.softmax(torch.from_numpy(fast) / SCREEN_T, dim=1).amax(dim=1).numpy()
    threshold = {"between": _between(confidence), "none": 0.0, "all": 1.0}[where]
    spec = replace(spec, screen=replace(spec.screen, threshold=threshold))
    rebuilt = build_network(spec).eval()
    rebuilt.load_state_dict(network.state_dict())
    with torch.no_grad():
        expected = rebuilt(images, features).numpy()
    got = OnnxRunner(export_onnx(rebuilt, spec), threads=1)(images.numpy(), features.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_single_network_spec_reads_and_writes_as_before_and_a_screen_round_trips():
    plain = _spec().to_dict()
    assert "screen" not in plain and ModelSpec.from_dict(plain).screen is None
    screened = _spec("efficientnet_lite0", ScreenSpec("mobilenet_v3_small", 1.7, 0.9))
    assert ModelSpec.from_dict(screened.to_dict()) == screened
    assert screened.network_name == "efficientnet_lite0 (mobilenet_v3_small screen)"
    assert _spec().network_name == "mobilenet_v3_small"
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        ScreenSpec("mobilenet_v3_small", 1.0, 1.5)


def _artefact(path: Path, spec: ModelSpec, seed: int) -> Path:
    torch.manual_seed(seed)
    save_artefact(build_network(spec).eval(), spec, path)
    return path


def test_assemble_joins_two_artefacts_into_one_cascade_and_refuses_other_inputs(tmp_path):
    main = _artefact(tmp_path / "main.pt", _spec("efficientnet_lite0"), 0)
    screen = _artefact(tmp_path / "screen.pt", _spec(), 1)
    assemble(main, screen, 0.8, (MAIN_T, SCREEN_T), tmp_path / "cascade.pt")
    loaded = load_artefact(tmp_path / "cascade.pt")
    assert isinstance(loaded.network, CascadeNet)
    assert loaded.spec.screen == ScreenSpec("mobilenet_v3_small", SCREEN_T, 0.8)
    assert loaded.spec.temperature == MAIN_T and loaded.network.rescale == pytest.approx(MAIN_T / SCREEN_T)
    images, features = _batch(6)
    with torch.no_grad():
        alone = load_artefact(screen).network(images, features)
        joined = loaded.network.screen(images, features)
    torch.testing.assert_close(joined, alone)
    other = _artefact(tmp_path / "other.pt", replace(_spec(), preprocess=replace(PRE, input_size=96)), 2)
    with pytest.raises(ValueError, match="different inputs"):
        assemble(main, other, 0.8, (MAIN_T, SCREEN_T), tmp_path / "no.pt")
    with pytest.raises(ValueError, match="already has a screen"):
        assemble(tmp_path / "cascade.pt", screen, 0.8, (MAIN_T, SCREEN_T), tmp_path / "no.pt")


def test_adapting_a_cascade_keeps_the_main_network_and_drops_the_screen():
    from sorter.adaptation.core import adapted_network

    network, _ = _cascade(0.9)

    class Result:
        weight = network.head.weight.detach().numpy() * 0.5
        bias = network.head.bias.detach().numpy()

    adapted = adapted_network(network, Result())  # type: ignore[arg-type]
    assert type(adapted) is SorterNet
    images, features = _batch(4)
    with torch.no_grad():
        pooled = torch.cat([network.backbone(images), features], dim=1)
        expected = pooled @ torch.from_numpy(Result.weight).T + network.head.bias
        torch.testing.assert_close(adapted(images, features), expected, rtol=1e-4, atol=1e-4)


def test_the_chosen_threshold_is_the_lowest_that_keeps_the_main_networks_accuracy():
    rows = [
        {"threshold": 0.5, "balanced_accuracy": 0.60, "source_macro": 0.70},
        {"threshold": 0.7, "balanced_accuracy": 0.676, "source_macro": 0.69},
        {"threshold": 0.8, "balanced_accuracy": 0.677, "source_macro": 0.718},
        {"threshold": 0.9, "balanced_accuracy": 0.681, "source_macro": 0.720},
    ]
    reference = {"balanced_accuracy": 0.680, "source_macro": 0.720}
    assert choose_threshold(rows, reference, 0.005) == 0.8
    assert choose_threshold(rows, reference, 0.0) == 0.9
    assert choose_threshold(rows, {"balanced_accuracy": 0.99, "source_macro": 0.99}, 0.0) == 0.9
    # The header test counts too: relabelled copies caught must stay as well.
    for row, caught in zip(rows, (0.7, 0.7, 0.60, 0.74), strict=True):
        row |= {"agree": 0.7, "caught": caught}
    assert choose_threshold(rows, reference | {"agree": 0.7, "caught": 0.74}, 0.005) == 0.9


def test_loso_runs_of_other_images_are_not_joined(tmp_path):
    from train.cascade import check_pair

    def run(sources: list[str], seed: int = 0) -> LosoRun:
        n = len(sources)
        config = {"manifest": "m.csv", "folds": 5, "seed": seed, "labels": ["CT", "MR"]}
        labels, folds = np.array(["CT"] * n), np.zeros(n, int)
        return LosoRun(tmp_path, np.zeros((n, 2), np.float32), labels, np.array(sources), folds, 1.0, config)

    check_pair(run(["a", "b"]), run(["a", "b"]))
    with pytest.raises(ValueError, match="same images"):
        check_pair(run(["a", "b"]), run(["b", "a"]))
    with pytest.raises(ValueError, match="differ in seed"):
        check_pair(run(["a", "b"]), run(["a", "b"], seed=3))
