"""Inference-time variants, paired, on a leave-sources-out run's own fold networks.

Every held-out image of RUN is predicted by the fold network that never saw its source, as the
run did (``base``), and by the same network changed only at inference:

* ``hflip``: the mean of the logits of the image and of its mirror image (test-time augmentation;
  twice the network's cost);
* ``adabn_fold``: BatchNorm statistics re-estimated on the held-out fold's own images, without
  their labels (AdaBN, Li et al. 2016: a fold of sources standing in for an archive the model is
  pointed at); ``adabn_fold_half`` averages them with the training statistics;
* ``adabn_source``: the same, one held-out source at a time.

The file also says, for each held-out source, what the run's own networks called its images.

Each variant gets its own temperature and is scored as a loso report scores it
(:func:`train.compare.score`, with the header test's operating point chosen on it), so the
difference is the variant alone, not training's run-to-run spread (about 0.03 balanced accuracy
on this corpus).

Run: .venv/bin/python tests/bench/bench_inference_variants.py --run runs/loso5-eff \\
         [--out tests/bench/results-inference-variants-2core.json]
     where RUN is a finished ``sorter-train loso`` run that kept its fold networks.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sorter.model.artefact import load_artefact  # noqa: E402
from sorter.model.network import SorterNet  # noqa: E402
from train.calibrate import fit_temperature, softmax_np  # noqa: E402
from train.compare import score  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.data import ImageSet  # noqa: E402
from train.fit import predict_logits  # noqa: E402
from train.runs import images_for, label_indices, select_rows  # noqa: E402

VARIANTS = ("base", "hflip", "adabn_fold", "adabn_fold_half", "adabn_source")


def adabn(network: SorterNet, images: ImageSet, per_batch: int | None = 64, keep: float = 0.0) -> SorterNet:
    """A copy of ``network`` whose BatchNorm statistics are the mean over batches of ``per_batch``
    of ``images``' serving inputs in random order (``None``: one batch of all), blended with
    ``keep`` of its own."""
    network = copy.deepcopy(network)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    own = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches
    order = np.random.default_rng(0).permutation(len(images))
    size = per_batch or len(images)
    network.train()
    with torch.no_grad():
        for s in range(0, len(images), size):
            pick = order[s : s + size]
            network(torch.from_numpy(images.eval[pick]), torch.from_numpy(images.features[pick]))
    for m, (mean, var) in zip(norms, own, strict=True):
        assert m.running_mean is not None and m.running_var is not None
        m.running_mean.mul_(1 - keep).add_(keep * mean)
        m.running_var.mul_(1 - keep).add_(keep * var)
    return network.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished loso run with fold networks")
    default = ROOT / "tests/bench/results-inference-variants-2core.json"
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    config, manifest = load_run_config(args.run)
    images = images_for(select_rows(manifest, config), config, progress=False)
    fold_of = json.loads((args.run / "folds.json").read_text())
    image_fold = np.asarray([fold_of[str(s)] for s in images.sources])
    labels = [str(v) for v in config.labels]
    logits = {name: np.zeros((len(images), len(labels)), np.float32) for name in VARIANTS}
    for fold in sorted(set(image_fold.tolist())):
        held = np.flatnonzero(image_fold == fold)
        network = load_artefact(args.run / f"fold-{fold}" / "model.pt").network.eval()
        fold_images = images.subset(held)
        logits["base"][held] = predict_logits(network, fold_images)
        mirrored = replace(fold_images, eval=np.ascontiguousarray(fold_images.eval[..., ::-1]))
        logits["hflip"][held] = (logits["base"][held] + predict_logits(network, mirrored)) / 2
        logits["adabn_fold"][held] = predict_logits(adabn(network, fold_images), fold_images)
        logits["adabn_fold_half"][held] = predict_logits(adabn(network, fold_images, keep=0.5), fold_images)
        sources = np.asarray([str(s) for s in fold_images.sources])
        for source in sorted(set(sources.tolist())):
            one = fold_images.subset(sources == source)
            logits["adabn_source"][held[sources == source]] = predict_logits(adabn(network, one, None), one)
    with np.load(args.run / "oof.npz") as oof:  # zero when the images are cached as the run had them
        drift = float(np.abs(oof["logits"] - logits["base"]).max())
    y = [str(v) for v in images.labels]
    sources_all = [str(s) for s in images.sources]
    targets = label_indices(images, config.spec())
    result: dict[str, Any] = {"run": str(args.run), "images": len(images), "base_logit_drift": drift}
    for name, z in logits.items():
        temperature = fit_temperature(z, targets)
        metrics, macro, point = score(y, softmax_np(z, temperature), labels, sources_all, temperature)
        assert point is not None
        result[name] = {
            "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
            "source_macro": round(macro["balanced_accuracy"], 4),
            "accuracy": round(metrics["accuracy"], 4),
            "ece": round(metrics["ece"], 4),
            "temperature": round(temperature, 3),
            "recall": {label: round(metrics["per_class"][label]["recall"], 3) for label in labels},
            "header_test": {k: round(v, 3) for k, v in point["images"].items()},
        }
        print(f"{name:>16}: {json.dumps(result[name])}", flush=True)
    # Where the errors are: for each held-out source and label, what the run's networks called it.
    called = np.asarray(labels)[logits["base"].argmax(axis=1)]
    truth, origin = np.asarray(y), np.asarray(sources_all)
    result["base_called_by_source"] = {
        f"{label}/{source}": dict(Counter(called[(truth == label) & (origin == source)].tolist()))
        for label, source in sorted(set(zip(y, sources_all, strict=True)))
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
