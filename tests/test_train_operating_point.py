"""The header test's operating point: shares on known probabilities, and the choice within budgets."""

from __future__ import annotations

import numpy as np
import pytest

from train.operating_point import choose, header_shares


def _probs(p_true: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Images of label 0 with these probabilities of it; the rest is shared evenly."""
    probs = np.repeat(((1 - p_true) / (k - 1))[:, None], k, axis=1)
    probs[:, 0] = p_true
    return probs, np.zeros(len(p_true), dtype=np.int64)


def test_shares_count_right_headers_and_relabelled_copies():
    probs, y = _probs(np.asarray([0.982, 0.4, 0.1, 0.004]))
    s = header_shares(probs, y, agree_at=0.25, disagree_at=0.01)
    assert s.agree == pytest.approx(0.5)  # 0.982 and 0.4
    assert s.false_disagree == pytest.approx(0.25)  # 0.004
    # Relabelled copies: the other labels get 0.006, 0.2, 0.3 and 0.332 per image.
    assert s.caught == pytest.approx(0.25)
    assert s.false_agree == pytest.approx(0.5)


def test_group_average_weighs_every_group_once():
    probs, y = _probs(np.asarray([0.9, 0.9, 0.9, 0.005]))
    groups = np.asarray(["big", "big", "big", "small"])
    assert header_shares(probs, y, 0.5, 0.01).false_disagree == pytest.approx(0.25)
    assert header_shares(probs, y, 0.5, 0.01, groups).false_disagree == pytest.approx(0.5)


def test_choice_spends_each_budget_and_no_more():
    rng = np.random.default_rng(0)
    k, n = 8, 2000
    logits = rng.normal(size=(n, k))
    y = rng.integers(0, k, n)
    logits[np.arange(n), y] += rng.normal(3, 2, n)  # a model that is right most of the time
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    agree_at, disagree_at = choose(probs, y, max_false_disagree=0.01, max_false_agree=0.05)
    s = header_shares(probs, y, agree_at, disagree_at)
    assert 0 < disagree_at < agree_at < 1
    assert s.false_disagree <= 0.01 and s.false_agree <= 0.05
    # Any larger refutation threshold or smaller confirmation one breaks its budget.
    p_true = np.sort(probs[np.arange(n), y])
    assert header_shares(probs, y, agree_at, float(p_true[int(0.01 * n)])).false_disagree > 0.01
    looser = header_shares(probs, y, float(np.nextafter(agree_at, 0)) * 0.999, disagree_at)
    assert looser.false_agree > 0.05 - 1e-3
