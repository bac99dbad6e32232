"""Station-level discrepancies (``sorter report``'s ``source_contradictions``) on a leave-sources-out
run's out-of-fold predictions: how many systematic mislabellings they report, and how many honest
sources they accuse.

Run: .venv/bin/python tests/bench/bench_station.py runs/loso5-eff [runs/loso5-eff-s1 ...]
         [--cross-fit] [--shrink 1] [--grid [--rates ...] [--factors ...] [--towards ...]]
         [--out tests/bench/results-station-2core.json]
     where each run is a finished ``sorter-train loso`` (see bench_adapt.py for the command).

Every image's probabilities come from the fold network that never saw its source, at the run's
temperature, with the operating point chosen on the run (as an exported model's is; with
``--cross-fit``, on the other folds alone, as an archive meets a model's thresholds). Every
(source, true label) with at least :data:`sorter.reports.CONTRADICTION_MIN_INSTANCES` images is one
group, and it is scored under each of the eight header labels: under its own label it is an honest
station, under any other it is a station that writes that label on every image (a systematic
error, as a camera that stores every SPECT as PT). Rules compared: ``sorter report``'s
(:func:`sorter.reports.contradicts`), the one before 2026-12-07 (mean p(header) at most 1.5 x
``disagree_at``) and the one before 2026-12-05 (half the images refuted), on the pixels' verdicts;
and ``sorter report``'s on the verdicts a scan stores
(:func:`sorter.compare.compare` with the radionuclide as a witness, ``emission_agree_at``
included), where every PT and NM image names the nuclide its scanner images (F-18, Tc-99m), as a
DICOM object of it would, and no other image names one.
Reported per run: the share of systematic errors reported, by the header label written, and the
honest groups reported. ``--grid`` adds ``sorter report``'s rule at other bounds (the share
refuted, and the mean rule's bound as a factor on ``disagree_at`` or as a way towards
``agree_at``, :func:`sorter.reports.mean_bound`), and how near each honest group comes to being
accused: what the bounds were chosen on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
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
from sorter.reports import (  # noqa: E402
    CONTRADICTION_MIN_INSTANCES,
    CONTRADICTION_RATE,
    CONTRADICTION_TOWARDS,
    contradicts,
    evidence_labels,
)
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
    confirmed: int  # ... and confirmed
    mean_p: float  # mean p(header)
    mean_p_emission: float  # mean evidence (sorter.reports.evidence_labels): PT + NM under PT or NM
    disagree_at: float  # the header label's
    agree_at: float  # the header label's
    disagree: int  # images a scan calls disagree, the nuclide named (module docstring)
    agree: int  # ... and agree

    @property
    def honest(self) -> bool:
        return self.header == self.true


def _counts(g: Group, pixels: bool) -> tuple[int, int]:
    """Images refuted and confirmed: by the pixels alone, or in the verdicts a scan stores."""
    return (g.refuted, g.confirmed) if pixels else (g.disagree, g.agree)


def _factor_rule(rate: float, factor: float, pixels: bool) -> Callable[[Group], bool]:
    def rule(g: Group) -> bool:
        refuted, confirmed = _counts(g, pixels)
        return contradicts(g.n, refuted, g.mean_p, factor * g.disagree_at, min_rate=rate, n_agree=confirmed)

    return rule


def _towards_rule(
    rate: float, towards: float, pixels: bool, emission: bool = False
) -> Callable[[Group], bool]:
    def rule(g: Group) -> bool:
        refuted, confirmed = _counts(g, pixels)
        return contradicts(
            g.n,
            refuted,
            g.mean_p_emission if emission else g.mean_p,
            g.disagree_at,
            min_rate=rate,
            n_agree=confirmed,
            mean_agree_at=g.agree_at,
            towards=towards,
        )

    return rule


#: ``sorter report``'s rule (the share refuted, the mean bound ``CONTRADICTION_TOWARDS`` of the way
#: to ``agree_at`` on PT + NM under PT and NM) and the rules before it, on the pixels and on the
#: verdicts a scan stores.
RULES: dict[str, Callable[[Group], bool]] = {
    "sorter report (rate >= 0.3 or mean p <= the way from disagree_at to agree_at)": _towards_rule(
        CONTRADICTION_RATE, CONTRADICTION_TOWARDS, pixels=True, emission=True
    ),
    "before 2026-12-07 (rate >= 0.3 or mean p <= 1.5 x disagree_at)": _factor_rule(
        CONTRADICTION_RATE, 1.5, pixels=True
    ),
    "before 2026-12-05 (rate >= 0.5)": lambda g: contradicts(g.n, g.refuted, None, None, min_rate=0.5),
    "sorter report, on verdicts with the radionuclide (PT: F-18, NM: Tc-99m)": _towards_rule(
        CONTRADICTION_RATE, CONTRADICTION_TOWARDS, pixels=False, emission=True
    ),
    "before 2026-12-07, on verdicts with the radionuclide": _factor_rule(
        CONTRADICTION_RATE, 1.5, pixels=False
    ),
}


def mean_evidence(probs: np.ndarray, mask: np.ndarray, header: int, labels: Sequence[str]) -> float:
    """The mean rule's evidence for header label ``labels[header]`` over the images in ``mask``,
    as ``sorter report`` sums it (:func:`sorter.reports.evidence_labels`: PT + NM under PT or NM)."""
    columns = [labels.index(e.value) for e in evidence_labels(Label(labels[header]))]
    return float(probs[mask][:, columns].sum(axis=1).mean())


def _thresholds(probs: np.ndarray, oof: Any, rows: np.ndarray, shrink: float | None) -> Thresholds:
    """The operating point ``sorter-train export`` chooses on the images ``rows`` (at a fixed
    ``shrink`` if given; 1: the rule before 2026-12-06's last export)."""
    folds = np.asarray(oof.data["folds"])[rows]
    agree_at, disagree_at, _ = choose_held_out(probs[rows], oof.y[rows], folds, shrink)
    emission = choose_emission(probs[rows], oof.y[rows], oof.labels)
    return as_thresholds(oof.labels, agree_at, disagree_at, emission)


def scored_groups(run: Path, cross_fit: bool = False, shrink: float | None = None) -> tuple[int, list[Group]]:
    """Every (source, true label) group of ``run`` with enough images, under every header label
    (see the module docstring), and how many groups there are; with ``cross_fit`` each source
    judged by the operating point chosen on the other folds alone."""
    oof = read_out_of_fold(run)
    temperature = float(oof.data["temperature"])
    probs = softmax_np(oof.data["logits"], temperature)
    folds = np.asarray(oof.data["folds"])
    every = _thresholds(probs, oof, np.ones(len(folds), dtype=bool), shrink)
    by_fold = {int(f): _thresholds(probs, oof, folds != f, shrink) for f in np.unique(folds)}
    labels = [Label(v) for v in oof.labels]
    predictions = [top_two(row, labels) for row in probs]
    sources = np.asarray([str(s) for s in oof.data["sources"]])
    groups = 0
    scored: list[Group] = []
    for source in sorted(set(sources.tolist())):
        for true in sorted(set(oof.y[sources == source].tolist())):
            mask = (sources == source) & (oof.y == true)
            if mask.sum() < CONTRADICTION_MIN_INSTANCES:
                continue
            groups += 1
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
                        int((p >= thresholds.agree_at[label.value]).sum()),
                        float(p.mean()),
                        mean_evidence(probs, mask, header, labels),
                        disagree_at,
                        thresholds.agree_at[label.value],
                        verdicts.count(Verdict.DISAGREE),
                        verdicts.count(Verdict.AGREE),
                    )
                )
    return groups, scored


