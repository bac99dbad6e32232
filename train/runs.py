"""Steps shared by the ``sorter-train`` commands: rows, images, artefacts, reports."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sorter.errors import SorterError
from sorter.model.artefact import file_sha256, read_spec
from sorter.model.spec import ModelSpec, PreprocessParams
from train.config import FitConfig
from train.data import DecodeOptions, ImageSet, load_image_set
from train.manifest import ManifestRow, read_manifest
from train.metrics import format_metrics_table, plot_confusion

log = logging.getLogger(__name__)


def select_rows(manifest: Path | Sequence[Path], config: FitConfig) -> list[ManifestRow]:
    """Manifest rows with a configured label, thinned to ``limit_per_label`` for smoke runs.

    ``manifest`` may be several manifests (a corpus and ``sorter export --reviewed``): their
    rows are read in order, each path against its own manifest's folder.

    Thinning keeps evenly spaced rows of each label's group-sorted list, so a
    small run still sees many sources.
    """
    paths = [manifest] if isinstance(manifest, Path) else list(manifest)
    rows = [row for path in paths for row in read_manifest(path) if str(row.label) in config.labels]
    if not config.limit_per_label:
        return rows
    by_label: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_label[str(row.label)].append(row)
    kept: list[ManifestRow] = []
    for items in by_label.values():
        items.sort(key=lambda r: (r.source, r.group, str(r.path)))
        step = max(1, len(items) // config.limit_per_label)
        kept.extend(items[::step][: config.limit_per_label])
    return kept


class NoImagesError(SorterError):
    """Not one file of a manifest could be decoded: nothing to train or evaluate on."""


def images_for(
    rows: Sequence[ManifestRow],
    config: FitConfig,
    params: PreprocessParams | None = None,
    progress: bool = True,
) -> ImageSet:
    """Decode ``rows`` for ``config`` (cached), reporting failures."""
    params = params or config.preprocess()
    options = DecodeOptions(config.max_frames, config.axial_slices, config.reformat_slices)
    cache = Path(config.cache_dir) if config.cache_dir else None
    images = load_image_set(rows, params, config.cache_size, options, cache, config.workers, progress)
    if rows and not len(images):
        path, reason = images.failures[0] if len(images.failures) else (str(rows[0].path), "no image")
        raise NoImagesError(
            f"none of the {len(rows)} files the manifest names gave an image (the first, {path}: "
            f"{reason}); a manifest's paths are relative to its own folder"
        )
    if len(images.failures):
        log.warning("%d of %d files could not be decoded", len(images.failures), len(rows))
    return images


def training_summary(images: ImageSet, config: FitConfig, manifest: Path | Sequence[Path]) -> dict[str, Any]:
    """What the model was trained on, for the artefact and the model card."""
    sources: dict[str, set[str]] = defaultdict(set)
    for label, source in zip(images.labels, images.sources, strict=True):
        sources[str(label)].add(str(source))
    return {
        "manifest": str(manifest) if isinstance(manifest, Path) else ", ".join(map(str, manifest)),
        "images_per_label": dict(sorted(Counter(str(v) for v in images.labels).items())),
        "files": len(np.unique(images.rows)),
        "sources_per_label": {k: sorted(v) for k, v in sorted(sources.items())},
        "decode_failures": len(images.failures),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()},
        **({"teacher": teacher_record(Path(config.teacher), config)} if config.teacher else {}),
    }


def teacher_record(path: Path, config: FitConfig) -> dict[str, Any]:
    """What a distilled model learned from, for its card (a loso run's folds are not recorded)."""
    if path.is_dir():
        return {"loso_run": str(path)}
    spec, _, _ = read_spec(path)
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "arch": spec.arch,
        "pretrained": spec.training.get("pretrained"),
        "distill_weight": config.distill_weight,
        "distill_temperature": config.distill_temperature,
    }


def write_report(metrics: dict[str, Any], out_dir: Path, name: str = "metrics") -> None:
    """``metrics.json``, ``confusion.png`` and a text table under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    plot_confusion(metrics, out_dir / ("confusion.png" if name == "metrics" else f"{name}-confusion.png"))
    (out_dir / f"{name}.txt").write_text(format_metrics_table(metrics) + "\n")


#: What every finished ``sorter-train loso`` run holds.
LOSO_RUN_FILES = ("config.yaml", "metrics.json", "oof.npz")


def not_a_loso_run(path: Path) -> str | None:
    """Why ``path`` is not a finished ``sorter-train loso`` run (one line), or None when it is."""
    if not path.is_dir():
        return f"{path} is not a finished `sorter-train loso` run (no such folder)"
    missing = [name for name in LOSO_RUN_FILES if not (path / name).is_file()]
    if missing:
        return f"{path} is not a finished `sorter-train loso` run (no {', '.join(missing)})"
    return None


def loso_run_argument(text: str) -> Path:
    """An ``argparse`` type for the benchmarks: a finished loso run, else one line, no traceback."""
    why = not_a_loso_run(Path(text))
    if why:
        raise argparse.ArgumentTypeError(why)
    return Path(text)


def label_indices(images: ImageSet, spec: ModelSpec) -> np.ndarray:
    """Integer targets of ``images`` in the order of ``spec.labels``."""
    order = {label.value: i for i, label in enumerate(spec.labels)}
    return np.asarray([order[str(v)] for v in images.labels], dtype=np.int64)
