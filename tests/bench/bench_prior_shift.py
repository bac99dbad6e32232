"""A per-label bias on the logits, chosen on other folds: does it lift the labels the network
misses on unseen sources (NM, PT) without costing the others?

Run: .venv/bin/python tests/bench/bench_prior_shift.py runs/eff0 [runs/eff1 ...]
         [--reg 0,0.01,0.1] [--out tests/bench/results-prior-shift-2core.json]
     where each run is a finished ``sorter-train loso`` run (its ``oof.npz``).

For each fold of a run, a bias vector b (one value per label) is fitted on the other folds'
out-of-fold logits (over the run's temperature) by minimising the cross-entropy with every label
weighted equally, plus ``reg * |b|^2``; the held-out fold is then predicted by argmax(logits / T +
b). This is logit adjustment (a prior shift) chosen on sources the fold never saw, as a bias
shipped in a model would be. Reported: balanced accuracy, source-averaged recall, accuracy and
each label's recall, before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from bench_station import floats  # noqa: E402

from train.config import load_run_config  # noqa: E402


def fit_bias(logits: np.ndarray, y: np.ndarray, n_labels: int, reg: float) -> np.ndarray:
    """The bias (L,) minimising the label-balanced cross-entropy of ``logits + b`` (L-BFGS)."""
    import torch

    x = torch.tensor(logits, dtype=torch.float64)
    target = torch.tensor(y)
    weight = 1.0 / np.bincount(y, minlength=n_labels)[y]  # every label present weighs the same
    w = torch.tensor(weight / weight.sum())
    b = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x + b, target, reduction="none") * w).sum()
        loss = loss + reg * (b**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return b.detach().numpy()


def scores(pred: np.ndarray, y: np.ndarray, sources: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Balanced accuracy, source-averaged recall (per label, the mean over its sources), accuracy
    and per-label recall."""
    recall, by_source = {}, {}
    for i, label in enumerate(labels):
        mask = y == i
        if mask.any():
            recall[label] = float(np.mean(pred[mask] == i))
            by_source[label] = float(
                np.mean([np.mean(pred[mask & (sources == s)] == i) for s in sorted(set(sources[mask]))])
            )
    return {
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "source_averaged": float(np.mean(list(by_source.values()))),
        "accuracy": float(np.mean(pred == y)),
        "recall": recall,
    }


def run_result(run: Path, regs: list[float]) -> dict[str, Any]:
    """Before and after, for every ``reg``, on one loso run."""
    oof = np.load(run / "oof.npz")
    labels = [str(v) for v in load_run_config(run)[0].labels]  # the logits' order
    logits = oof["logits"] / float(oof["temperature"])
    y = np.asarray([labels.index(str(v)) for v in oof["labels"]])
    folds, sources = oof["folds"], np.asarray([str(s) for s in oof["sources"]])
    out: dict[str, Any] = {"run": str(run), "as_trained": scores(logits.argmax(1), y, sources, labels)}
    for reg in regs:
        pred = np.zeros(len(y), dtype=int)
        biases = {}
        for fold in np.unique(folds):
            held = folds == fold
            b = fit_bias(logits[~held], y[~held], len(labels), reg)
            biases[int(fold)] = [round(float(v), 3) for v in b]
            pred[held] = (logits[held] + b).argmax(1)
        out[f"bias, reg {reg}"] = {**scores(pred, y, sources, labels), "bias_per_fold": biases}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--reg", type=floats, default=[0.0, 0.01, 0.1], metavar="R[,R...]")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/bench/results-prior-shift-2core.json")
    args = parser.parse_args()
    for run in args.runs:
        if not (run / "oof.npz").is_file():
            parser.error(f"{run} holds no oof.npz: give a finished sorter-train loso run")
    results = [run_result(run, args.reg) for run in args.runs]
    args.out.write_text(json.dumps(results, indent=1))
    for r in results:
        for name, s in r.items():
            if isinstance(s, dict):
                recall = " ".join(f"{k} {v:.2f}" for k, v in s["recall"].items())
                print(
                    f"{r['run']} {name}: balanced {s['balanced_accuracy']:.3f} source-averaged "
                    f"{s['source_averaged']:.3f} accuracy {s['accuracy']:.3f} | {recall}"
                )


if __name__ == "__main__":
    main()