def rule_result(scored: list[Group], groups: int, rule: Callable[[Group], bool]) -> dict[str, Any]:
    """One rule over the scored groups: systematic errors reported (overall and by the header
    label written) and the honest groups it accuses."""
    by_header: dict[str, list[bool]] = defaultdict(list)
    accused = []
    for group in scored:
        reported = rule(group)
        if group.honest and reported:
            accused.append(f"{group.source}/{group.true}")
        elif not group.honest:
            by_header[group.header].append(reported)
    systematic = [r for v in by_header.values() for r in v]
    return {
        "systematic_reported": f"{sum(systematic)} of {len(systematic)}",
        "systematic_share": round(float(np.mean(systematic)), 3),
        "by_header_written": {h: round(float(np.mean(v)), 2) for h, v in sorted(by_header.items())},
        "honest_reported": f"{len(accused)} of {groups}",
        "honest_groups_reported": accused,
    }


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers (an option's value), refused in one line otherwise."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


def grid_result(
    scored: list[Group], groups: int, rates: list[float], factors: list[float], towards: list[float]
) -> list[dict[str, Any]]:
    """``sorter report``'s rule at every pair of bounds: the share of images refuted (``rates``)
    and the mean rule's bound, either ``factors`` times the header label's ``disagree_at`` (the
    rule before 2026-12-07) or, for each ``towards`` t, ``disagree_at^(1-t) * agree_at^t``
    (:func:`sorter.reports.mean_bound`); on the verdicts a scan stores (with the radionuclide)
    and on the pixels alone."""
    bounds = (
        [("factor", f, _factor_rule) for f in factors]
        + [("towards_agree_at", t, _towards_rule) for t in towards]
        + [("towards_agree_at_emission", t, partial(_towards_rule, emission=True)) for t in towards]
    )
    rows = []
    for rate in rates:
        for kind, value, make in bounds:
            row: dict[str, Any] = {"rate": rate, kind: value}
            for scenario, pixels in (("verdicts", False), ("pixels", True)):
                row[scenario] = rule_result(scored, groups, make(rate, value, pixels))
            rows.append(row)
    return rows


def _towards(g: Group) -> float | None:
    """The ``towards`` at and above which ``sorter report``'s mean rule (PT + NM the evidence under
    a PT or NM header) would accuse ``g``; None where no bound under ``agree_at`` would."""
    evidence = g.mean_p_emission
    if not 0 < g.disagree_at < g.agree_at or evidence >= g.agree_at:
        return None
    if evidence <= g.disagree_at:
        return 0.0
    return round(float(np.log(evidence / g.disagree_at) / np.log(g.agree_at / g.disagree_at)), 3)


def honest_margins(scored: list[Group], pixels: bool) -> list[dict[str, Any]]:
    """How near each honest group comes to being accused: its share of images refuted, its mean
    p(header) over ``disagree_at`` (the factor at which the rule before 2026-12-07 would accuse
    it) and the ``towards`` at which :func:`sorter.reports.mean_bound` would, and whether most of
    its images confirm the header (which silences the mean rule); nearest first."""
    rows = []
    for g in scored:
        if not g.honest:
            continue
        refuted, confirmed = _counts(g, pixels)
        rows.append(
            {
                "group": f"{g.source}/{g.true}",
                "n": g.n,
                "refuted_share": round(refuted / g.n, 3),
                "mean_p_over_disagree_at": round(g.mean_p_emission / g.disagree_at, 1)
                if g.disagree_at > 0
                else None,
                "towards_agree_at": _towards(g),
                "most_agree": 2 * confirmed > g.n,
            }
        )
    return sorted(
        rows,
        key=lambda r: (
            r["most_agree"],
            float("inf") if r["towards_agree_at"] is None else r["towards_agree_at"],
        ),
    )


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
    parser.add_argument(
        "--grid",
        action="store_true",
        help="also score sorter report's rule at every --rates with every mean bound (--factors on "
        "disagree_at, the rule before; --towards agree_at, the rule now), and list how near each honest "
        "source comes to being accused",
    )
    parser.add_argument("--rates", type=floats, default=[0.2, 0.25, 0.3, 0.4, 0.5])
    parser.add_argument("--factors", type=floats, default=[1.5, 2, 3, 4, 5, 7.5, 10, 15])
    parser.add_argument("--towards", type=floats, default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    args = parser.parse_args()
    results = []
    for run in args.runs:
        groups, scored = scored_groups(run, args.cross_fit, args.shrink)
        result: dict[str, Any] = {
            "run": str(run),
            "groups": groups,
            "rules": {name: rule_result(scored, groups, rule) for name, rule in RULES.items()},
        }
        if args.grid:
            result["grid"] = grid_result(scored, groups, args.rates, args.factors, args.towards)
            result["honest_margins"] = {
                scenario: honest_margins(scored, pixels)
                for scenario, pixels in (("verdicts", False), ("pixels", True))
            }
        results.append(result)
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
    if args.grid:
        _print_grid(results)
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": results}, indent=2) + "\n")


def _print_grid(results: list[dict[str, Any]]) -> None:
    print(
        "rate  bound  "
        + "  ".join(
            f"{Path(r['run']).name} {scenario}: reported, honest accused"
            for r in results
            for scenario in ("verdicts", "pixels")
        )
    )
    for i, row in enumerate(results[0]["grid"]):
        bound = (
            f"x{row['factor']}"
            if "factor" in row
            else f"t{row['towards_agree_at']}"
            if "towards_agree_at" in row
            else f"e{row['towards_agree_at_emission']}"
        )
        cells = [
            f"{r['grid'][i][scenario]['systematic_share']:.3f}, "
            f"{len(r['grid'][i][scenario]['honest_groups_reported'])}"
            for r in results
            for scenario in ("verdicts", "pixels")
        ]
        print(f"{row['rate']:<5} {bound:<6} " + "    ".join(cells))
    for result in results:
        for scenario, margins in result["honest_margins"].items():
            nearest = [(m["group"], m["towards_agree_at"]) for m in margins if not m["most_agree"]][:4]
            print(f"{result['run']} {scenario}: honest groups nearest the mean rule (towards): {nearest}")


if __name__ == "__main__":
    main()
