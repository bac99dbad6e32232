"""The SOP class as a second witness, on leave-sources-out predictions.

Every held-out image of RUN (a finished ``sorter-train loso`` run) is judged from its out-of-fold
probabilities at the run's own temperature, with the operating point ``sorter-train export``
would choose on them (:func:`train.operating_point.choose_held_out`), twice: on the pixels alone and with
the header's SOP class (:func:`sorter.compare.compare`, ``Witnesses.contradicted_by``). Right headers are
each image with its own file's Modality; relabelled copies are each image once with every other
label's Modality written in (CT, MR, PT, NM, DX, MG, US, OT) and its SOP class left as the file
has it, as a router or a hand edit leaves it; two looser rules than the shipped one are scored
beside it (``with_class_top2``, ``class_alone``). Only DICOM images can change (a picture or a volume
has no SOP class); both the DICOM images and all images are reported, per image and averaged
over (source, label) groups as the model card averages.

Run: .venv/bin/python tests/bench/bench_header_class.py --run runs/loso5-eff \\
         [--out tests/bench/results-header-class-2core.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sorter.compare import compare  # noqa: E402
from sorter.dicom.headers import read_header  # noqa: E402
from sorter.domain import Label, Verdict, Witnesses  # noqa: E402
from sorter.model.classifier import top_two  # noqa: E402
from sorter.model.spec import Thresholds  # noqa: E402
from sorter.taxonomy import class_contradiction  # noqa: E402
from train.calibrate import softmax_np  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.operating_point import as_thresholds, choose_held_out, read_out_of_fold  # noqa: E402
from train.runs import images_for, loso_run_argument, select_rows  # noqa: E402

#: Pixels alone; the shipped rule (the pixels' top label is one the class allows); two looser ones.
RULES = ("pixels", "with_class", "with_class_top2", "class_alone")
#: The Modality a relabelled copy gets for each label.
MODALITY = {"CT": "CT", "MR": "MR", "PT": "PT", "NM": "NM", "XR": "DX", "MG": "MG", "US": "US", "OT": "OT"}


def dicom_headers(rows: Sequence[Any], indices: Iterable[int]) -> dict[int, tuple[str | None, str | None]]:
    """(Modality, SOP Class UID) of each DICOM manifest row of ``indices``, read once per file as
    a scan reads them (:func:`sorter.dicom.headers.read_header`: a class held only in the File
    Meta Information counts; pictures and volumes have neither and are left out)."""
    out = {}
    for index in sorted(set(indices)):
        if rows[index].format == "dcm":
            header = read_header(rows[index].path)
            out[index] = header.modality, header.sop_class_uid
    return out


def judged_out_of_fold(run: Path) -> tuple[Any, Any, Any, np.ndarray, list[Label], Thresholds]:
    """A finished loso run's manifest rows, images, out-of-fold predictions, their calibrated
    probabilities, labels, and the operating point ``sorter-train export`` would choose on them."""
    oof = read_out_of_fold(run)
    config, manifest = load_run_config(run)
    rows = select_rows(manifest, config)
    images = images_for(rows, config, progress=False)  # the run's cache: the same images, in order
    if len(images) != len(oof.y) or list(images.labels) != list(oof.data["labels"]):
        sys.exit(
            "the run's out-of-fold images are not its manifest's: an unfinished run, or another manifest"
        )
    probs = softmax_np(oof.data["logits"], float(oof.data["temperature"]))
    agree_at, disagree_at, _ = choose_held_out(probs, oof.y, np.asarray(oof.data["folds"]))
    labels = [Label(v) for v in oof.labels]
    thresholds = as_thresholds(oof.labels, agree_at, disagree_at)
    return rows, images, oof, probs, labels, thresholds


def _shares(tally: dict[str, list[tuple[str, Verdict]]]) -> dict[str, float]:
    """Shares of right headers agreed and refuted and of copies refuted and agreed, per image and
    per (source, label) group."""
    out: dict[str, float] = {"right": 0, "relabelled": 0}
    for kind, verdict, name in (
        ("right", Verdict.AGREE, "agree"),
        ("right", Verdict.DISAGREE, "false_disagree"),
        ("copy", Verdict.DISAGREE, "caught"),
        ("copy", Verdict.AGREE, "false_agree"),
    ):
        items = tally[kind]
        if not items:
            continue
        out[name] = float(np.mean([v is verdict for _, v in items]))
        groups: dict[str, list[bool]] = defaultdict(list)
        for group, v in items:
            groups[group].append(v is verdict)
        out[f"{name}_sources"] = float(np.mean([np.mean(g) for g in groups.values()]))
    out["right"], out["relabelled"] = len(tally["right"]), len(tally["copy"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=loso_run_argument, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    rows, images, oof, probs, labels, thresholds = judged_out_of_fold(args.run)
    headers = dicom_headers(rows, (int(r) for r in images.rows))
    tallies: dict[str, dict[str, dict[str, list[tuple[str, Verdict]]]]] = {
        scope: {rule: defaultdict(list) for rule in RULES} for scope in ("dicom", "all")
    }
    for i, row_index in enumerate(images.rows):
        row = rows[int(row_index)]
        is_dicom = int(row_index) in headers
        modality, sop_class = headers.get(int(row_index), (None, None))
        prediction = top_two(probs[i], labels)
        group = f"{row.source}/{row.label}"
        truth = Label(str(oof.data["labels"][i]))
        cases = [("right", truth, modality)] + [
            ("copy", label, MODALITY[label.value]) for label in labels if label is not truth
        ]
        for kind, header, written in cases:
            contradicted = class_contradiction(written, sop_class) if is_dicom else None
            pixels = compare(header, prediction, labels, thresholds)
            shipped = compare(header, prediction, labels, thresholds, Witnesses(contradicted_by=contradicted))
            # Looser rules, measured and not shipped: the class alone refutes an uncertain header
            # when the pixels' runner-up is a label it allows, or whatever the pixels say.
            doubted = pixels is Verdict.UNCERTAIN and contradicted is not None
            top2 = doubted and prediction.second_label in (contradicted or ())
            verdicts = {
                "pixels": pixels,
                "with_class": shipped,
                "with_class_top2": Verdict.DISAGREE if top2 else shipped,
                "class_alone": Verdict.DISAGREE if doubted else shipped,
            }
            for rule, verdict in verdicts.items():
                for scope in ("dicom", "all") if is_dicom else ("all",):
                    tallies[scope][rule][kind].append((group, verdict))
    result: dict[str, Any] = {
        "run": str(args.run),
        "protocol": "leave-sources-out out-of-fold probabilities; operating point chosen on them",
        "class_contradicts_right_headers": sum(
            class_contradiction(m, c) is not None for m, c in headers.values()
        ),
        "dicom_files": len(headers),
    }
    for scope, rules in tallies.items():
        result[scope] = {rule: _shares(tally) for rule, tally in rules.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
