"""Cross-fitted fine-tuning of the current model's head on the archive's header labels.

Each fold's head starts from the current model's head and is fine-tuned on the other folds'
embeddings (full batch, AdamW, cross-entropy with every label weighted equally, plus a pull
towards the starting weights): labels the archive lacks keep roughly what the generic model
knew of them, and a small archive cannot drag the head far from a sensible start. The held-out
fold's logits are its out-of-fold predictions; the final head is fitted the same way on every
sampled instance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HeadRecipe:
    """How a head is fine-tuned (chosen on tests/bench/bench_adapt.py; see the README)."""

    steps: int = 300
    lr: float = 0.01
    # Weight of ||W - W0||^2 / 2, the pull towards the starting head: 0.1 against 1e-3 on
    # tests/bench/bench_adapt.py: cross-fitted MG accuracy 0.65 against 0.49, label-issue precision
    # within noise; 0.01 about the same as 0.1, 3 worse (README, Adaptation benchmark).
    anchor: float = 0.1
    label_smoothing: float = 0.05
    seed: int = 0


def fit_head(
    x: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    recipe: HeadRecipe = HeadRecipe(),
) -> tuple[np.ndarray, np.ndarray]:
    """Fine-tune a linear head (``weight`` (L, D), ``bias`` (L,)) on embeddings ``x`` (N, D) and
    label indices ``y`` (N,); returns the new weight and bias.

    Runs on one thread: the matrices are small, and torch's thread pool on a busy machine cost
    40x (25 s instead of 0.7 s for 131 instances, measured beside a training run on 2 cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_head(x, y, weight, bias, recipe)
    finally:
        torch.set_num_threads(threads)


def _fit_head(
    x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, recipe: HeadRecipe
) -> tuple[np.ndarray, np.ndarray]:
    torch.manual_seed(recipe.seed)
    w0 = torch.from_numpy(np.asarray(weight, np.float32))
    b0 = torch.from_numpy(np.asarray(bias, np.float32))
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    xs = torch.from_numpy(np.asarray(x, np.float32))
    ys = torch.from_numpy(np.asarray(y, np.int64))
    counts = torch.bincount(ys, minlength=len(w0)).float()
    # Every label present weighs the same; absent labels get no positive examples at all.
    class_weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
    opt = torch.optim.AdamW([w, b], lr=recipe.lr, weight_decay=0.0)
    for _ in range(recipe.steps):
        opt.zero_grad(set_to_none=True)
        logits = xs @ w.T + b
        loss = F.cross_entropy(logits, ys, weight=class_weight, label_smoothing=recipe.label_smoothing)
        loss = loss + recipe.anchor / 2 * ((w - w0).pow(2).sum() + (b - b0).pow(2).sum())
        loss.backward()
        opt.step()
    return w.detach().numpy(), b.detach().numpy()


def logits_of(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Logits (N, L) of a linear head."""
    return np.asarray(x, np.float32) @ np.asarray(weight, np.float32).T + np.asarray(bias, np.float32)


def cross_fit(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    recipe: HeadRecipe = HeadRecipe(),
    done: Callable[[int], np.ndarray | None] | None = None,
    save: Callable[[int, np.ndarray], None] | None = None,
    fold_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Out-of-fold logits (N, L): fold ``k``'s rows from a head fitted on every other fold.

    ``done(k)`` returns fold ``k``'s logits when an earlier run finished it (resuming), and
    ``save(k, logits)`` keeps a finished fold.
    """
    out = np.full((len(x), len(weight)), np.nan, dtype=np.float32)
    for k in fold_ids if fold_ids is not None else sorted(set(int(f) for f in folds)):
        held = folds == k
        previous = done(k) if done is not None else None
        if previous is None:
            w, b = fit_head(x[~held], y[~held], weight, bias, recipe)
            previous = logits_of(x[held], w, b)
            if save is not None:
                save(k, previous)
        out[held] = previous
    return out
