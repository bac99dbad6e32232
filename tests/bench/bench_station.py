"""Station-level discrepancies (``sorter report``'s ``source_contradictions``) on a leave-sources-out
run's out-of-fold predictions: how many systematic mislabellings they report, and how many honest
sources they accuse.

Run: .venv/bin/python tests/bench/bench_station.py runs/loso5-eff [runs/loso5-eff-s1 ...]
         [--cross-fit] [--shrink 1] [--out tests/bench/results-station-2core.json]
     where each run is a finished ``sorter-train loso`` (see bench_adapt.py for the command).

Every image's probabilities come from the fold network that never saw its source, at the run's
temperature, with the operating point chosen on the run (as an exported model's is; with
``--cross-fit``, on the other folds alone, as an archive meets a model's thresholds). Every
(source, true label) with at least :data:`sorter.reports.CONTRADICTION_MIN_INSTANCES` images is one
group, and it is scored under each of the eight header labels: under its own label it is an honest
station, under any other it is a station that writes that label on every image (a systematic
error, as a camera that stores every SPECT as PT). Rules compared: ``sorter report``'s
(:func:`sorter.reports.contradicts`), and the one before 2026-12-05 (half the images refuted), on
the pixels' verdicts; and ``sorter report``'s on the verdicts a scan stores
(:func:`sorter.compare.compare` with the radionuclide as a witness, ``emission_agree_at``
included), where every PT and NM image names the nuclide its scanner images (F-18, Tc-99m), as a
DICOM object of it would, and no other image names one.
Reported per run: the share of systematic errors reported, by the header label written, and the
honest groups reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nuclide import TYPICAL  # noqa: E402

from sorter.compare import compare, witnesses_of  # noqa: E402
from sorter.domain import Label, Thresholds, Verdict  # noqa: E402
from sorter.model.classifier import top_two  # noqa: E402
from sorter.reports import CONTRADICTION_MIN_INSTANCES, contradicts  # noqa: E402
from train.calibrate import softmax_np  # noqa: E402
from train.operating_point import as_thresholds, choose_emission, choose_held_out, read_out_of_fold  # noqa: E402
from train.runs import loso_run_argument  # noqa: E402


@dataclass(frozen=True)
class Group:
    """One (source, true label) group under one header label."""

    source: str
    true: str
    header: str
    n: int
    refuted: int  # images refuted by the pixels alone
    mean_p: float  # mean p(header)
    disagree_at: float  # the header label's
    disagree: int  # images a scan calls disagree, the nuclide named (module docstring)
    agree: int  # ... and agree

    @property
    def honest(self) -> bool:
        return self.header == self.true


RULES: dict[str, Callable[[Group], bool]] = {
    "sorter report (rate >= 0.3 or mean p <= 1.5 x disagree_at)": lambda g: contradicts(
        g.n, g.refuted, g.mean_p, g.disagree_at
    ),
    "before 2026-12-05 (rate >= 0.5)": lambda g: contradicts(g.n, g.refuted, None, None, min_rate=0.5),
    "sorter report, on verdicts with the radionuclide (PT: F-18, NM: Tc-99m)": lambda g: contradicts(
        g.n, g.disagree, g.mean_p, g.disagree_at, n_agree=g.agree
    ),
}


def _thresholds(probs: np.ndarray, oof: Any, rows: np.ndarray, shrink: float | None) -> Thresholds:
    """The operating point ``sorter-train export`` chooses on the images ``rows`` (at a fixed
    ``shrink`` if given; 1: the rule before 2026-12-06's last export)."""
    folds = np.asarray(oof.data["folds"])[rows]
    agree_at, disagree_at, _ = choose_held_out(probs[rows], oof.y[rows], folds, shrink)
    emission = choose_emission(probs[rows], oof.y[rows], oof.labels)
    return as_thresholds(oof.labels, agree_at, disagree_at, emission)


def run_result(run: Path, cross_fit: bool = False, shrink: float | None = None) -> dict[str, Any]:
    """Every rule on every group of ``run`` (see the module docstring); with ``cross_fit`` each
    source judged by the operating point chosen on the other folds alone."""
    oof = read_out_of_fold(run)
    temperature = float(oof.data["temperature"])
    probs = softmax_np(oof.data["logits"], temperature)
    folds = np.asarray(oof.data["folds"])
    every = _thresholds(probs, oof, np.ones(len(folds), dtype=bool), shrink)
    by_fold = {int(f): _thresholds(probs, oof, folds != f, shrink) for f in np.unique(folds)}
    labels = [Label(v) for v in oof.labels]
    predictions = [top_two(row, labels) for row in probs]
    sources = np.asarray([str(s) for s in oof.data["sources"]])
    out: dict[str, Any] = {"run": str(run), "groups": 0, "rules": {}}
    scored: list[Group] = []
    for source in sorted(set(sources.tolist())):
        for true in sorted(set(oof.y[sources == source].tolist())):
            mask = (sources == source) & (oof.y == true)
            if mask.sum() < CONTRADICTION_MIN_INSTANCES:
                continue
            out["groups"] += 1
            thresholds = by_fold[int(folds[mask][0])] if cross_fit else every
            for header, label in enumerate(labels):
                p = probs[mask, header]
                disagree_at = thresholds.disagree_at[label.value]
                witnesses = witnesses_of(label.value, None, label, TYPICAL.get(labels[true]))
                verdicts = [
                    compare(label, predictions[i], labels, thresholds, witnesses)
                    for i in np.flatnonzero(mask)
                ]
                scored.append(
                    Group(
                        source,
                        oof.labels[true],
                        label.value,
                        int(mask.sum()),
                        int((p <= disagree_at).sum()),
                        float(p.mean()),
                        disagree_at,
                        verdicts.count(Verdict.DISAGREE),
                        verdicts.count(Verdict.AGREE),
                    )
                )
    for name, rule in RULES.items():
        by_header: dict[str, list[bool]] = defaultdict(list)
        accused = []
        for group in scored:
            reported = rule(group)
            if group.honest and reported:
                accused.append(f"{group.source}/{group.true}")
            elif not group.honest:
                by_header[group.header].append(reported)
        systematic = [r for v in by_header.values() for r in v]
        out["rules"][name] = {
            "systematic_reported": f"{sum(systematic)} of {len(systematic)}",
            "systematic_share": round(float(np.mean(systematic)), 3),
            "by_header_written": {h: round(float(np.mean(v)), 2) for h, v in sorted(by_header.items())},
            "honest_reported": f"{len(accused)} of {out['groups']}",
            "honest_groups_reported": accused,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=loso_run_argument)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--cross-fit", action="store_true", help="judge each source by thresholds chosen on the other folds"
    )
    parser.add_argument(
        "--shrink", type=float, help="a fixed factor on every disagree_at (1: the rule before)"
    )
    args = parser.parse_args()
    results = [run_result(run, args.cross_fit, args.shrink) for run in args.runs]
    for result in results:
        print(
            f"{result['run']}: {result['groups']} (source, label) groups of >= {CONTRADICTION_MIN_INSTANCES}"
        )
        for name, row in result["rules"].items():
            print(
                f"  {name}: systematic {row['systematic_reported']} ({row['systematic_share']:.3f}), "
                f"honest reported {row['honest_reported']} {row['honest_groups_reported']}\n"
                f"    by header written: {row['by_header_written']}"
            )
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
