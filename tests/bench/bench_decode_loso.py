"""Reduced against full decoding, paired, on a leave-sources-out run's own fold networks.

Every held-out image of RUN is predicted by the fold network that never saw its source, from
the reduced decode as this code does it (what ``sorter scan`` does; the image cache is rebuilt
when the decode changed since the run) and from the full decode (every pixel, as
``--full-decode``); the run's own out-of-fold logits, from the decode it was trained with, are
scored beside them as ``run_cache``. Only DICOM files whose frames the
reduced path takes (JPEG 2000, 8-bit DCT JPEG) can differ; NIfTI, NRRD and pictures decode one
way. Both sets of logits are scored as a loso report scores them (:func:`train.compare.score`),
with the run's own temperature, so the difference is the decode alone, not training's
run-to-run spread (which moves balanced accuracy by about 0.03 on this corpus).

Run: .venv/bin/python tests/bench/bench_decode_loso.py --run runs/loso5-eff \\
         [--out tests/bench/results-decode-loso-2core.json]
     where RUN is a finished ``sorter-train loso`` run that kept its fold networks.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sorter.model.artefact import load_artefact  # noqa: E402
from sorter.model.preprocess import preprocess_frame  # noqa: E402
from train.calibrate import softmax_np  # noqa: E402
from train.compare import score  # noqa: E402
from train.config import load_run_config  # noqa: E402
from train.data import DecodeOptions, ImageSet, read_frames, usable_frames  # noqa: E402
from train.fit import predict_logits  # noqa: E402
from train.runs import images_for, select_rows  # noqa: E402


def full_decode(
    images: ImageSet, rows: list[Any], options: DecodeOptions, params: Any
) -> tuple[ImageSet, int]:
    """``images`` with every DICOM row's serving inputs made from the full decode; (set, rows changed)."""
    evals = images.eval.copy()
    features = images.features.copy()
    changed = 0
    for i, row in enumerate(rows):
        if row.format.lower() != "dcm":
            continue
        at = np.flatnonzero(images.rows == i)
        if not len(at):
            continue  # a file the cache could not decode either
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            frames, colour, shape, _ = read_frames(row, options, None)
        usable = usable_frames(frames)  # the frames the cache kept
        if len(usable) != len(at):
            raise SystemExit(f"{row.path}: {len(usable)} frames in full, {len(at)} in the cache")
        for slot, frame in zip(at, usable, strict=True):
            image, feature = preprocess_frame(frame, colour, params, shape=shape)
            changed += not np.array_equal(image, evals[slot])
            evals[slot], features[slot] = image, feature
    out = images.subset(np.ones(len(images), bool))
    out.eval, out.features = evals, features
    return out, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished loso run with fold networks")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/bench/results-decode-loso-2core.json")
    args = parser.parse_args()
    config, manifest = load_run_config(args.run)
    rows = select_rows(manifest, config)
    reduced = images_for(rows, config, progress=False)
    params = config.preprocess()
    options = DecodeOptions(config.max_frames, config.axial_slices, config.reformat_slices)
    full, changed = full_decode(reduced, rows, options, params)
    fold_of = json.loads((args.run / "folds.json").read_text())
    image_fold = np.asarray([fold_of[str(s)] for s in reduced.sources])
    labels = [str(v) for v in config.labels]
    logits = {name: np.zeros((len(reduced), len(labels)), np.float32) for name in ("reduced", "full")}
    with np.load(args.run / "oof.npz") as oof:
        temperature = float(oof["temperature"])
        logits["run_cache"] = oof["logits"]
    for fold in sorted(set(image_fold.tolist())):
        held = image_fold == fold
        network = load_artefact(args.run / f"fold-{fold}" / "model.pt").network.eval()
        logits["reduced"][held] = predict_logits(network, reduced.subset(held))
        logits["full"][held] = predict_logits(network, full.subset(held))
    # Zero when the run cached the images as this code decodes them (a check of the pairing);
    # otherwise how far this code's reduced decode moves the run's own logits.
    drift = float(np.abs(logits["run_cache"] - logits["reduced"]).max())
    y = [str(v) for v in reduced.labels]
    sources = [str(s) for s in reduced.sources]
    result: dict[str, Any] = {
        "run": str(args.run),
        "images": len(reduced),
        "images_whose_input_differs": changed,
        "temperature": temperature,
        "max_logit_difference_from_the_runs_own": drift,
    }
    preds = {}
    for name, z in logits.items():
        probs = softmax_np(z, temperature)
        preds[name] = probs.argmax(axis=1)
        metrics, macro, point = score(y, probs, labels, sources, temperature)
        assert point is not None
        result[name] = {
            "accuracy": metrics["accuracy"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "source_macro": macro["balanced_accuracy"],
            "ece": metrics["ece"],
            "recall": {label: metrics["per_class"][label]["recall"] for label in labels},
            "header_test": point["images"],
        }
    for name in ("reduced", "run_cache"):
        differ = preds[name] != preds["full"]
        suffix = "" if name == "reduced" else f"_{name}"
        result[f"labels_changed{suffix}"] = int(differ.sum())
        result[f"labels_changed_files{suffix}"] = sorted(
            {str(rows[int(reduced.rows[i])].path.name) for i in np.flatnonzero(differ)}
        )
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in logits}, indent=1))
    for name in logits:
        r = result[name]
        print(
            f"{name:>8}: balanced {r['balanced_accuracy']:.4f}, source-avg {r['source_macro']:.4f}, "
            f"accuracy {r['accuracy']:.4f}, ECE {r['ece']:.4f}, header test {r['header_test']}"
        )


if __name__ == "__main__":
    main()
