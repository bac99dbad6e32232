"""The radionuclide as a witness, on leave-sources-out predictions.

Every held-out image of RUN (a finished ``sorter-train loso`` run) is judged from its
out-of-fold probabilities at the run's own temperature, with the operating point ``sorter-train
export`` would choose on them, as ``bench_header_class.py`` judges it: on the pixels alone, with
the SOP class (the rule shipped before), and with the SOP class and the radionuclide
(:func:`sorter.compare.compare`, ``nuclide_allows``). Each image names its nuclide as a PET or NM
object of it would: its file's own Radionuclide Code Sequence where it has one (the corpus's
PET files name F-18, its planar NM files Tc-99m), else F-18 for PT and Tc-99m for NM (the isotope
modules are mandatory in both IODs); pictures and volumes have no SOP class.

Three cases per image:

* ``right``: its own label's header. The nuclide agrees with it, so the rule cannot change it
  (reported to show it does not).
* ``right_own_code``: the same, only the images whose own file names its nuclide (the corpus's
  DICOM PET and planar NM files): no assumed code.
* ``swapped``: the other emission label's Modality (PT written as NM, NM as PT), its file's SOP
  class and nuclide left as they were: a router's or a hand edit.
* ``exported``: the other emission label's Modality and SOP class, the nuclide left as it was: a
  SPECT exported as a PET object for dosimetry software, a PET saved as NM on a workstation. The
  class then agrees with the wrong Modality; only the nuclide contradicts it.
* ``wrong_nuclide``: its own label's header with the other emission label's nuclide: what the
  rule costs where the nuclide, not the Modality, is wrong (a right header then refuted).
* ``every_right``: every held-out image (all labels) under its own label's header, its class and
  nuclide as above: issue 12's share of right headers confirmed.
* ``every_right_as_stored`` and ``every_copy_as_stored``: the same two with only the nuclides the
  files name themselves (no assumed F-18 or Tc-99m): the corpus as a scan reads it.
* ``every_copy``: every held-out image (all labels) under each other label's Modality, its class
  and nuclide as above: issue 12's share of relabelled copies refuted.
* ``copy_naming_the_header_nuclide``: every held-out image under PT and NM headers of another
  label, with the nuclide that header's scanner images (F-18 for PT, Tc-99m for NM) and its own
  file's class: the worst case for the confirming rule (a PET/CT's CT carrying the PET's
  radiopharmaceutical, relabelled PT; a SPECT rewritten as PET, nuclide and all).

Rules: ``pixels``, ``with_class``, ``with_class_and_nuclide`` (the nuclide refutes a header it rules
out), ``nuclide_confirms`` (as well, a PT or NM header its nuclide confirms is tested on p(PT) +
p(NM) against that header's ``agree_at``: the pixels must show emission imaging, the nuclide says
which), ``confirms_at_emission_agree_at`` (the same against ``emission_agree_at``, chosen on
the same predictions by ``train.operating_point.choose_emission``: what models exported since
2026-12-06 do) and, for a run that ``sorter-train ensemble`` wrote (it keeps its partner's
out-of-fold logits), ``with_confirming_partner``: the same, where the partner alone gives the
header's label at least its ``confirm_at`` (cross-fitted over the folds by ``train.confirm``,
tolerance 0.01, as ``sorter-train export --confirm`` chooses it) the image is judged on the
partner's probabilities, as the bundled model serves it.

With ``--cross-fit`` every threshold (``agree_at``, ``disagree_at``, ``emission_agree_at`` and
the partner's ``confirm_at``) that judges a fold's images is chosen on the other folds alone, as an
archive meets thresholds chosen on sources it does not hold; without it they are chosen on every
image (in-sample, as ``export`` chooses the artefact's), the partner's ``confirm_at`` cross-fitted.

``--shrink 1`` scores the thresholds chosen before ``train.operating_point.choose_shrink``.

Run: .venv/bin/python tests/bench/bench_nuclide.py --run runs/loso5-eff [--cross-fit] [--shrink 1] \\
         [--out tests/bench/results-nuclide-2core.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_header_class import MODALITY, judged_out_of_fold  # noqa: E402

from sorter.compare import compare  # noqa: E402
from sorter.dicom.headers import read_header  # noqa: E402
from sorter.domain import NO_WITNESSES, Label, Verdict, Witnesses  # noqa: E402
from sorter.model.classifier import top_two  # noqa: E402
from sorter.nuclides import nuclide_confirms, nuclide_contradiction  # noqa: E402
from sorter.taxonomy import class_contradiction  # noqa: E402
from train.calibrate import softmax_np  # noqa: E402
from train.confirm import TOLERANCE, choose_confirm, confirm_point  # noqa: E402
from train.operating_point import as_thresholds, choose_emission, choose_held_out  # noqa: E402
from train.runs import loso_run_argument  # noqa: E402

RULES = (
    "pixels",
    "with_class",
    "with_class_and_nuclide",
    "nuclide_confirms",
    "confirms_at_emission_agree_at",
    "with_confirming_partner",
)
#: The nuclide an image without its own names: F-18 (SNOMED RT) for PT, Tc-99m for NM.
TYPICAL = {Label.PT: "C-111A1", Label.NM: "C-163A8"}
OTHER = {Label.PT: Label.NM, Label.NM: Label.PT}
CASES = (
    "right",
    "right_own_code",
    "swapped",
    "exported",
    "wrong_nuclide",
    "every_right",
    "every_copy",
    "every_right_as_stored",
    "every_copy_as_stored",
    "copy_naming_the_header_nuclide",
)


def file_header(path: str) -> tuple[str | None, str | None]:
    """(SOP Class UID, radionuclide code value) of a DICOM file, as a scan reads them."""
    header = read_header(path)
    return header.sop_class_uid, header.radionuclide


def confirming_partner(oof: Any, probs: np.ndarray, thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
    """The partner's calibrated out-of-fold probabilities and, per image and header label, the
    ``confirm_at`` chosen on the other folds; a run without a partner confirms nothing (the rule
    ``with_confirming_partner`` is then ``confirms_at_emission_agree_at``)."""
    if "partner_logits" not in oof.data:
        return probs, np.full(probs.shape, np.inf)
    partner = softmax_np(oof.data["partner_logits"], float(oof.data["partner_temperature"]))
    bounds = [
        np.asarray([getattr(thresholds, key)[lab] for lab in oof.labels])
        for key in ("agree_at", "disagree_at")
    ]
    folds = np.asarray(oof.data["folds"])
    point = confirm_point(
        probs, partner, oof.y, folds, oof.groups, (bounds[0], bounds[1]), oof.labels, TOLERANCE
    )
    per_fold = point["per_fold"] or {int(f): point["confirm_at"] for f in folds}  # one fold: its own
    at = np.asarray([[per_fold[int(f)][lab] for lab in oof.labels] for f in folds])
    return partner, at


def fold_limits(
    oof: Any, probs: np.ndarray, partner: np.ndarray, shrink: float | None
) -> dict[int, tuple[Any, Any, np.ndarray]]:
    """Per fold: the header test's thresholds (``choose_held_out``'s, at a fixed ``shrink`` if
    given), the same with ``emission_agree_at``, and the partner's ``confirm_at`` per label,
    each chosen on the other folds' images alone."""
    folds = np.asarray(oof.data["folds"])
    found = {}
    for fold in np.unique(folds):
        rest = folds != fold
        agree_at, disagree_at, _ = choose_held_out(probs[rest], oof.y[rest], folds[rest], shrink)
        thresholds = as_thresholds(oof.labels, agree_at, disagree_at)
        emission = choose_emission(probs[rest], oof.y[rest], oof.labels)
        confirm_at = (
            choose_confirm(probs[rest], partner[rest], oof.y[rest], agree_at, TOLERANCE)
            if "partner_logits" in oof.data
            else np.full(len(oof.labels), np.inf)
        )
        found[int(fold)] = (thresholds, replace(thresholds, emission_agree_at=emission), confirm_at)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=loso_run_argument, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--cross-fit", action="store_true", help="judge each fold by thresholds chosen on the other folds"
    )
    parser.add_argument(
        "--shrink",
        type=float,
        help="a fixed factor on every disagree_at (1: the rule before choose_shrink) instead of export's",
    )
    args = parser.parse_args()

    rows, images, oof, probs, labels, thresholds = judged_out_of_fold(args.run)
    folds = np.asarray(oof.data["folds"])
    if args.shrink is not None:  # the fixed factor in-sample too
        thresholds = as_thresholds(oof.labels, *choose_held_out(probs, oof.y, folds, args.shrink)[:2])
    at_emission = replace(thresholds, emission_agree_at=choose_emission(probs, oof.y, oof.labels))
    partner, confirm_at = confirming_partner(oof, probs, thresholds)
    by_fold = fold_limits(oof, probs, partner, args.shrink) if args.cross_fit else {}
    headers: dict[int, tuple[str | None, str | None]] = {}
    tally: dict[str, dict[str, dict[str, list[Verdict]]]] = {
        case: {rule: defaultdict(list) for rule in RULES} for case in CASES
    }
    own_codes: dict[str, int] = defaultdict(int)
    for i, row_index in enumerate(images.rows):
        truth = Label(str(oof.data["labels"][i]))
        row = rows[int(row_index)]
        if row.format == "dcm" and int(row_index) not in headers:
            headers[int(row_index)] = file_header(row.path)
        sop_class, own = headers.get(int(row_index), (None, None))
        prediction = top_two(probs[i], labels)
        # Every image under every other label's Modality, its class and nuclide as they are (the
        # share issue 12 counts: PT and NM images name their nuclide, the others none).
        code = own or TYPICAL.get(truth)
        cases = [("every_right", truth, code, sop_class), ("every_right_as_stored", truth, own, sop_class)]
        for header in labels:
            if header is not truth:
                cases += [
                    ("every_copy", header, code, sop_class),
                    ("every_copy_as_stored", header, own, sop_class),
                ]
        cases += [
            ("copy_naming_the_header_nuclide", header, TYPICAL[header], sop_class)
            for header in OTHER
            if header is not truth
        ]
        if truth in OTHER:
            own_codes[f"{truth.value}: {own or 'none (given ' + TYPICAL[truth] + ')'}"] += 1
            cases += [
                ("right", truth, code, sop_class),
                *([("right_own_code", truth, own, sop_class)] if own else []),
                ("swapped", OTHER[truth], code, sop_class),
                ("exported", OTHER[truth], code, None),  # a class matching the Modality: no witness
                ("wrong_nuclide", truth, TYPICAL[OTHER[truth]], sop_class),
            ]
        plain, emitting, confirming = (
            by_fold[int(folds[i])] if args.cross_fit else (thresholds, at_emission, confirm_at[i])
        )
        for case, header, nuclide, file_class in cases:
            contradicted = class_contradiction(MODALITY[header.value], file_class)
            allows = nuclide_contradiction(header, nuclide)
            by_class = Witnesses(contradicted_by=contradicted)
            by_nuclide = replace(by_class, nuclide_allows=allows)
            confirmed = replace(by_nuclide, nuclide_confirms=nuclide_confirms(header, nuclide))
            h = labels.index(header)
            served = top_two(partner[i], labels) if partner[i, h] >= confirming[h] else prediction
            verdicts = {
                rule: compare(header, shown, labels, limits, witnesses)
                for rule, witnesses, limits, shown in zip(
                    RULES,
                    (NO_WITNESSES, by_class, by_nuclide, confirmed, confirmed, confirmed),
                    (plain, plain, plain, plain, emitting, emitting),
                    (prediction,) * 5 + (served,),
                    strict=True,
                )
            }
            for rule, verdict in verdicts.items():
                tally[case][rule][truth.value].append(verdict)

    def shares(verdicts: list[Verdict]) -> dict[str, float]:
        return {
            v.value: float(np.mean([x is v for x in verdicts])) for v in (Verdict.AGREE, Verdict.DISAGREE)
        }

    result: dict[str, Any] = {
        "run": str(args.run),
        "protocol": "leave-sources-out out-of-fold probabilities; "
        + (
            "each fold judged by thresholds chosen on the other folds"
            if args.cross_fit
            else "operating point chosen on them"
        ),
        "nuclides": dict(sorted(own_codes.items())),
        "thresholds": {
            "agree_at": thresholds.agree_at,
            "disagree_at": thresholds.disagree_at,
            "emission_agree_at": at_emission.emission_agree_at,
        },
    }
    for case, rules in tally.items():
        result[case] = {
            rule: {
                "all": {
                    "n": sum(map(len, by_label.values())),
                    **shares([v for vs in by_label.values() for v in vs]),
                },
                **{f"{label} images": {"n": len(vs), **shares(vs)} for label, vs in sorted(by_label.items())},
            }
            for rule, by_label in rules.items()
        }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
