"""CPU inference speed per architecture and input size (images/s), eager torch or ONNX Runtime.

Run: .venv/bin/python tests/bench/bench_inference.py [--out bench-inference.json]
     .venv/bin/python tests/bench/bench_inference.py --runtime onnx --threads 1,2 --batch 64 \
         --arch mobilenet_v3_small --arch efficientnet_lite0   (2x128x128, interleaved rounds, ratios)
Prints a table and writes JSON. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sorter.domain import ALL_LABELS
from sorter.model.artefact import DEFAULT_MODEL_PATH, load_artefact
from sorter.model.network import SorterNet, build_network
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


def onnx_images_per_second(
    network: SorterNet, spec: ModelSpec, threads: int, batch: int, seconds: float
) -> float:
    """The same on ONNX Runtime (the serving CPU runtime), over the graph serving exports."""
    from sorter.model.ort import OrtSession
    from sorter.model.runtime import export_onnx

    session = OrtSession(export_onnx(network, spec), threads)
    size, channels = spec.preprocess.input_size, len(spec.preprocess.channels)
    x = np.random.default_rng(0).random((batch, channels, size, size), dtype=np.float32)
    f = np.zeros((batch, len(spec.preprocess.features)), np.float32)
    for _ in range(2):
        session(x, f)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        session(x, f)
        done += batch
    return done / (time.perf_counter() - began)


def compare_archs(args: argparse.Namespace) -> None:
    """``--arch``: the named architectures at one input size, rounds interleaved so that load from
    other work hits them alike; median images/s and the ratio to the first architecture."""
    threads = [int(t) for t in args.threads.split(",")]
    specs = {
        arch: ModelSpec(
            arch=arch,
            labels=ALL_LABELS,
            preprocess=PreprocessParams(input_size=args.input_size, channels=("scaled", "hu")),
        )
        for arch in args.arch
    }
    nets = {arch: build_network(spec).eval() for arch, spec in specs.items()}
    rates: dict[tuple[str, int], list[float]] = {(a, t): [] for a in args.arch for t in threads}
    for _ in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            for arch in args.arch:
                if args.runtime == "onnx":
                    rate = onnx_images_per_second(nets[arch], specs[arch], t, args.batch, args.seconds)
                else:
                    rate = images_per_second(nets[arch], 2, args.input_size, args.batch, args.seconds)
                rates[arch, t].append(rate)
    rows = []
    for t in threads:
        base = float(np.median(rates[args.arch[0], t]))
        for arch in args.arch:
            median = float(np.median(rates[arch, t]))
            params = sum(p.numel() for p in nets[arch].parameters())
            rows.append(
                {
                    "arch": arch,
                    "input": f"2x{args.input_size}x{args.input_size}",
                    "runtime": args.runtime,
                    "threads": t,
                    "images_per_s": round(median, 1),
                    "ratio": round(median / base, 3),
                    "params_m": round(params / 1e6, 2),
                    "note": "",
                }
            )
            print(
                f"{arch:<20} {args.runtime:<5} {t} thr {median:8.1f} img/s  x{median / base:.2f}  "
                f"{params / 1e6:.2f} M params  rounds {[round(r) for r in rates[arch, t]]}",
                flush=True,
            )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "batch": args.batch,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench-inference.json"))
    parser.add_argument("--arch", action="append", help="Compare these architectures (repeatable).")
    parser.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--threads", default="1,2", help="With --arch: comma-separated thread counts.")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="With --arch: interleaved rounds.")
    args = parser.parse_args()
    if args.arch:
        compare_archs(args)
        return
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
