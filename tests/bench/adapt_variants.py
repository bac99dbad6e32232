"""Variants of ``sorter adapt`` measured by ``bench_adapt.py`` and not shipped (README, Adaptation
benchmark): a nearest-neighbour opinion beside the fine-tuned head (``--knn``), cross-fitting
by source instead of by study (``--fold-by source``), and how each opinion ranks the archive's
sources (does the systematic source stand out from the honest ones?).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from sorter.adaptation.core import Result, operating_point
from sorter.adaptation.sample import Candidate, assign_folds
from sorter.adaptation.scoring import label_issues

#: Softmax temperature over cosine similarities: the nearest neighbours weigh most.
KNN_TAU = 0.1
#: Share of a flat prior over the labels the other folds hold, mixed into the neighbours' vote, so
#: that none of them is exactly 0 (a label no other fold holds stays 0).
KNN_PRIOR = 0.1


def knn_probs(x: np.ndarray, y: np.ndarray, folds: np.ndarray, n_labels: int, k: int) -> np.ndarray:
    """Out-of-fold k-nearest-neighbour probabilities (N, L): each instance's ``k`` most
    cosine-similar embeddings in the other folds vote with their header labels, weighted by
    ``exp(similarity / KNN_TAU)`` and by one over their label's count (every label equally
    likely, as the head's loss weighs them)."""
    z = np.asarray(x, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    y = np.asarray(y)
    out = np.zeros((len(z), n_labels))
    for fold in np.unique(folds):
        held = folds == fold
        train_y = y[~held]
        counts = np.bincount(train_y, minlength=n_labels).astype(float)
        inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
        prior = (counts > 0) / max(int((counts > 0).sum()), 1)
        sims = z[held] @ z[~held].T
        kk = min(k, len(train_y))
        nearest = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        for row, neighbours, s in zip(np.flatnonzero(held), nearest, sims, strict=True):
            weight = np.exp((s[neighbours] - s[neighbours].max()) / KNN_TAU) * inverse[train_y[neighbours]]
            vote = np.bincount(train_y[neighbours], weights=weight, minlength=n_labels)
            out[row] = (1 - KNN_PRIOR) * vote / vote.sum() + KNN_PRIOR * prior
    return out.astype(np.float32)


def with_knn(
    result: Result,
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    labels: list[str],
    k: int,
    weight: float,
) -> Result:
    """``result`` with its out-of-fold probabilities mixed with :func:`knn_probs` (``weight`` of
    them; 1 = the neighbours alone), its label issues and operating point recomputed on the mix.
    The final head is left as it is (series not sampled are still judged by it)."""
    mixed = (1 - weight) * result.oof_probs + weight * knn_probs(x, y, folds, len(labels), k)
    mixed = (mixed / mixed.sum(axis=1, keepdims=True)).astype(np.float32)
    return replace(
        result,
        oof_probs=mixed,
        issues=label_issues(y, mixed),
        thresholds=operating_point(mixed, y, labels, folds),
    )


def source_folds(chosen: Sequence[Candidate], folds: int, seed: int) -> dict[str, int]:
    """Fold of every study in ``chosen`` with whole sources held out together: the sampler's
    fold assignment (:func:`assign_folds`) applied to sources as if each were one study. A
    study that spans two sources is refused (it could not keep to one fold)."""
    source_of: dict[str, str] = {}
    for c in chosen:
        if source_of.setdefault(c.study, c.source) != c.source:
            raise ValueError(f"study {c.study} spans sources {source_of[c.study]} and {c.source}")
    as_studies = [replace(c, study=c.source) for c in chosen]
    by_source = assign_folds(as_studies, min(folds, len({c.source for c in chosen})), seed)
    return {c.study: by_source[c.source] for c in chosen}


def source_rows(
    adapted_evidence: np.ndarray,
    chosen: Sequence[Candidate],
    generic_evidence: np.ndarray,
    source_of: np.ndarray,
    systematic_source: str,
    sporadic: set[str],
    min_instances: int,
) -> list[dict[str, Any]]:
    """One row per sampled source with at least ``min_instances`` images in the archive: its
    kind (``systematic``; ``touched``, holding a sporadic series; else ``honest``), the mean
    out-of-fold adapted evidence for the header over its sampled instances and the mean generic
    evidence over all its images (:func:`bench_adapt.image_evidence`, raw: no verdict counted)."""
    sampled_source = np.asarray([c.source for c in chosen])
    rows = []
    for source in sorted(set(sampled_source.tolist())):
        mask = sampled_source == source
        in_archive = source_of == source
        if in_archive.sum() < min_instances:
            continue
        series = {c.series for c, m in zip(chosen, mask, strict=True) if m}
        kind = "systematic" if source == systematic_source else "touched" if series & sporadic else "honest"
        rows.append(
            {
                "kind": kind,
                "adapted": float(adapted_evidence[mask].mean()),
                "generic": float(generic_evidence[in_archive].mean()),
            }
        )
    return rows


def source_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How well each source-level evidence (``adapted``, ``generic``, their mean) puts systematic
    sources below honest ones: the area under the ROC curve over all draws, and how many
    systematic sources fall below the lowest honest one (a bound that accuses none of them)."""
    from sklearn.metrics import roc_auc_score

    systematic = [r for r in rows if r["kind"] == "systematic"]
    honest = [r for r in rows if r["kind"] == "honest"]
    out: dict[str, Any] = {"systematic": len(systematic), "honest_checks": len(honest)}
    if not systematic or not honest:
        return out
    truth = [1] * len(systematic) + [0] * len(honest)
    for name in ("adapted", "generic", "mean"):
        lowest = min(_evidence(r, name) for r in honest)
        out[name] = {
            "auc": float(roc_auc_score(truth, [-_evidence(r, name) for r in systematic + honest])),
            "systematic_below_every_honest": sum(_evidence(r, name) < lowest for r in systematic),
        }
    return out


def _evidence(row: dict[str, Any], name: str) -> float:
    """A source row's evidence by one opinion, or (``mean``) the mean of both."""
    return (row["adapted"] + row["generic"]) / 2 if name == "mean" else float(row[name])
