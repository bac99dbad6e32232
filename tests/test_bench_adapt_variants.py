"""The adaptation variants tests/bench/bench_adapt.py measures (tests/bench/adapt_variants.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from adapt_variants import knn_probs, source_folds, source_summary

from sorter.adaptation.sample import Candidate


def test_neighbours_vote_out_of_fold_and_every_label_weighs_the_same() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    y = np.repeat([0, 1, 2], [40, 10, 10])
    x = centres[y] + rng.normal(0, 0.5, (len(y), 3))
    folds = np.arange(len(y)) % 4
    probs = knn_probs(x, y, folds, n_labels=4, k=5)
    assert probs.shape == (60, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert (probs.argmax(axis=1) == y).all()
    assert (probs[:, 3] == 0).all()  # a label no other fold holds gets nothing, not even prior
    # An instance is never its own neighbour: a lone point of label 2 among label-0 points, in
    # a fold of its own, is voted label 0 by the others.
    x2 = np.vstack([x[:40], x[:1] + 1e-3])
    y2 = np.r_[y[:40], 2]
    folds2 = np.r_[np.arange(40) % 4, 4]
    lone = knn_probs(x2, y2, folds2, n_labels=3, k=5)[-1]
    assert lone.argmax() == 0


def test_source_folds_hold_whole_sources_out_and_keep_studies_whole() -> None:
    chosen = [
        Candidate(i, "CT" if i % 3 else "MR", f"station{i % 5}", f"study{i % 5}-{i // 10}", f"series{i}")
        for i in range(60)
    ]
    fold_of = source_folds(chosen, folds=3, seed=0)
    assert set(fold_of) == {c.study for c in chosen}
    by_source: dict[str, set[int]] = {}
    for c in chosen:
        by_source.setdefault(c.source, set()).add(fold_of[c.study])
    assert all(len(f) == 1 for f in by_source.values())
    assert len(set(fold_of.values())) == 3
    spanning = [*chosen, Candidate(99, "CT", "station1", "study0-0", "series99")]
    with pytest.raises(ValueError, match="study0-0"):
        source_folds(spanning, folds=3, seed=0)


def test_source_summary_counts_systematic_sources_below_every_honest_one() -> None:
    rows = [
        {"kind": "systematic", "adapted": 0.05, "generic": 0.2},
        {"kind": "systematic", "adapted": 0.6, "generic": 0.01},
        {"kind": "honest", "adapted": 0.1, "generic": 0.9},
        {"kind": "honest", "adapted": 0.8, "generic": 0.5},
        {"kind": "touched", "adapted": 0.0, "generic": 0.0},  # left out
    ]
    out = source_summary(rows)
    assert (out["systematic"], out["honest_checks"]) == (2, 2)
    assert out["adapted"]["systematic_below_every_honest"] == 1
    assert out["generic"]["systematic_below_every_honest"] == 2
    assert out["generic"]["auc"] == 1.0
    assert out["adapted"]["auc"] == 0.75
