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
from train.cascade import LosoRun, assemble, cascade_logits, choose_thresholds

PRE = PreprocessParams(input_size=64, channels=("scaled", "hu"), features=("colourfulness",))
MAIN_T, SCREEN_T = 1.4, 2.0
LABELS = [label.value for label in ALL_LABELS]


def _each(value: float) -> dict[str, float]:
    return dict.fromkeys(LABELS, value)


def _spec(arch: str = "mobilenet_v3_small", screen: ScreenSpec | None = None) -> ModelSpec:
    return ModelSpec(arch=arch, labels=tuple(ALL_LABELS), preprocess=PRE, temperature=MAIN_T, screen=screen)


def _cascade(threshold: float) -> tuple[CascadeNet, ModelSpec]:
    spec = _spec("efficientnet_lite0", ScreenSpec("mobilenet_v3_small", SCREEN_T, _each(threshold)))
    torch.manual_seed(0)
    network = build_network(spec).eval()
    assert isinstance(network, CascadeNet)
    pick_by_feature(network.screen.head, 12.0)
    return network, spec


def pick_by_feature(head: torch.nn.Linear, sharpness: float) -> None:
    """An untrained network answers alike whatever it sees: let the last scalar feature f pick
    label ~ 7 f instead, ``sharpness`` saying how sure it is."""
    with torch.no_grad():
        k = torch.arange(len(LABELS), dtype=torch.float32)
        head.weight.zero_()
        head.weight[:, -1] = sharpness * k
        head.bias.copy_(-sharpness * k**2 / (2 * (len(LABELS) - 1)))


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
    probs = torch.softmax(torch.from_numpy(fast) / SCREEN_T, dim=1).numpy()
    confidence, label = probs.max(axis=1), probs.argmax(axis=1)
    # One threshold splits the batch; the most frequent predicted label gets 1 (always the main network).
    thresholds = np.full(len(LABELS), _between(confidence))
    common = np.bincount(label, minlength=len(LABELS)).argmax()
    thresholds[common] = 1.0
    unsure = confidence < thresholds[label]
    assert 0 < unsure.sum() < len(unsure) and (label != common).any()
    assert unsure[label == common].all() and not unsure[label != common].all()
    network.thresholds = torch.tensor(thresholds, dtype=torch.float32)
    with torch.no_grad():
        out = network(images, features).numpy()
    np.testing.assert_allclose(out[unsure], slow[unsure], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[~unsure], fast[~unsure] * MAIN_T / SCREEN_T, rtol=1e-5, atol=1e-5)
    # train/cascade.py applies the same rule to the two networks' out-of-fold logits.
    rule, sent = cascade_logits(slow, fast, MAIN_T, SCREEN_T, thresholds)
    assert (sent == unsure).all()
    np.testing.assert_allclose(rule, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["between", "none", "all"])
