"""Int8 static quantisation of the bundled ONNX graph in ONNX Runtime: speed and agreement.

Run: .venv/bin/python tests/bench/bench_int8.py --cache .cache/sorter-train/images-<key>.npz \
         [--out results-int8.json]
The cache is the decoded corpus of ``sorter-train loso``/``fit`` with the bundled recipe
(``train/recipes/pretrained.yaml``); its ``eval`` arrays are the serving inputs. 256 of them
calibrate; all are classified by the float and each quantised graph. Reports images/s (2 threads,
batch 32, best of 3 rounds of 10) and top-1 agreement with the float graph, which stands in for
leave-sources-out accuracy: a graph that changes the float model's answers changes its accuracy
by as much, and the fold networks needed for a true comparison are not kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from sorter.model.artefact import DEFAULT_MODEL_PATH, file_sha256

VARIANTS = {
    "qdq-s8s8": {"quant_format": QuantFormat.QDQ, "per_channel": True},
    "qdq-u8s8": {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
    },
    "qoperator-s8s8": {"quant_format": QuantFormat.QOperator, "per_channel": True},
}


class _Calibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray, features: np.ndarray) -> None:
        self._feeds = iter(
            {"images": images[i : i + 1], "features": features[i : i + 1]} for i in range(len(images))
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(session: ort.InferenceSession, images: np.ndarray, features: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            session.run(None, {"images": images[i : i + 32], "features": features[i : i + 32]})[0]
            for i in range(0, len(images), 32)
        ]
    )


def _rate(session: ort.InferenceSession, images: np.ndarray, features: np.ndarray) -> float:
    feed = {"images": images[:32], "features": features[:32]}
    session.run(None, feed)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(10):
            session.run(None, feed)
        best = min(best, time.perf_counter() - started)
    return 320 / best


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main() -> None:
    """Quantise, classify, time, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    graph = DEFAULT_MODEL_PATH.parent / f"{file_sha256(DEFAULT_MODEL_PATH)}.onnx"
    with np.load(args.cache) as data:
        images, features = data["eval"].astype(np.float32), data["features"].astype(np.float32)
    pick = np.random.default_rng(0).choice(len(images), 256, replace=False)
    reference = _session(graph)
    ref_logits = _logits(reference, images, features)
    results: dict[str, dict[str, float]] = {"float": {"images_per_s": _rate(reference, images, features)}}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(graph), str(prepared))
        for name, options in VARIANTS.items():
            out = Path(tmp) / f"{name}.onnx"
            quantize_static(str(prepared), str(out), _Calibration(images[pick], features[pick]), **options)
            session = _session(out)
            logits = _logits(session, images, features)
            diff = np.abs(_softmax(logits) - _softmax(ref_logits))
            results[name] = {
                "images_per_s": _rate(session, images, features),
                "top1_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
                "max_abs_prob_diff": float(diff.max()),
                "mean_abs_prob_diff": float(diff.mean()),
            }
    results["float_again"] = {"images_per_s": _rate(reference, images, features)}
    for name, row in results.items():
        print(name, ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    if args.out:
        record = {"graph": graph.name, "images": len(images), **results}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
