"""The graph cache: a CPU run on a known artefact loads its exported graph, not torch; same predictions."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import data_file

from sorter.dicom.pixels import load_image
from sorter.model.artefact import DEFAULT_MODEL_PATH, file_sha256
from sorter.model.classifier import GPU_DEVICE_NODES, Classifier
from sorter.model.graph_cache import GraphCache

FILES = ["CT_small.dcm", "MR_small.dcm", "US1_J2KR.dcm", "SC_rgb.dcm"]

# Loads the bundled model through a cache in a fresh interpreter, and says
# which runtime it got and whether torch was imported on the way.
PROBE = """
import json, sys
from pathlib import Path
from sorter.model.classifier import Classifier
from sorter.model.graph_cache import GraphCache
classifier = Classifier.load(sys.argv[2], device="cpu", cache=GraphCache(Path(sys.argv[1])))
print(json.dumps({"runtime": classifier.runner.name, "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def lone_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled artefact alone in a folder: no graph beside it, so a CPU load exports one."""
    import shutil

    path = tmp_path_factory.mktemp("lone") / "model.pt"
    shutil.copy(DEFAULT_MODEL_PATH, path)
    return path


def _probe(cache: Path, model: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(cache), str(model)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_second_cpu_load_of_an_artefact_takes_its_graph_from_the_cache_without_torch(
    tmp_path, lone_model
):
    first = _probe(tmp_path, lone_model)
    assert first == {"runtime": "onnxruntime", "torch": True}  # exported, and stored
    sha256 = file_sha256(DEFAULT_MODEL_PATH)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{sha256}.json", f"{sha256}.onnx"]
    assert _probe(tmp_path, lone_model) == {"runtime": "onnxruntime", "torch": False}


def test_a_cached_classifier_predicts_exactly_what_the_exporting_one_does(lone_model, tmp_path):
    cache = GraphCache(tmp_path)
    exported = Classifier.load(lone_model, device="cpu", cache=cache)
    cached = Classifier.load(lone_model, device="cpu", cache=cache)
    assert cache.get(cached.sha256) is not None
    assert (cached.spec, cached.sha256, cached.path) == (exported.spec, exported.sha256, exported.path)
    assert cached.runner.graph == exported.runner.graph  # type: ignore[attr-defined]
    images = [load_image(data_file(name)) for name in FILES]
    for a, b in zip(exported.predict_images(images), cached.predict_images(images), strict=True):
        assert a == b


def test_a_corrupt_or_foreign_entry_is_a_miss_and_the_next_load_rewrites_it(lone_model, tmp_path, caplog):
    cache = GraphCache(tmp_path)
    classifier = Classifier.load(lone_model, device="cpu", cache=cache)
    graph_path = tmp_path / f"{classifier.sha256}.onnx"
    good = graph_path.read_bytes()
    graph_path.write_bytes(good[: len(good) // 2])  # a torn copy, a full disk
    with caplog.at_level(logging.WARNING):
        assert cache.get(classifier.sha256) is None
    assert "stale or corrupt" in caplog.text
    Classifier.load(lone_model, device="cpu", cache=cache)
    assert graph_path.read_bytes() == good
    assert cache.get("0" * 64) is None  # another artefact's key
    meta_path = tmp_path / f"{classifier.sha256}.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": 99}))
    assert cache.get(classifier.sha256) is None
    meta_path.write_text("{not json")
    assert cache.get(classifier.sha256) is None


def test_a_cache_that_cannot_be_written_costs_nothing_but_the_export(lone_model, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    classifier = Classifier.load(lone_model, device="cpu", cache=GraphCache(blocked / "onnx"))
    assert classifier.runner.name == "onnxruntime"


def test_torch_and_cuda_runs_do_not_use_the_cache(lone_model, tmp_path):
    cache = GraphCache(tmp_path)
    classifier = Classifier.load(lone_model, device="cpu", runtime="torch", cache=cache)
    assert classifier.runner.name == "torch"
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(
    any(map(os.path.exists, GPU_DEVICE_NODES)), reason="a GPU driver is present: torch must be asked"
)
def test_without_a_gpu_driver_the_device_is_the_cpu_without_importing_torch():
    probe = (
        "import sys; from sorter.model.classifier import pick_device; "
        "print(pick_device(), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["cpu", "False"]


def test_sorter_classify_gives_the_same_json_from_the_cache_as_from_the_export(tmp_path, lone_model):
    env = {**os.environ, "SORTER_CACHE_DIR": str(tmp_path / "cache"), "SORTER_DEVICE": "cpu"}
    env["SORTER_MODEL"] = str(lone_model)
    command = [sys.executable, "-m", "sorter", "classify", "--json", *(str(data_file(n)) for n in FILES)]
    runs = [subprocess.run(command, capture_output=True, text=True, check=True, env=env) for _ in range(2)]
    assert len(list(Path(tmp_path / "cache").glob("*.onnx"))) == 1
    records = [[json.loads(line) for line in run.stdout.splitlines()] for run in runs]
    assert len(records[0]) == len(FILES)
    assert records[0] == records[1]
    assert np.isfinite([r["confidence"] for r in records[0]]).all()


def test_the_bundled_model_ships_its_graph_and_serves_without_torch():
    """A CPU node installs without torch (issue 13, lean install): the package holds the bundled
    model's ONNX graph, and classifying on the CPU must never import torch."""
    import subprocess
    import sys

    from sorter.model.artefact import DEFAULT_MODEL_PATH, file_sha256
    from sorter.model.graph_cache import GraphCache

    shipped = GraphCache(DEFAULT_MODEL_PATH.parent, read_only=True).get(file_sha256(DEFAULT_MODEL_PATH))
    assert shipped is not None, "regenerate it: sorter-train graph sorter/model/default/model.pt"
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        "from pydicom.data import get_testdata_file\n"
        "from sorter import Classifier, classify_paths\n"
        "record, = classify_paths([get_testdata_file('CT_small.dcm')], Classifier.load(device='cpu'))\n"
        "print(record['label'], record['verdict'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CT", "agree"]


def test_an_artefact_without_a_graph_and_without_torch_says_what_to_do(tmp_path):
    import shutil
    import subprocess
    import sys

    from sorter.model.artefact import DEFAULT_MODEL_PATH

    lone = tmp_path / "lone.pt"
    shutil.copy(DEFAULT_MODEL_PATH, lone)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from sorter import Classifier\n"
        "from sorter.errors import ModelError\n"
        "try:\n"
        f"    Classifier.load({str(lone)!r}, device='cpu')\n"
        "except ModelError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "no ONNX graph beside it and PyTorch is not installed" in done.stdout, done.stdout + done.stderr
    assert "sorter-train export" in done.stdout
