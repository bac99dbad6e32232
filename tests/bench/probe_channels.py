"""Which input channel a fold's network reads a held-out source by: one channel blanked at a time.

For each held-out image of SOURCES in fold FOLD of RUN (a ``sorter-train loso`` run, fold models
kept), the fold's network predicts the serving input as it is, then with each channel set to 0
and to 0.5 everywhere. A source still called its label with the ``scaled`` channel blanked is read
by its values in the ``hu`` channel (Hounsfield units), and the other way round. This is how the
README found why ``spect_sim`` turned the sarcoma CT into US (``--run runs/eff-sim-0 --fold 4
--sources tcia_sts_ibsi``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from sorter.model.artefact import load_artefact
from train.config import load_run_config
from train.runs import images_for, loso_run_argument, select_rows


def probe(run: Path, fold: int, sources: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """``{variant: {"source/label": {predicted label: images}}}`` for the fold's held-out ``sources``."""
    config, manifest = load_run_config(run)
    rows = [row for row in select_rows(manifest, config) if row.source in sources]
    if not rows:
        raise SystemExit(f"error: no image of {', '.join(sources)} in {manifest}")
    model = run / f"fold-{fold}" / "model.pt"
    if not model.exists():
        raise SystemExit(f"error: {model} is missing: fold {fold} of this run was not trained")
    images = images_for(rows, config, progress=False)
    loaded = load_artefact(model)
    network = loaded.network.eval()
    labels = [label.value for label in loaded.spec.labels]
    x, f = torch.from_numpy(images.eval), torch.from_numpy(images.features)
    variants = {"as is": x}
    for index, name in enumerate(loaded.spec.preprocess.channels):
        for value in (0.0, 0.5):
            blanked = x.clone()
            blanked[:, index] = value
            variants[f"{name}={value:g}"] = blanked
    keys = np.asarray(
        [f"{source}/{label}" for source, label in zip(images.sources, images.labels, strict=True)]
    )
    found: dict[str, dict[str, dict[str, int]]] = {}
    for variant, inputs in variants.items():
        with torch.inference_mode():
            said = network(inputs, f).argmax(1).numpy()
        found[variant] = {
            key: dict(Counter(labels[i] for i in said[keys == key]).most_common())
            for key in sorted(set(keys))
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=loso_run_argument, required=True, help="a sorter-train loso run")
    parser.add_argument("--fold", type=int, required=True, help="the fold that holds the sources out")
    parser.add_argument("--sources", required=True, help="comma-separated manifest sources")
    parser.add_argument("--out", type=Path, help="also write the counts here (JSON)")
    args = parser.parse_args()
    found = probe(args.run, args.fold, [s for s in args.sources.split(",") if s])
    for variant, by_key in found.items():
        for key, counts in by_key.items():
            print(f"{variant:10s} {key}: {counts}")
    if args.out:
        args.out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
