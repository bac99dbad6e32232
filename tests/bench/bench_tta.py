"""Test-time augmentation on a leave-sources-out run's fold networks: does averaging each image's
logits over mirrored views help on sources never seen in training?

Run: .venv/bin/python tests/bench/bench_tta.py --main runs/eff0 --partner runs/screen0 --weight 0.4
         [--views hflip,vflip] [--out tests/bench/results-tta-2core.json]
     where ``--main`` is a finished ``sorter-train loso`` of ``train/recipes/pretrained.yaml`` and
     ``--partner`` one of ``train/recipes/screen-loso.yaml`` on the same folds (README, The default
     model: Reproduce).

Every image is predicted by the fold networks that never saw its source, on the exact serving
inputs the run was scored on (its decode cache), once as stored and once per view; a view's
logits are averaged with the stored one's. Each variant is scored as ``sorter-train ensemble``
scores a run (:func:`train.cascade.scores`: balanced, source-averaged and plain accuracy, and the
header test at its own operating point), with its temperature refitted on its own logits. The
training views include horizontal mirroring (``train/augment.py``), not vertical.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from train.calibrate import fit_temperature  # noqa: E402
from train.cascade import LosoRun, average_logits, scores  # noqa: E402
from train.config import FitConfig, load_run_config  # noqa: E402
from train.data import ImageSet  # noqa: E402
from train.fit import load_teacher  # noqa: E402
from train.runs import images_for, loso_run_argument, not_a_loso_run, select_rows  # noqa: E402

VIEWS = {"hflip": (-1,), "vflip": (-2,), "rot180": (-2, -1)}


class HeldOut(NamedTuple):
    """A finished loso run's images, decoded as it scored them, and the fold of each."""

    config: FitConfig
    images: ImageSet
    fold: np.ndarray
    stored: LosoRun

    def networks(self, run: Path) -> Iterator[tuple[np.ndarray, torch.nn.Module]]:
        """Each fold's held-out image indices and the fold network that never saw them."""
        spec = self.config.spec()
        for fold in np.unique(self.fold):
            yield (
                np.flatnonzero(self.fold == fold),
                load_teacher(run / f"fold-{fold}" / "model.pt", spec, torch.device("cpu")),
            )


def held_out(run: Path) -> HeldOut:
    """Decode ``run``'s images as it was scored (its decode cache), refusing another manifest."""
    why = not_a_loso_run(run) or (None if (run / "folds.json").is_file() else f"{run}: no folds.json")
    if why:
        raise SystemExit(why)
    config, manifest = load_run_config(run)
    images = images_for(select_rows(manifest, config), config, progress=False)
    fold_of = json.loads((run / "folds.json").read_text())
    stored = LosoRun.read(run)
    if not (np.array_equal(images.labels, stored.labels) and np.array_equal(images.sources, stored.sources)):
        raise SystemExit(f"{run}: the decoded images are not the run's (another manifest or cache?)")
    return HeldOut(config, images, np.asarray([fold_of[str(s)] for s in images.sources]), stored)


def view_logits(run: Path, views: list[str]) -> dict[str, np.ndarray]:
    """Each view's out-of-fold logits (``none`` = as stored), in the run's image order."""
    found = held_out(run)
    images, stored = found.images, found.stored
    out = {name: np.zeros((len(images), len(found.config.labels)), np.float32) for name in ["none", *views]}
    for held, network in found.networks(run):
        with torch.inference_mode():
            for start in range(0, len(held), 128):
                rows = held[start : start + 128]
                x = torch.from_numpy(images.eval[rows])
                f = torch.from_numpy(images.features[rows])
                out["none"][rows] = network(x, f).float().numpy()
                for name in views:
                    out[name][rows] = network(torch.flip(x, VIEWS[name]), f).float().numpy()
    if not np.allclose(out["none"], stored.logits, atol=1e-3):
        raise SystemExit(f"{run}: its fold networks no longer give its stored logits")
    return out


def _scored(run: LosoRun, logits: np.ndarray) -> dict[str, float]:
    temperature = float(fit_temperature(logits, label_indices_of(run)))
    return {
        "temperature": temperature,
        **scores(logits, replace(run, logits=logits, temperature=temperature)),
    }


def label_indices_of(run: LosoRun) -> np.ndarray:
    """The runs' integer targets (``labels`` in the order of the run's config)."""
    index = {str(label): i for i, label in enumerate(run.config["labels"])}
    return np.asarray([index[str(v)] for v in run.labels])


def variants(run: LosoRun, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """As stored; each view averaged with it; every view averaged."""
    found = {"none": views["none"]}
    named = [v for v in views if v != "none"]
    for name in named:
        found[name] = (views["none"] + views[name]) / 2
    if len(named) > 1:
        found["all"] = np.mean([views[v] for v in views], axis=0)
    return found


def names_in(text: str, known: Iterable[str], option: str) -> list[str]:
    """The comma-separated names of ``text``, each one of ``known``, else one line naming ``option``."""
    names, allowed = [n for n in text.split(",") if n], list(known)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"{option}: {unknown[0]} is not one of {', '.join(allowed)}")
    return names


def write_results(results: dict[str, Any], out: Path | None) -> None:
    """Print ``results`` as JSON, and write them to ``out`` when given."""
    text = json.dumps(results, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", type=loso_run_argument, required=True)
    parser.add_argument("--partner", type=loso_run_argument)
    parser.add_argument("--weight", type=float, default=0.4)
    parser.add_argument("--views", default="hflip,vflip")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    views = names_in(args.views, VIEWS, "--views")
    main_run = LosoRun.read(args.main)
    results: dict[str, Any] = {"main": str(args.main), "partner": str(args.partner), "weight": args.weight}
    main_views = variants(main_run, view_logits(args.main, views))
    results["main"] = {name: _scored(main_run, logits) for name, logits in main_views.items()}
    if args.partner:
        partner_run = LosoRun.read(args.partner)
        partner_views = variants(partner_run, view_logits(args.partner, views))
        temps = {
            name: (
                float(fit_temperature(main_views[name], label_indices_of(main_run))),
                float(fit_temperature(partner_views[name], label_indices_of(partner_run))),
            )
            for name in main_views
        }
        ensemble = {}
        for name in main_views:  # both networks see the same views
            ensemble[f"both:{name}"] = average_logits(
                main_views[name], partner_views[name], temps[name], args.weight
            )
        for name in main_views:  # only the main network does
            pair = (temps[name][0], temps["none"][1])
            ensemble[f"main:{name}"] = average_logits(
                main_views[name], partner_views["none"], pair, args.weight
            )
        results["ensemble"] = {name: _scored(main_run, logits) for name, logits in ensemble.items()}
    write_results(results, args.out)


if __name__ == "__main__":
    main()
