"""Evaluation metrics, plots and a text report (the ARCHITECTURE §6 ``metrics.json`` contract).

Everything returned by :func:`compute_metrics` is plain Python (``int``, ``float``,
``None``, ``str``, ``list``, ``dict``) so that ``json.dumps`` works without a custom
encoder. Plots use matplotlib's object-oriented API on an explicit Agg canvas, which
never touches pyplot's global figure registry or the user's interactive backend.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score


def _text(value: object) -> str:
    """Label text for a plain string or a :class:`~sorter.domain.Label` member."""
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def expected_calibration_error(confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> float:
    """Expected calibration error over equal-width confidence bins.

    Parameters
    ----------
    confidences
        Top-1 probability of each prediction, in ``[0, 1]``.
    correct
        Whether each prediction was right (booleans or 0/1).
    n_bins
        Number of equal-width bins on ``[0, 1]``; bin ``m`` holds ``((m-1)/M, m/M]``
        (the first bin also holds 0), as in Guo et al. (2017).

    Returns
    -------
    float
        ``sum_b |B_b|/n * |accuracy(B_b) - mean confidence(B_b)|``; 0.0 for no samples.
    """
    conf = np.asarray(confidences, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"confidences ({conf.size}) and correct ({hit.size}) differ in length")
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    if conf.size == 0:
        return 0.0
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count:
            ece += count / conf.size * abs(float(hit[in_bin].mean()) - float(conf[in_bin].mean()))
    return float(ece)


def compute_metrics(
    y_true: Sequence[str], probs: np.ndarray, labels: Sequence[str], sources: Sequence[str]
) -> dict[str, Any]:
    """Score predicted probabilities against true labels.

    Parameters
    ----------
    y_true
        True label of each sample (strings or ``Label`` members).
    probs
        ``(n, len(labels))`` probabilities, rows summing to 1, columns in ``labels`` order.
        The prediction is the arg-max column.
    labels
        The model's labels, in output order.
    sources
        Source (site, scanner, collection) of each sample, for ``per_source``.

    Returns
    -------
    dict
        ``n, accuracy, balanced_accuracy, per_class{label:{precision, recall, f1, auroc,
        support}}, per_source{source:{n, accuracy}}, confusion{labels, matrix}, ece``.
        Balanced accuracy is the mean recall over labels present in ``y_true``. AUROC is
        one-vs-rest and ``None`` when ``y_true`` has no positives or no negatives for the
        class. True labels the model cannot emit are appended to the class list (after
        ``labels``), always counted wrong, with ``auroc`` ``None``.

    Raises
    ------
    ValueError
        On no samples, mismatched lengths, duplicate labels or a ``probs`` shape that does
        not match.
    """
    model_labels = [_text(label) for label in labels]
    truth = np.array([_text(y) for y in y_true], dtype=object)
    src = [str(s) for s in sources]
    p = np.asarray(probs, dtype=np.float64)
    n = len(truth)
    if n == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if len(set(model_labels)) != len(model_labels):
        raise ValueError(f"duplicate labels: {model_labels}")
    if p.shape != (n, len(model_labels)):
        raise ValueError(f"probs has shape {p.shape}, expected {(n, len(model_labels))}")
    if len(src) != n:
        raise ValueError(f"{len(src)} sources for {n} samples")

    all_labels = model_labels + sorted(set(truth.tolist()) - set(model_labels))
    y_pred = np.array(model_labels, dtype=object)[p.argmax(axis=1)]
    correct = truth == y_pred
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, y_pred, labels=all_labels, average=None, zero_division=0.0
    )
    per_class: dict[str, dict[str, Any]] = {}
    for k, label in enumerate(all_labels):
        positives = truth == label
        auroc = None
        if k < len(model_labels) and 0 < int(positives.sum()) < n:
            auroc = float(roc_auc_score(positives, p[:, k]))
        per_class[label] = {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "auroc": auroc,
            "support": int(support[k]),
        }
    present = [float(recall[k]) for k in range(len(all_labels)) if support[k] > 0]

    per_source: dict[str, dict[str, Any]] = {}
    src_arr = np.array(src, dtype=object)
    for source in sorted(set(src)):
        mask = src_arr == source
        per_source[source] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean())}

    matrix = confusion_matrix(truth, y_pred, labels=all_labels)
    return {
        "n": int(n),
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(np.mean(present)),
        "per_class": per_class,
        "per_source": per_source,
        "confusion": {"labels": list(all_labels), "matrix": [[int(c) for c in row] for row in matrix]},
        "ece": expected_calibration_error(p.max(axis=1), correct),
    }


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attach an Agg canvas explicitly; no pyplot state
    return fig


def plot_confusion(metrics: dict[str, Any], path: Path) -> None:
    """Write the confusion matrix as a PNG: counts annotated, colour = row-normalised rate.

    Parameters
    ----------
    metrics
        A dict from :func:`compute_metrics` (only ``confusion`` and the headline numbers are read).
    path
        Output PNG; parent folders are created.
    """
    labels = list(metrics["confusion"]["labels"])
    counts = np.asarray(metrics["confusion"]["matrix"], dtype=np.int64).reshape(len(labels), len(labels))
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    side = max(4.0, 0.7 * len(labels) + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ax.set_xticks(range(len(labels)), labels=labels)
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=9)
    acc, bal = metrics.get("accuracy"), metrics.get("balanced_accuracy")
    if acc is not None and bal is not None:
        ax.set_title(f"n={metrics.get('n', int(counts.sum()))}  acc={acc:.3f}  bal.acc={bal:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _series(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is not None and math.isfinite(float(value)):
            xs.append(float(row.get("epoch", i + 1)))
            ys.append(float(value))
    return xs, ys


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Write training curves (loss, accuracy, learning rate) as a PNG.

    Parameters
    ----------
    history
        One dict per epoch, e.g. ``{"epoch", "train_loss", "val_loss", "val_accuracy",
        "val_balanced_accuracy", "lr"}``; missing or ``None`` values are left out, so a
        run without a validation set plots only what it has.
    path
        Output PNG; parent folders are created.
    """
    panels = {
        "loss": ["train_loss", "val_loss"],
        "accuracy": ["train_accuracy", "val_accuracy", "val_balanced_accuracy"],
        "learning rate": ["lr"],
    }
    fig = _new_figure(13.0, 4.0)
    axes = fig.subplots(1, len(panels))
    for ax, (title, keys) in zip(axes, panels.items(), strict=True):
        drawn = False
        for key in keys:
            xs, ys = _series(history, key)
            if ys:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        if title == "learning rate" and all(y > 0 for y in _series(history, "lr")[1]):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """Render metrics as a fixed-width text table.

    Parameters
    ----------
    metrics
        A dict from :func:`compute_metrics`.

    Returns
    -------
    str
        Per-class precision, recall, F1, AUROC and support, then n, accuracy, balanced
        accuracy and ECE.
    """
    width = max([5, *(len(label) for label in metrics["per_class"])])
    header = f"{'label':<{width}}  {'precision':>9}  {'recall':>6}  {'f1':>5}  {'auroc':>5}  {'support':>7}"
    lines = [header, "-" * len(header)]
    for label, row in metrics["per_class"].items():
        lines.append(
            f"{label:<{width}}  {_fmt(row['precision']):>9}  {_fmt(row['recall']):>6}  "
            f"{_fmt(row['f1']):>5}  {_fmt(row['auroc']):>5}  {row['support']:>7d}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'n':<18}{metrics['n']:>7d}")
    lines.append(f"{'accuracy':<18}{_fmt(metrics['accuracy']):>7}")
    lines.append(f"{'balanced accuracy':<18}{_fmt(metrics['balanced_accuracy']):>7}")
    lines.append(f"{'ECE (15 bins)':<18}{_fmt(metrics['ece']):>7}")
    return "\n".join(lines)


def source_macro_recall(metrics: dict[str, Any], labels_by_source: dict[str, str]) -> dict[str, Any]:
    """Recall per label averaged over sources instead of images, and its mean over labels.

    Per-image metrics let one 180-slice source outweigh twenty radiograph
    collections; averaging each label's per-source accuracy asks instead "on
    a new archive of this modality, how often are we right?".

    Parameters
    ----------
    metrics
        Output of :func:`compute_metrics` (its ``per_source`` accuracies are used).
    labels_by_source
        The label of each source (a source with several labels should be split
        into ``source/label`` keys before calling).

    Returns
    -------
    dict
        ``{"per_label": {label: {"recall": r, "sources": n}}, "balanced_accuracy": mean}``.
    """
    grouped: dict[str, list[float]] = {}
    for source, row in metrics["per_source"].items():
        if source in labels_by_source:
            grouped.setdefault(labels_by_source[source], []).append(float(row["accuracy"]))
    per_label = {
        label: {"recall": float(np.mean(values)), "sources": len(values)}
        for label, values in sorted(grouped.items())
    }
    mean = float(np.mean([v["recall"] for v in per_label.values()])) if per_label else 0.0
    return {"per_label": per_label, "balanced_accuracy": mean}
