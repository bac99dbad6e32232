"""The header test's budgets, in-sample and cross-fitted, on leave-sources-out runs.

``sorter-train export`` chooses ``agree_at`` and ``disagree_at`` (:func:`train.operating_point.choose`)
on a run's out-of-fold predictions so that at most 1 % of right headers are refuted and at most 5 %
of the copies relabelled to any label are confirmed, and the model card reports the shares on those
same predictions: in-sample, so the 1 % holds by construction. Here each budget pair is also
scored cross-fitted (:func:`train.operating_point.cross_fitted`: each fold's images judged by
thresholds chosen on the other folds alone), which is what an archive of sources the thresholds
never saw meets.

Run: .venv/bin/python tests/bench/bench_operating_point.py runs/ens0 [runs/ens1 ...] \\
         [--out tests/bench/results-operating-point-2core.json]
     where each run is a finished ``sorter-train loso`` or ``ensemble --out-run`` (README, The
     default model: Reproduce). Pixels alone: no SOP class, nuclide or confirming partner.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from train.calibrate import softmax_np  # noqa: E402
from train.operating_point import (  # noqa: E402
    choose_held_out,
    cross_fitted,
    header_shares,
    read_out_of_fold,
)
from train.runs import loso_run_argument  # noqa: E402

#: Fixed factors on every ``disagree_at`` (1: the rule before 2026-12-06's second change).
FIXED = (1.0, 0.6, 0.4, 0.3, 0.25, 0.2, 0.1)


def _row(probs: np.ndarray, oof: Any, folds: np.ndarray, shrink: float | None) -> dict[str, Any]:
    """One rule's shares: in-sample (chosen and scored on every image) and cross-fitted."""
    agree_at, disagree_at, chosen = choose_held_out(probs, oof.y, folds, shrink)
    cross = cross_fitted(probs, oof.y, oof.labels, oof.groups, folds, shrink=shrink)
    return {
        "shrink": chosen,
        "in_sample": asdict(header_shares(probs, oof.y, agree_at, disagree_at)),
        "in_sample_sources": asdict(header_shares(probs, oof.y, agree_at, disagree_at, oof.groups)),
        "cross_fitted": cross["images"],
        "cross_fitted_sources": cross["sources"],
        "cross_fitted_per_label": cross["per_label"],
        "shrink_per_fold": cross["shrink_per_fold"],
    }


def scored(run: Path) -> dict[str, Any]:
    """Each rule's shares on ``run``: export's (the shrink chosen on the folds; cross-fitted, each
    fold's shrink and thresholds chosen on the other folds alone) and each fixed factor."""
    oof = read_out_of_fold(run)
    probs = softmax_np(oof.data["logits"], float(oof.data["temperature"]))
    folds = np.asarray(oof.data["folds"])
    found: dict[str, Any] = {"run": str(run), "n": len(oof.y), "folds": len(np.unique(folds))}
    found["export: shrink chosen on the folds"] = _row(probs, oof, folds, None)
    for shrink in FIXED:
        found[f"fixed shrink {shrink}"] = _row(probs, oof, folds, shrink)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=loso_run_argument, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {"runs": [scored(run) for run in args.runs]}
    for run in results["runs"]:
        print(run["run"])
        for key, value in run.items():
            if isinstance(value, dict):
                a, c = value["in_sample"], value["cross_fitted"]
                print(
                    f"  {key:36s} shrink {value['shrink']:.2f} in-sample agree {a['agree']:.3f} "
                    f"refuted {a['false_disagree']:.4f} "
                    f"caught {a['caught']:.3f} | cross-fitted agree {c['agree']:.3f} "
                    f"refuted {c['false_disagree']:.4f} caught {c['caught']:.3f} "
                    f"confirmed copies {c['false_agree']:.3f}"
                )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
