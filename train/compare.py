"""Compare leave-sources-out runs on the folds they share (``sorter-train compare``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from train.calibrate import softmax_np
from train.metrics import compute_metrics, source_macro_recall
from train.operating_point import point_for


def _load(run: Path) -> dict[str, Any]:
    data = np.load(run / "oof.npz")
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {"run": run, "config": config, **{k: data[k] for k in data.files}}


def score(
    y: list[str],
    probs: np.ndarray,
    labels: list[str],
    sources: list[str],
    temperature: float,
    point: bool = True,
    folds: np.ndarray | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Calibrated out-of-fold ``probs`` scored as every loso report scores them: the image metrics
    (:func:`compute_metrics`, with ``per_source_label`` added), the source-averaged recall (each
    source counted once per label) and, with ``point``, the operating point chosen on them (with
    the images' ``folds``, export's, and its shares cross-fitted: :func:`held_out_shares`)."""
    metrics = compute_metrics(y, probs, labels, sources)
    keyed = [f"{s}/{label}" for s, label in zip(sources, y, strict=True)]
    by_source = compute_metrics(y, probs, labels, keyed)
    metrics["per_source_label"] = by_source["per_source"]
    macro = source_macro_recall(by_source, {k: k.rsplit("/", 1)[1] for k in keyed})
    if not point:
        return metrics, macro, None
    index = {label: i for i, label in enumerate(labels)}
    targets = np.asarray([index[label] for label in y])
    return metrics, macro, point_for(probs, targets, labels, np.asarray(keyed), temperature, folds)


def held_out_shares(point: dict[str, Any]) -> dict[str, Any]:
    """The header test's shares per image and, per header label, the relabelled copies caught:
    cross-fitted where ``point`` has them (thresholds judged on folds they were not chosen on),
    else in-sample (one fold)."""
    shares = point.get("cross_fitted") or point
    return {
        **shares["images"],
        "caught_by_header": {k: v["caught"] for k, v in shares["per_label"].items()},
        "cross_fitted": "cross_fitted" in point,
    }


class LoadedRuns(NamedTuple):
    """Runs dealt the same folds, read once: each run's outputs (``held`` marks its images in
    ``common``) and the folds every run evaluated."""

    runs: list[dict[str, Any]]
    common: list[int]


def load_runs(runs: list[Path]) -> LoadedRuns:
    """Read each run's outputs; a ``ValueError`` where they were dealt other folds."""
    loaded = [_load(run) for run in runs]
    keys = [(d["config"].get("manifest"), d["config"].get("folds"), d["config"].get("seed")) for d in loaded]
    if len(set(keys)) != 1:
        each = "; ".join(
            f"{run}: manifest {m}, --folds {f}, --seed {s}" for run, (m, f, s) in zip(runs, keys, strict=True)
        )
        raise ValueError(
            f"these runs hold out different sources in each fold, so they cannot be compared ({each}); "
            "compare runs of the same manifest, --folds and --seed"
        )
    common = sorted(set.intersection(*(set(np.unique(d["folds"]).tolist()) for d in loaded)))
    for d in loaded:
        d["held"] = np.isin(d["folds"], common)
    return LoadedRuns(loaded, common)


def _loaded(runs: list[Path] | LoadedRuns) -> LoadedRuns:
    return runs if isinstance(runs, LoadedRuns) else load_runs(runs)


def compare_runs(runs: list[Path] | LoadedRuns) -> tuple[list[int], list[dict[str, Any]]]:
    """Metrics of each run restricted to the folds every run evaluated.

    Runs must come from the same manifest, fold count and seed, so that a
    fold holds out the same sources in each (paths are read by :func:`load_runs`).
    """
    loaded, common = _loaded(runs)
    rows = []
    for d in loaded:
        mask = d["held"]
        labels = [str(v) for v in d["config"]["labels"]]
        probs = softmax_np(d["logits"][mask], float(d["temperature"]))
        y, sources = [str(v) for v in d["labels"][mask]], [str(v) for v in d["sources"][mask]]
        folds = np.asarray(d["folds"])[mask]
        metrics, macro, point = score(y, probs, labels, sources, float(d["temperature"]), folds=folds)
        cfg = d["config"]
        rows.append(
            {
                "run": str(d["run"]),
                "arch": cfg["arch"],
                "input": f"{len(cfg['channels'])}x{cfg['input_size']}x{cfg['input_size']}",
                "scaling": cfg["scaling"],
                "n": metrics["n"],
                "accuracy": metrics["accuracy"],
                "balanced_accuracy": metrics["balanced_accuracy"],
                "source_balanced_accuracy": macro["balanced_accuracy"],
                "ece": metrics["ece"],
                "recall": {k: v["recall"] for k, v in metrics["per_class"].items()},
                "operating_point": held_out_shares(point),
            }
        )
    return common, rows


