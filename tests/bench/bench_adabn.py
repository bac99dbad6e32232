"""BatchNorm statistics from the archive itself (AdaBN): does re-estimating a fold network's
normalisation on the sources it never saw help it judge them?

Run: .venv/bin/python tests/bench/bench_adabn.py --main runs/eff0 --partner runs/screen0 --weight 0.4
         [--modes archive,unlabelled,half] [--out tests/bench/results-adabn-2core.json]
     where ``--main`` is a finished ``sorter-train loso`` of ``train/recipes/pretrained.yaml`` and
     ``--partner`` one of ``train/recipes/screen-loso.yaml`` on the same folds (README, The default
     model: Reproduce).

Every fold network's BatchNorm running statistics were estimated at the end of training on
un-augmented training images (``train.fit.recalibrate_batchnorm``). Here each held-out fold
(about a fifth of the corpus's sources, every label: an "archive") is the estimation set instead
(Li et al., "Revisiting batch normalization for practical domain adaptation", 2016), with no
weight trained:

- ``archive``: drawn as training draws, every header label equally likely and within a label
  every source (headers are known for an archive, and right most of the time);
- ``unlabelled``: every image equally likely (no header used);
- ``half``: the mean of ``archive``'s statistics and training's.

The same images are then predicted, and each variant is scored as ``bench_tta.py`` scores its
views: balanced, source-averaged and plain accuracy, and the header test at export's operating
point, cross-fitted over the folds, with the temperature refitted on the variant's own logits.
The statistics are estimated on the very images then judged (transductive), as an archive's
adaptation would estimate them on the archive it then scans.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tta import _scored, held_out, label_indices_of, names_in, write_results  # noqa: E402

from train.calibrate import fit_temperature  # noqa: E402
from train.cascade import LosoRun, average_logits  # noqa: E402
from train.config import FitConfig  # noqa: E402
from train.data import ImageSet  # noqa: E402
from train.fit import predict_logits, recalibrate_batchnorm  # noqa: E402
from train.runs import loso_run_argument  # noqa: E402

MODES = ("archive", "unlabelled", "half")


def _norms(network: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def adapt(
    network: torch.nn.Module, images: ImageSet, config: FitConfig, mode: str, seed: int, batches: int
) -> None:
    """Re-estimate ``network``'s BatchNorm statistics on ``batches`` batches of ``images`` drawn
    as ``mode`` says."""
    gen = torch.Generator().manual_seed(seed)
    if mode == "unlabelled":
        same = np.full(len(images), images.labels[0], dtype=images.labels.dtype)
        recalibrate_batchnorm(
            network,
            replace(images, labels=same),
            replace(config, group_balance=0.0, source_balance=0.0),
            gen,
            batches,
        )
        return
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in _norms(network)]
    recalibrate_batchnorm(network, images, config, gen, batches)
    if mode == "half":
        with torch.no_grad():
            for m, (mean, var) in zip(_norms(network), before, strict=True):
                m.running_mean.mul_(0.5).add_(0.5 * mean)
                m.running_var.mul_(0.5).add_(0.5 * var)


def adapted_logits(run: Path, modes: list[str], seed: int, batches: int) -> dict[str, np.ndarray]:
    """Out-of-fold logits as stored (``none``) and after each mode's re-estimation."""
    found = held_out(run)
    n_labels = len(found.config.labels)
    out = {name: np.zeros((len(found.images), n_labels), np.float32) for name in ["none", *modes]}
    for held, network in found.networks(run):
        target = found.images.subset(np.isin(np.arange(len(found.images)), held))
        base = copy.deepcopy(network.state_dict())
        out["none"][held] = predict_logits(network, target)
        for mode in modes:
            network.load_state_dict(base)
            adapt(network, target, found.config, mode, seed, batches)
            out[mode][held] = predict_logits(network, target)
            print(f"{run}: fold of {len(held)} images, {mode} done", file=sys.stderr, flush=True)
    if not np.allclose(out["none"], found.stored.logits, atol=1e-3):
        raise SystemExit(f"{run}: its fold networks no longer give its stored logits")
    return out


def _scored_by_label(run: LosoRun, logits: np.ndarray) -> dict[str, Any]:
    """:func:`bench_tta._scored` and each label's recall."""
    labels = [str(v) for v in run.config["labels"]]
    y = label_indices_of(run)
    predicted = logits.argmax(axis=1)
    recall = {
        label: round(float(np.mean(predicted[y == i] == i)), 3)
        for i, label in enumerate(labels)
        if np.any(y == i)
    }
    return {**_scored(run, logits), "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", type=loso_run_argument, required=True)
    parser.add_argument("--partner", type=loso_run_argument)
    parser.add_argument("--weight", type=float, default=0.4)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batches", type=int, default=10, help="batches (of the run's batch size) drawn to estimate"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    modes = names_in(args.modes, MODES, "--modes")
    main_run = LosoRun.read(args.main)
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "main_run": str(args.main),
        "partner_run": str(args.partner),
        "weight": args.weight,
    }
    main_logits = adapted_logits(args.main, modes, args.seed, args.batches)
    results["main"] = {name: _scored_by_label(main_run, logits) for name, logits in main_logits.items()}
    if args.partner:
        partner_run = LosoRun.read(args.partner)
        partner_logits = adapted_logits(args.partner, modes, args.seed, args.batches)
        ensemble = {}
        for name in main_logits:  # both networks adapted alike
            temps = (
                float(fit_temperature(main_logits[name], label_indices_of(main_run))),
                float(fit_temperature(partner_logits[name], label_indices_of(partner_run))),
            )
            ensemble[name] = average_logits(main_logits[name], partner_logits[name], temps, args.weight)
        results["ensemble"] = {name: _scored_by_label(main_run, logits) for name, logits in ensemble.items()}
    write_results(results, args.out)


if __name__ == "__main__":
    main()
