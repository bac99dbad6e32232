"""Station-level discrepancies (``sorter report``'s ``source_contradictions``) on a leave-sources-out
run's out-of-fold predictions: how many systematic mislabellings they report, and how many honest
sources they accuse.

Run: .venv/bin/python tests/bench/bench_station.py runs/loso5-eff [runs/loso5-eff-s1 ...]
         [--out tests/bench/results-station-2core.json]
     where each run is a finished ``sorter-train loso`` (see bench_adapt.py for the command).

Every image's probabilities come from the fold network that never saw its source, at the run's
temperature, with the operating point chosen on the run (as an exported model's is). Every
(source, true label) with at least :data:`sorter.reports.CONTRADICTION_MIN_INSTANCES` images is one
group, and it is scored under each of the eight header labels: under its own label it is an honest
station, under any other it is a station that writes that label on every image (a systematic
error, as a camera that stores every SPECT as PT). Rules compared: ``sorter report``'s
(:func:`sorter.reports.contradicts`), and the one before 2026-12-05 (half the images refuted).
Reported per run: the share of systematic errors reported, by the header label written, and the
honest groups reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sorter.reports import CONTRADICTION_MIN_INSTANCES, contradicts  # noqa: E402
from train.calibrate import softmax_np  # noqa: E402
from train.operating_point import point_for, read_out_of_fold  # noqa: E402

#: (n, disagree, mean p(header), mean disagree_at) -> reported
Rule = Callable[[int, int, float, float], bool]
RULES: dict[str, Rule] = {
    "sorter report (rate >= 0.3 or mean p <= 1.5 x disagree_at)": contradicts,
    "before 2026-12-05 (rate >= 0.5)": lambda n, d, _p, _t: contradicts(n, d, None, None, min_rate=0.5),
}


def run_result(run: Path) -> dict[str, Any]:
    """Every rule on every group of ``run`` (see the module docstring)."""
    oof = read_out_of_fold(run)
    temperature = float(oof.data["temperature"])
    probs = softmax_np(oof.data["logits"], temperature)
    point = point_for(probs, oof.y, oof.labels, oof.groups, temperature)
    disagree_at = np.asarray([point["disagree_at"][label] for label in oof.labels])
    sources = np.asarray([str(s) for s in oof.data["sources"]])
    out: dict[str, Any] = {"run": str(run), "groups": 0, "rules": {}}
    scored: list[tuple[str, str, str, bool, int, int, float]] = []
    for source in sorted(set(sources.tolist())):
        for true in sorted(set(oof.y[sources == source].tolist())):
            mask = (sources == source) & (oof.y == true)
            if mask.sum() < CONTRADICTION_MIN_INSTANCES:
                continue
            out["groups"] += 1
            for header, label in enumerate(oof.labels):
                p = probs[mask, header]
                refuted = int((p <= disagree_at[header]).sum())
                honest = header == true
                scored.append(
                    (source, oof.labels[true], label, honest, int(mask.sum()), refuted, float(p.mean()))
                )
    for name, rule in RULES.items():
        by_header: dict[str, list[bool]] = defaultdict(list)
        accused = []
        for source, true, header, honest, n, refuted, mean_p in scored:
            reported = rule(n, refuted, mean_p, float(disagree_at[oof.labels.index(header)]))
            if honest and reported:
                accused.append(f"{source}/{true}")
            elif not honest:
                by_header[header].append(reported)
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
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [run_result(run) for run in args.runs]
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