def test_the_exported_graph_routes_frames_as_torch_does(where):
    network, spec = _cascade(0.5)
    images, features = _batch()
    fast, _ = _parts(network, images, features)
    confidence = torch.softmax(torch.from_numpy(fast) / SCREEN_T, dim=1).amax(dim=1).numpy()
    threshold = {"between": _between(confidence), "none": 0.0, "all": 1.0}[where]
    spec = replace(spec, screen=replace(spec.screen, thresholds=_each(threshold)))
    rebuilt = build_network(spec).eval()
    rebuilt.load_state_dict(network.state_dict())
    with torch.no_grad():
        expected = rebuilt(images, features).numpy()
    got = OnnxRunner(export_onnx(rebuilt, spec), threads=1)(images.numpy(), features.numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_single_network_spec_reads_and_writes_as_before_and_a_screen_round_trips():
    plain = _spec().to_dict()
    assert "screen" not in plain and ModelSpec.from_dict(plain).screen is None
    screened = _spec("efficientnet_lite0", ScreenSpec("mobilenet_v3_small", 1.7, _each(0.9)))
    assert ModelSpec.from_dict(screened.to_dict()) == screened
    assert screened.network_name == "efficientnet_lite0 (mobilenet_v3_small screen)"
    assert _spec().network_name == "mobilenet_v3_small"
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        ScreenSpec("mobilenet_v3_small", 1.0, _each(1.5))
    with pytest.raises(ValueError, match="one threshold per label"):
        _spec("efficientnet_lite0", ScreenSpec("mobilenet_v3_small", 1.0, {"CT": 0.5}))


def _artefact(path: Path, spec: ModelSpec, seed: int) -> Path:
    torch.manual_seed(seed)
    save_artefact(build_network(spec).eval(), spec, path)
    return path


def test_assemble_joins_two_artefacts_into_one_cascade_and_refuses_other_inputs(tmp_path):
    main = _artefact(tmp_path / "main.pt", _spec("efficientnet_lite0"), 0)
    screen = _artefact(tmp_path / "screen.pt", _spec(), 1)
    assemble(main, screen, _each(0.8), (MAIN_T, SCREEN_T), tmp_path / "cascade.pt")
    loaded = load_artefact(tmp_path / "cascade.pt")
    assert isinstance(loaded.network, CascadeNet)
    assert loaded.spec.screen == ScreenSpec("mobilenet_v3_small", SCREEN_T, _each(0.8))
    assert loaded.spec.temperature == MAIN_T and loaded.network.rescale == pytest.approx(MAIN_T / SCREEN_T)
    images, features = _batch(6)
    with torch.no_grad():
        alone = load_artefact(screen).network(images, features)
        joined = loaded.network.screen(images, features)
    torch.testing.assert_close(joined, alone)
    other = _artefact(tmp_path / "other.pt", replace(_spec(), preprocess=replace(PRE, input_size=96)), 2)
    with pytest.raises(ValueError, match="different inputs"):
        assemble(main, other, _each(0.8), (MAIN_T, SCREEN_T), tmp_path / "no.pt")
    with pytest.raises(ValueError, match="already has a screen"):
        assemble(tmp_path / "cascade.pt", screen, _each(0.8), (MAIN_T, SCREEN_T), tmp_path / "no.pt")


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


def test_a_label_keeps_the_screen_down_to_where_it_stops_being_as_right_as_the_main_network():
    """Label 0: the screen is right on its three most confident frames, then wrong where the main
    network is right. Label 1: the screen is confidently wrong where the main network is right."""

    def logits(rows: list[tuple[int, float]]) -> np.ndarray:
        out = np.full((len(rows), 2), 0.0, np.float32)
        for i, (label, p) in enumerate(rows):
            out[i, label] = np.log(p / (1 - p))  # softmax at T=1 gives p to label
        return out

    screen = logits([(0, 0.95), (0, 0.9), (0, 0.85), (0, 0.8), (0, 0.7), (1, 0.99), (1, 0.6)])
    y = np.array([0, 0, 0, 1, 0, 0, 1])
    main = logits([(0, 0.9), (0, 0.9), (0, 0.9), (1, 0.9), (1, 0.9), (0, 0.9), (1, 0.9)])
    thresholds = choose_thresholds(main, screen, y, 1.0)
    np.testing.assert_allclose(thresholds, [0.85, 1.0], rtol=1e-5)
    # Tolerating half a frame per frame kept lets label 0 keep all five; label 1 still fails at once.
    np.testing.assert_allclose(choose_thresholds(main, screen, y, 1.0, tolerance=0.5), [0.7, 1.0], rtol=1e-5)
    _, unsure = cascade_logits(main, screen, 1.0, 1.0, thresholds)
    assert unsure.tolist() == [False, False, False, True, True, True, True]


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


def test_a_screen_that_only_confirms_headers_never_refutes_and_never_hides_a_refutation(tmp_path):
    """The main network's verdicts stand unless the screen confirms: right headers refuted can only
    fall, relabelled copies confirmed can only rise, and with no confirmation it is the main network."""
    from train.cascade import confirming_screen

    rng = np.random.default_rng(0)
    n, labels = 200, ["CT", "MR", "PT"]
    y = rng.integers(0, 3, n)
    config = {"manifest": "m.csv", "folds": 5, "seed": 0, "labels": labels}

    def run(sharp: float) -> LosoRun:
        logits = rng.normal(0, 1, (n, 3)).astype(np.float32)
        logits[np.arange(n), y] += sharp
        names = np.array([labels[i] for i in y])
        return LosoRun(
            tmp_path, logits, names, np.array([f"s{i % 7}" for i in range(n)]), np.zeros(n, int), 1.0, config
        )

    main, screen = run(2.0), run(1.0)
    rows = confirming_screen(main, screen, (0.0, 0.6, 0.999))
    alone, everything, some, none = rows
    assert alone["fast"] == 0.0 and none == {**alone, "confirm_at": 0.999, "fast": none["fast"]}
    assert everything["fast"] == 1.0 and everything["agree"] == 1.0 and everything["false_disagree"] == 0.0
    assert 0.0 < some["fast"] < 1.0
    assert some["false_disagree"] <= alone["false_disagree"] and some["agree"] >= alone["agree"]
    assert some["caught"] <= alone["caught"] and some["false_agree"] >= alone["false_agree"]


def test_an_ensemble_averages_both_networks_in_torch_and_in_the_exported_graph(tmp_path):
    from sorter.model.network import EnsembleNet
    from sorter.model.spec import PartnerSpec
    from train.cascade import assemble_ensemble, average_logits

    main = _artefact(tmp_path / "main.pt", _spec("efficientnet_lite0"), 0)
    partner = _artefact(tmp_path / "partner.pt", _spec(), 1)
    digest = assemble_ensemble(main, partner, (MAIN_T, SCREEN_T), 0.4, tmp_path / "ensemble.pt")
    loaded = load_artefact(tmp_path / "ensemble.pt")
    assert loaded.sha256 == digest and isinstance(loaded.network, EnsembleNet)
    assert loaded.spec.partner == PartnerSpec("mobilenet_v3_small", SCREEN_T, MAIN_T, 0.4)
    assert loaded.spec.network_name == "efficientnet_lite0 + mobilenet_v3_small"
    assert ModelSpec.from_dict(loaded.spec.to_dict()) == loaded.spec
    images, features = _batch(8)
    with torch.no_grad():
        alone = [load_artefact(p).network(images, features).numpy() for p in (main, partner)]
        out = loaded.network(images, features).numpy()
    np.testing.assert_allclose(out, average_logits(*alone, (MAIN_T, SCREEN_T), 0.4), rtol=1e-5, atol=1e-5)
    graph = OnnxRunner(export_onnx(loaded.network, loaded.spec), threads=1)
    np.testing.assert_allclose(graph(images.numpy(), features.numpy()), out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already has a screen or partner"):
        assemble_ensemble(tmp_path / "ensemble.pt", partner, (MAIN_T, SCREEN_T), 0.5, tmp_path / "no.pt")
    with pytest.raises(ValueError, match="a screen or a partner, not both"):
        replace(loaded.spec, screen=ScreenSpec("mobilenet_v3_small", 1.0, _each(0.5)))
    # Adaptation keeps the main network alone.
    from sorter.adaptation.core import adapted_network, adapted_spec
    from sorter.domain import Thresholds

    class Result:
        weight = loaded.network.head.weight.detach().numpy()
        bias = loaded.network.head.bias.detach().numpy()

        temperature = 1.0
        thresholds = Thresholds()

    assert type(adapted_network(loaded.network, Result())) is SorterNet  # type: ignore[arg-type]
    spec = adapted_spec(loaded.spec, Result(), {}, {})  # type: ignore[arg-type]
    assert spec.partner is None and spec.screen is None


def test_the_ensemble_weight_is_chosen_on_the_other_folds_and_written_as_a_loso_run(tmp_path):
    """Two networks that each miss a different label: the average beats both, every fold's weight is
    chosen without its own images, and the run reads back like any loso run."""
    import json

    from train.cascade import write_ensemble_run

    rng = np.random.default_rng(1)
    n, labels = 300, ["CT", "MR", "PT"]
    y = rng.integers(0, 3, n)
    config = {"manifest": "m.csv", "folds": 3, "seed": 0, "labels": labels}
    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "metrics.json").write_text(json.dumps({"folds": 3, "protocol": "leave-sources-out"}))
    (tmp_path / "main" / "folds.json").write_text("{}")

    def run(blind: int) -> LosoRun:  # right, confidently, except on label ``blind``
        logits = rng.normal(0, 0.5, (n, 3)).astype(np.float32)
        logits[np.arange(n), y] += np.where(y == blind, 0.0, 3.0)
        names = np.array([labels[i] for i in y])
        sources = np.array([f"s{i % 9}" for i in range(n)])
        return LosoRun(tmp_path / "main", logits, names, sources, np.arange(n) % 3, 1.0, config)

    main, partner = run(blind=1), run(blind=2)
    metrics = write_ensemble_run(main, partner, None, tmp_path / "ens")
    found = metrics["ensemble"]
    assert set(found["weights_per_fold"]) == {0, 1, 2} and 0.0 < found["weight"] < 1.0
    assert found["ensemble"]["balanced_accuracy"] > max(
        found["main_alone"]["balanced_accuracy"], found["partner_alone"]["balanced_accuracy"]
    )
    again = LosoRun.read(tmp_path / "ens")
    assert again.logits.shape == (n, 3) and "cross-fitted" in metrics["protocol"]
