"""CPU inference speed per architecture and input size (images/s), eager torch.

Run: .venv/bin/python tests/bench/bench_inference.py [--out bench-inference.json]
Prints a table and writes JSON. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from sorter.domain import ALL_LABELS
from sorter.model.artefact import DEFAULT_MODEL_PATH, load_artefact
from sorter.model.network import build_network
from sorter.model.spec import ModelSpec, PreprocessParams


def images_per_second(
    network: torch.nn.Module, channels: int, size: int, batch: int, seconds: float
) -> float:
    """Steady-state forward passes per second on random input, after a warm-up."""
    x = torch.rand(batch, channels, size, size)
    f = torch.rand(batch, 1)
    network.eval()
    with torch.inference_mode():
        for _ in range(2):
            network(x, f)
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            network(x, f)
            done += batch
        return done / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench-inference.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cases = [("resnet18", 224, 1, "the paper's ResNet-18, 1x224x224")]
    if DEFAULT_MODEL_PATH.exists():
        spec = load_artefact().spec
        cases.append(
            (spec.arch, spec.preprocess.input_size, len(spec.preprocess.channels), "bundled default")
        )
    cases += [("resnet18", 128, 2, ""), ("mobilenet_v3_small", 128, 2, ""), ("efficientnet_b0", 128, 2, "")]
    rows = []
    for arch, size, channels, note in cases:
        names = ("scaled", "hu")[:channels]
        spec = ModelSpec(
            arch=arch, labels=ALL_LABELS, preprocess=PreprocessParams(input_size=size, channels=names)
        )
        rate = images_per_second(build_network(spec), channels, size, args.batch, args.seconds)
        rows.append(
            {"arch": arch, "input": f"{channels}x{size}x{size}", "images_per_s": round(rate, 1), "note": note}
        )
        print(f"{arch:<20} {channels}x{size:<4} {rate:8.1f} img/s  {note}", flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "batch": args.batch,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
