"""Leave-sources-out cross-validation: accuracy on archives the model has never seen.

Every source is held out exactly once; the network of that fold never saw a
single image of it. ``--folds 0`` is strict leave-one-source-out (one network
per source); ``--folds K`` deals sources into K folds to bound the cost. The
out-of-fold logits also calibrate the final model's temperature, on sources
it was not fitted to.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sorter.errors import ConfigError
from sorter.model.artefact import save_artefact
from train.calibrate import fit_temperature, softmax_np
from train.compare import score
from train.config import FitConfig, save_config
from train.fit import evaluate_logits, fit, predict_logits
from train.runs import images_for, label_indices, select_rows, write_report
from train.splits import assign_folds

log = logging.getLogger(__name__)


def per_label_summary(metrics: dict[str, Any], images_sources: dict[str, set[str]]) -> dict[str, Any]:
    """Recall per label (the per-label balanced-accuracy component) and its source count."""
    return {
        label: {
            "recall": row["recall"],
            "support": row["support"],
            "sources": len(images_sources.get(label, ())),
        }
        for label, row in metrics["per_class"].items()
    }


def _fold_teacher(config: FitConfig, fold_of: dict[str, int], fold: int) -> Path | None:
    """The teacher of one fold: ``config.teacher`` itself, or that loso run's network of this fold,
    which never saw this fold's sources either."""
    if not config.teacher or not Path(config.teacher).is_dir():
        return Path(config.teacher) if config.teacher else None
    run = Path(config.teacher)
    if json.loads((run / "folds.json").read_text()) != fold_of:
        raise ValueError(f"teacher run {run} dealt other folds (manifest, folds and seed must match)")
    return run / f"fold-{fold}" / "model.pt"


def run_loso(
    manifest: Path,
    config: FitConfig,
    out_dir: Path,
    folds: int,
    only_folds: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one network per fold, predict its held-out sources, and report.

    Fold outputs (``fold-N.npz``) are kept, so an interrupted run resumes at
    the first unfinished fold.
    """
    if folds == 1 or folds < 0:
        raise ConfigError(f"--folds must be 0 (one fold per source) or at least 2, not {folds}")
    rows = select_rows(manifest, config)
    fold_of = assign_folds(rows, folds, config.seed)
    n_folds = max(fold_of.values()) + 1
    outside = sorted({f for f in only_folds or () if not 0 <= f < n_folds})
    if outside:  # checked before hours of decoding: a fold nobody trains scores nothing
        raise ConfigError(f"--only-fold {outside[0]}: this run has folds 0 to {n_folds - 1}")
    out_dir.mkdir(parents=True, exist_ok=True)
    images = images_for(rows, config, progress=progress)
    save_config(config, out_dir / "config.yaml", manifest=str(manifest), folds=folds)
    (out_dir / "folds.json").write_text(json.dumps(fold_of, indent=1, sort_keys=True))
    image_fold = np.asarray([fold_of[str(s)] for s in images.sources])
    spec = config.spec()
    wanted = only_folds if only_folds is not None else list(range(n_folds))
    logits = np.full((len(images), len(spec.labels)), np.nan, dtype=np.float32)
    for fold in tqdm(wanted, desc="folds", unit="fold", disable=not progress):
        held = image_fold == fold
        if not held.any():
            continue
        fold_file = out_dir / f"fold-{fold}.npz"
        if fold_file.exists():
            logits[held] = np.load(fold_file)["logits"]
            continue
        network, history = fit(
            config,
            images.subset(~held),
            None,
            out_dir / f"fold-{fold}",
            progress=progress,
            teacher_path=_fold_teacher(config, fold_of, fold),
        )
        fold_logits = predict_logits(network, images.subset(held))
        # The fold's network stays, as an artefact: a distilled student's fold learns from it.
        save_artefact(network, spec, out_dir / f"fold-{fold}" / "model.pt")
        np.savez(fold_file, logits=fold_logits)
        (out_dir / f"fold-{fold}" / "checkpoint.pt").unlink(missing_ok=True)
        (out_dir / f"fold-{fold}" / "history.json").write_text(json.dumps(history, indent=1))
        logits[held] = fold_logits
    done = ~np.isnan(logits).any(axis=1)
    evaluated = images.subset(done)
    labels = [label.value for label in spec.labels]
    temperature = fit_temperature(logits[done], label_indices(evaluated, spec))
    raw = evaluate_logits(logits[done], evaluated, labels)
    # Scored as every loso report is (sorter-train compare, the benchmarks): sources spanning
    # several labels (one collection with CT, MR and PT) count once per label.
    metrics, macro, _ = score(
        [str(v) for v in evaluated.labels],
        softmax_np(logits[done], temperature),
        labels,
        [str(v) for v in evaluated.sources],
        temperature,
        point=False,
    )
    sources: dict[str, set[str]] = {}
    for label, source in zip(evaluated.labels, evaluated.sources, strict=True):
        sources.setdefault(str(label), set()).add(str(source))
    metrics.update(
        temperature=temperature,
        ece_uncalibrated=raw["ece"],
        folds=n_folds,
        folds_evaluated=sorted(int(f) for f in wanted),
        per_label=per_label_summary(metrics, sources),
        source_macro=macro,
        protocol=(
            "leave-one-source-out" if folds <= 0 else f"leave-sources-out, {n_folds} source-disjoint folds"
        ),
    )
    write_report(metrics, out_dir)
    np.savez(
        out_dir / "oof.npz",
        logits=logits[done],
        labels=evaluated.labels,
        sources=evaluated.sources,
        folds=image_fold[done],
        temperature=temperature,
    )
    return metrics
