"""Rebuild the fold artefacts of a device run of generic_folds.sh here: float16 state dicts back to
float32 ``fold-N/model.pt`` (checksums recomputed by save_artefact) beside the run's folds.json and
oof.npz, with this machine's config.yaml (its manifest and cache paths).

Usage: .venv/bin/python train/device/unpack_folds.py FILES_DIR LOCAL_RUN OUT_RUN
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
from pathlib import Path

import torch

from sorter.model.artefact import save_artefact
from sorter.model.network import build_network
from sorter.model.spec import ModelSpec


def main(files: Path, local_run: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(files / "generic.tgz") as tar:
        tar.extractall(out.parent / "_device", filter="data")
    device = out.parent / "_device" / "generic"
    for name in ("folds.json", "oof.npz", "metrics.json"):
        shutil.copy(device / name, out / name)
    shutil.copy(local_run / "config.yaml", out / "config.yaml")
    if json.loads((local_run / "folds.json").read_text()) != json.loads((out / "folds.json").read_text()):
        raise SystemExit("the device run dealt other folds than the local run")
    for half in sorted(files.glob("fold-*.f16.pt")):
        payload = torch.load(half, map_location="cpu", weights_only=True)
        spec = ModelSpec.from_dict(json.loads(payload["spec"]))
        network = build_network(spec)
        network.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        )
        save_artefact(network.eval(), spec, out / half.name.split(".")[0] / "model.pt")
        print("rebuilt", out / half.name.split(".")[0] / "model.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