def compare_sources(runs: list[Path] | LoadedRuns) -> tuple[list[int], list[dict[str, Any]]]:
    """Per held-out source and label, how many images each run got right and what it said instead.

    On the folds every run evaluated (runs dealt the same folds, as :func:`compare_runs`), by the
    top label (a temperature does not move it). One row per ``(source, label)``, each with
    ``runs``: ``{"right", "n", "instead": {label: count}}`` per run, in the order given.
    """
    loaded, common = _loaded(runs)
    per_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, d in enumerate(loaded):
        mask = d["held"]
        names = np.asarray([str(v) for v in d["config"]["labels"]])
        predicted = names[d["logits"][mask].argmax(axis=1)]
        y, sources = d["labels"][mask].astype(str), d["sources"][mask].astype(str)
        for key in set(zip(sources.tolist(), y.tolist(), strict=True)):
            said = predicted[(sources == key[0]) & (y == key[1])]
            wrong, counts = np.unique(said[said != key[1]], return_counts=True)
            instead = dict(sorted(zip(wrong.tolist(), counts.tolist(), strict=True), key=lambda kv: -kv[1]))
            cell = {"right": int((said == key[1]).sum()), "n": len(said), "instead": instead}
            # A source a run could not decode is absent there: shown as 0/0, never a KeyError.
            per_key.setdefault(key, [{"right": 0, "n": 0, "instead": {}} for _ in loaded])[i] = cell
    rows = [
        {"source": source, "label": label, "runs": cells}
        for (source, label), cells in sorted(per_key.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
    return common, rows


def sources_markdown(runs: list[Path], rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`compare_sources` rows: right / n per run, and the labels said
    instead. Only the sources where the runs differ or some run errs."""
    lines = [
        "Per held-out source: images right / images, and what was said instead (by the top label).",
        "",
        "| label | source | " + " | ".join(run.name for run in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for row in rows:
        cells = row["runs"]
        if all(c["n"] and c["right"] == c["n"] for c in cells):
            continue
        shown = []
        for c in cells:
            instead = ", ".join(f"{label} {count}" for label, count in c["instead"].items())
            shown.append(f"{c['right']}/{c['n']}" + (f" ({instead})" if instead else ""))
        lines.append(f"| {row['label']} | {row['source']} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(common: list[int], rows: list[dict[str, Any]], speed: dict[str, float]) -> str:
    """A markdown table of :func:`compare_runs` rows, with CPU images/s where known."""
    labels = list(rows[0]["recall"])
    lines = [
        f"Same source-disjoint folds {common} ({rows[0]['n']} held-out images), temperature-scaled.",
        "",
        "| model | input | CPU img/s | accuracy | balanced acc. | source-balanced acc. | ECE | "
        + " | ".join(f"{label} recall" for label in labels)
        + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(labels),
    ]
    for r in rows:
        rate = speed.get(f"{r['arch']}@{r['input']}")
        shown = rate if rate is not None else "n/a"
        lines.append(
            f"| {Path(r['run']).name}: {r['arch']} ({r['scaling']}) | {r['input']} | {shown} | "
            f"{r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | {r['source_balanced_accuracy']:.3f} | "
            f"{r['ece']:.3f} | " + " | ".join(f"{r['recall'][label]:.2f}" for label in labels) + " |"
        )
    lines += [
        "",
        "Header test at each run's own operating point (train/operating_point.py, as export chooses "
        "it): right headers called agree / disagree, relabelled copies called disagree / agree, per "
        "image; "
        + (
            "cross-fitted (each fold judged by thresholds chosen on the other folds)."
            if all(r["operating_point"]["cross_fitted"] for r in rows)
            else "in-sample (chosen and scored on the same images: one fold)."
        ),
        "",
        "| model | right: agree | right: disagree | relabelled: disagree | relabelled: agree | "
        + " | ".join(f"relabelled {label}: disagree" for label in labels)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(labels),
    ]
    for r in rows:
        op = r["operating_point"]
        lines.append(
            f"| {r['run']} | {op['agree']:.3f} | {op['false_disagree']:.3f} | {op['caught']:.3f} | "
            f"{op['false_agree']:.3f} | "
            + " | ".join(f"{op['caught_by_header'][label]:.2f}" for label in labels)
            + " |"
        )
    return "\n".join(lines) + "\n"
