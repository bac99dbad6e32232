"""An adaptation on arrays: cross-fitted heads, calibration, confident learning, the final head.

Shared by ``sorter adapt`` (instances of a results database or a manifest) and
``tests/bench/bench_adapt.py`` (corpus folds), so that the benchmark measures the command's
own method.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sorter.adaptation.crossfit import HeadRecipe, cross_fit, fit_head
from sorter.adaptation.scoring import Issues, label_issues
from sorter.domain import Thresholds
from sorter.model.network import SorterNet
from sorter.model.spec import ModelSpec


@dataclass
class Result:
    """What an adaptation found and made."""

    oof_logits: np.ndarray  # (N, L) out-of-fold logits
    oof_probs: np.ndarray  # (N, L) calibrated
    temperature: float
    issues: Issues
    weight: np.ndarray  # the final head
    bias: np.ndarray
    thresholds: Thresholds


def operating_point(
    probs: np.ndarray, y: np.ndarray, labels: Sequence[str], folds: np.ndarray | None = None
) -> Thresholds:
    """The header test's thresholds chosen on out-of-fold probabilities, the way the bundled
    model's are chosen on leave-sources-out ones (``train/operating_point.py``): with ``folds``,
    every ``disagree_at`` shrunk until thresholds chosen on all folds but one keep the budget on
    that fold's right headers (``choose_held_out``)."""
    from train.operating_point import as_thresholds, choose, choose_emission, choose_held_out

    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    if folds is None:
        agree_at, disagree_at = choose(probs, y)
    else:
        agree_at, disagree_at, _ = choose_held_out(probs, y, np.asarray(folds))
    return as_thresholds(labels, agree_at, disagree_at, choose_emission(probs, y, labels))


def adapt_arrays(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    network: SorterNet,
    labels: Sequence[str],
    recipe: HeadRecipe | None = None,
    done: Callable[[int], np.ndarray | None] | None = None,
    save: Callable[[int, np.ndarray], None] | None = None,
) -> Result:
    """Cross-fit heads on embeddings ``x`` with header label indices ``y`` over ``folds``, score
    label issues, and fit the final head on everything (see :mod:`sorter.adaptation`)."""
    from train.calibrate import fit_temperature, softmax_np

    weight = network.head.weight.detach().cpu().numpy()
    bias = network.head.bias.detach().cpu().numpy()
    recipe = recipe or HeadRecipe()
    oof = cross_fit(x, y, folds, weight, bias, recipe, done=done, save=save)
    temperature = float(fit_temperature(oof, y))
    probs = softmax_np(oof, temperature).astype(np.float32)
    issues = label_issues(y, probs)
    final_w, final_b = fit_head(x, y, weight, bias, recipe)
    point = operating_point(probs, y, labels, folds)
    return Result(oof, probs, temperature, issues, final_w, final_b, point)


def adapted_network(network: SorterNet, result: Result) -> SorterNet:
    """A copy of ``network`` with the adapted head.

    A cascade's screen or an ensemble's partner is left out: its answers would stand in place of,
    or be averaged with, the adapted head's, which is what the archive taught (the adapted model
    is the main network alone).
    """
    import torch

    from sorter.model.network import SorterNet

    if type(network) is not SorterNet:
        network = SorterNet(
            network.backbone,
            network.head.in_features - network.n_features,
            network.n_features,
            network.head.out_features,
        )
    adapted = copy.deepcopy(network).cpu().eval()
    with torch.no_grad():
        adapted.head.weight.copy_(torch.from_numpy(result.weight))
        adapted.head.bias.copy_(torch.from_numpy(result.bias))
    return adapted


def adapted_spec(
    base: ModelSpec, result: Result, training: dict[str, Any], metrics: dict[str, Any]
) -> ModelSpec:
    """The adapted model's spec: the base's inputs, its own temperature, operating point and card."""
    return replace(
        base,
        screen=None,  # see adapted_network
        partner=None,
        temperature=result.temperature,
        thresholds=replace(
            result.thresholds,
            min_confidence=base.thresholds.min_confidence,
            min_margin=base.thresholds.min_margin,
        ),
        training=training,
        metrics=metrics,
    )


def crossfit_metrics(
    y: np.ndarray, probs: np.ndarray, labels: Sequence[str], sources: Sequence[str], issues: Issues
) -> dict[str, Any]:
    """Cross-fitted accuracy (against the header labels) overall, per label and per source, and
    the label issues found per label."""
    pred = probs.argmax(axis=1)
    right = pred == y
    per_label: dict[str, dict[str, Any]] = {}
    for i, label in enumerate(labels):
        mask = y == i
        if mask.any():
            per_label[label] = {
                "n": int(mask.sum()),
                "accuracy": float(right[mask].mean()),
                "label_issues": int(issues.is_issue[mask].sum()),
            }
    by_source: dict[str, list[bool]] = defaultdict(list)
    for source, ok in zip(sources, right, strict=True):
        by_source[source].append(bool(ok))
    return {
        "n": len(y),
        "accuracy": float(right.mean()) if len(y) else float("nan"),
        "balanced_accuracy": float(np.mean([row["accuracy"] for row in per_label.values()]))
        if per_label
        else float("nan"),
        "per_label": per_label,
        "per_source": {s: {"n": len(v), "accuracy": float(np.mean(v))} for s, v in sorted(by_source.items())},
        "label_issues": int(issues.is_issue.sum()),
        "predicted": dict(Counter(labels[i] for i in pred)),
    }
