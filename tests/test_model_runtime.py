"""The inference runtimes agree: ONNX Runtime (the CPU default) and eager torch give the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import data_file

from sorter.dicom.pixels import load_image
from sorter.domain import ALL_LABELS
from sorter.model.artefact import DEFAULT_MODEL_PATH
from sorter.model.classifier import Classifier
from sorter.model.network import build_network
from sorter.model.runtime import make_runner
from sorter.model.spec import ModelSpec, PreprocessParams

FILES = ["CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm", "SC_rgb.dcm", "JPEG2000.dcm", "RG1_J2KR.dcm"]


def test_bundled_model_gives_the_same_predictions_on_onnxruntime_and_torch():
    onnx = Classifier.load(DEFAULT_MODEL_PATH, device="cpu", runtime="onnx")
    eager = Classifier.load(DEFAULT_MODEL_PATH, device="cpu", runtime="torch")
    assert onnx.runner.name == "onnxruntime" and eager.runner.name == "torch"
    images = [load_image(data_file(name)) for name in FILES]
    a, b = onnx.predict_images(images), eager.predict_images(images)
    assert [p.label for p in a] == [p.label for p in b]
    for p, q in zip(a, b, strict=True):
        assert p.confidence == pytest.approx(q.confidence, abs=1e-4)
        assert p.second_label == q.second_label


def test_auto_picks_onnxruntime_on_the_cpu_and_the_graph_takes_any_batch_size():
    classifier = Classifier.load(DEFAULT_MODEL_PATH, device="cpu")
    assert classifier.runner.name == "onnxruntime"
    size = classifier.spec.preprocess.input_size
    for n in (1, 7, 64):
        x = np.random.default_rng(n).random((n, 2, size, size), dtype=np.float32)
        probs = classifier.predict_arrays(x, np.zeros((n, 1), dtype=np.float32))
        assert probs.shape == (n, len(classifier.labels))
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_model_without_scalar_features_exports_too():
    spec = ModelSpec(
        arch="mobilenet_v3_small", labels=ALL_LABELS, preprocess=PreprocessParams(input_size=32, features=())
    )
    network = build_network(spec).eval()
    runner = make_runner(network, spec, torch.device("cpu"), "onnx")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    empty = np.zeros((3, 0), dtype=np.float32)
    with torch.inference_mode():
        expected = network(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner(x, empty), expected, atol=1e-4)


def test_unknown_runtime_and_onnx_off_the_cpu_are_refused_with_a_reason():
    spec = ModelSpec(arch="mobilenet_v3_small", labels=ALL_LABELS, preprocess=PreprocessParams(input_size=32))
    network = build_network(spec)
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'"):
        make_runner(network, spec, torch.device("cpu"), "tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        make_runner(network, spec, torch.device("cuda"), "onnx")


def test_auto_falls_back_to_torch_with_a_warning_when_onnxruntime_cannot_be_used(monkeypatch, caplog):
    import sorter.model.runtime as runtime

    def broken(*_args, **_kwargs):
        raise ImportError("No module named 'onnxruntime'")

    monkeypatch.setattr(runtime, "OnnxRunner", broken)
    spec = ModelSpec(arch="mobilenet_v3_small", labels=ALL_LABELS, preprocess=PreprocessParams(input_size=32))
    runner = make_runner(build_network(spec), spec, torch.device("cpu"), "auto")
    assert runner.name == "torch"
    assert "ONNX Runtime unavailable (ImportError" in caplog.text
    with pytest.raises(ImportError):  # asked for by name, it is an error
        make_runner(build_network(spec), spec, torch.device("cpu"), "onnx")
