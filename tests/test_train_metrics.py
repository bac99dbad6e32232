"""Evaluation metrics on small hand-computed cases (ARCHITECTURE §6 contract)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sorter.domain import Label
from train.metrics import (
    compute_metrics,
    expected_calibration_error,
    format_metrics_table,
    plot_confusion,
    plot_curves,
)

LABELS = ["CT", "MR", "XR"]
CONTRACT_KEYS = {"n", "accuracy", "balanced_accuracy", "per_class", "per_source", "confusion", "ece"}


def one_hot(indices: list[int], k: int = 3, p: float = 1.0) -> np.ndarray:
    """Rows with ``p`` on the given column and the rest spread evenly."""
    out = np.full((len(indices), k), (1.0 - p) / (k - 1))
    out[np.arange(len(indices)), indices] = p
    return out


def known_case() -> dict:
    # true:  CT CT CT MR MR XR ; predicted: CT CT MR MR CT XR
    y = ["CT", "CT", "CT", "MR", "MR", "XR"]
    probs = one_hot([0, 0, 1, 1, 0, 2], p=0.8)
    return compute_metrics(y, probs, LABELS, ["a", "a", "b", "b", "b", "a"])


def test_perfect_confident_predictions() -> None:
    y = ["CT", "MR", "XR", "CT"]
    m = compute_metrics(y, one_hot([0, 1, 2, 0], p=1.0), LABELS, ["s"] * 4)
    assert set(m) == CONTRACT_KEYS
    assert m["n"] == 4
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["ece"] == pytest.approx(0.0, abs=1e-9)
    assert m["per_class"]["CT"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "auroc": 1.0, "support": 2}
    assert m["confusion"] == {"labels": LABELS, "matrix": [[2, 0, 0], [0, 1, 0], [0, 0, 1]]}


def test_known_confusion() -> None:
    m = known_case()
    assert m["confusion"]["matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # recalls: CT 2/3, MR 1/2, XR 1/1
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    ct = m["per_class"]["CT"]
    assert ct["precision"] == pytest.approx(2 / 3)
    assert ct["recall"] == pytest.approx(2 / 3)
    assert ct["f1"] == pytest.approx(2 / 3)
    assert ct["support"] == 3
    assert m["per_source"] == {
        "a": {"n": 3, "accuracy": 1.0},
        "b": {"n": 3, "accuracy": pytest.approx(1 / 3)},
    }
    # All confidences are 0.8 and accuracy is 4/6: one bin, |0.8 - 0.667|.
    assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6))


def test_auroc_none_for_absent_class_and_balanced_accuracy_over_present() -> None:
    y = ["CT", "CT", "MR", "MR"]
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    m = compute_metrics(y, probs, LABELS, ["s"] * 4)
    assert m["per_class"]["XR"]["auroc"] is None
    assert m["per_class"]["XR"]["support"] == 0
    assert m["per_class"]["CT"]["auroc"] == pytest.approx(1.0)
    # recall CT 1/2, MR 1/2; XR is absent from y_true and does not count.
    assert m["balanced_accuracy"] == pytest.approx(0.5)


def test_single_class_truth_never_crashes() -> None:
    m = compute_metrics(["MR", "MR"], one_hot([1, 0], p=0.9), LABELS, ["s", "s"])
    assert all(row["auroc"] is None for row in m["per_class"].values())
    assert m["accuracy"] == 0.5


def test_label_outside_model_is_counted_wrong() -> None:
    m = compute_metrics([Label.CT, Label.OT], one_hot([0, 0], p=0.9), LABELS, ["s", "s"])
    assert m["confusion"]["labels"] == [*LABELS, "OT"]
    assert m["per_class"]["OT"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "auroc": None, "support": 1}
    assert m["balanced_accuracy"] == pytest.approx(0.5)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(["CT"], np.ones((1, 2)) / 2, LABELS, ["s"])
    with pytest.raises(ValueError, match="sources"):
        compute_metrics(["CT"], one_hot([0]), LABELS, [])
    with pytest.raises(ValueError, match="zero samples"):
        compute_metrics([], np.zeros((0, 3)), LABELS, [])


def test_json_round_trip() -> None:
    m = known_case()
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m


def test_expected_calibration_error_by_hand() -> None:
    # Bin (0.6, 0.667]: conf 0.65 x2, one right -> |0.5 - 0.65| * 2/4
    # Bin (0.933, 1]:   conf 1.0 x2, both right -> 0
    ece = expected_calibration_error([0.65, 0.65, 1.0, 1.0], [True, False, True, True])
    assert ece == pytest.approx(0.15 * 0.5)
    assert expected_calibration_error([], []) == 0.0
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True, False])


def test_format_metrics_table() -> None:
    table = format_metrics_table(known_case())
    lines = table.splitlines()
    assert lines[0].split() == ["label", "precision", "recall", "f1", "auroc", "support"]
    assert any(line.startswith("CT") and line.split()[-1] == "3" for line in lines)
    assert "balanced accuracy" in table and "0.722" in table
    assert "ECE" in table


def test_plots_written(tmp_path: Path) -> None:
    confusion = tmp_path / "plots" / "confusion.png"
    plot_confusion(known_case(), confusion)
    assert confusion.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert confusion.stat().st_size > 1000

    history = [
        {
            "epoch": 1,
            "train_loss": 1.2,
            "val_loss": 1.0,
            "val_accuracy": 0.5,
            "val_balanced_accuracy": 0.4,
            "lr": 1e-3,
        },
        {
            "epoch": 2,
            "train_loss": 0.8,
            "val_loss": 0.9,
            "val_accuracy": 0.6,
            "val_balanced_accuracy": 0.55,
            "lr": 5e-4,
        },
    ]
    curves = tmp_path / "curves.png"
    plot_curves(history, curves)
    assert curves.stat().st_size > 1000

    no_val = tmp_path / "curves_train_only.png"
    plot_curves([{"epoch": 1, "train_loss": 1.0, "lr": 1e-3}, {"epoch": 2, "train_loss": 0.7}], no_val)
    assert no_val.stat().st_size > 1000
