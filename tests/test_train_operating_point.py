"""The header test's operating point: shares on known probabilities, and the choice within budgets."""

from __future__ import annotations

import numpy as np
import pytest

from train.operating_point import (
    SHRINKS,
    choose,
    choose_emission,
    choose_shrink,
    cross_fitted,
    header_shares,
    point_for,
    shares_markdown,
)


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
    # A model that is right most of the time, and much surer of labels 0 and 1 than of the rest.
    logits[np.arange(n), y] += rng.normal(3, 2, n) + np.where(y < 2, 4.0, 0.0)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    agree_at, disagree_at = choose(probs, y, max_false_disagree=0.01, max_false_agree=0.05)
    s = header_shares(probs, y, agree_at, disagree_at)
    assert np.all((disagree_at >= 0) & (disagree_at < agree_at) & (agree_at <= 1))
    assert np.all(disagree_at <= 0.5)
    assert s.false_disagree <= 0.01 and s.false_agree <= 0.05
    assert s.false_disagree > 0.005 and s.false_agree > 0.04  # the budgets are spent, not hoarded
    # Labels the model is sure of may refute far more boldly than the others.
    assert disagree_at[:2].min() > 5 * disagree_at[2:].max()
    # Per-label thresholds catch more relabelled copies than the best single pair within budget.
    single = np.sort(probs[np.arange(n), y])[int(0.01 * n)]
    assert s.caught > header_shares(probs, y, agree_at, float(np.nextafter(single, 0))).caught


def test_budgets_hold_on_each_side_of_a_tie_free_boundary():
    probs, y = _probs(np.asarray([0.9, 0.8, 0.7, 0.6, 0.05] * 20))
    agree_at, disagree_at = choose(probs, y, max_false_disagree=0.0, max_false_agree=0.0)
    s = header_shares(probs, y, agree_at, disagree_at)
    assert s.false_disagree == 0 and s.false_agree == 0
    assert disagree_at[0] < 0.05  # the smallest right header is never refuted


def test_the_emission_threshold_lets_through_the_allowed_share_of_other_labels_and_no_more():
    """``choose_emission`` counts only images of labels other than PT and NM and holds them to
    ``agree_at``'s tolerance."""
    labels = ["CT", "PT", "NM"]
    others = np.linspace(0.0, 0.99, 100)  # p(PT) + p(NM) of 100 CT images
    ct = np.stack([1 - others, others / 2, others / 2], axis=1)
    spect = np.tile([0.0, 0.9, 0.1], (30, 1))  # NM images the network calls PT: they do not count
    probs = np.concatenate([ct, spect])
    y = np.concatenate([np.zeros(100, np.int64), np.full(30, 2)])
    found = choose_emission(probs, y, labels, max_false_agree=0.05)
    emission = probs[:, 1:].sum(axis=1)
    assert np.mean(emission[:100] >= found) == pytest.approx(0.05)  # 5 of 100, not 6
    assert found == pytest.approx(others[-6], abs=1e-12)
    assert choose_emission(probs, y, labels, max_false_agree=0.5) == pytest.approx(
        others[49], abs=1e-12
    )  # 50 pass
    assert choose_emission(probs[:, :1], y * 0, ["CT"]) is None  # no emission label
    assert choose_emission(spect, np.full(30, 2), labels) is None  # no image of another label


def test_the_operating_point_reports_the_emission_threshold_and_its_shares():
    labels = ["CT", "PT", "NM"]
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3))
    logits[np.arange(600), y] += 2.0
    logits[y == 2, 1] += 2.5  # SPECT the network mostly calls PET
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    point = point_for(probs, y, labels, np.asarray([f"s{v}" for v in y]), 1.0)
    assert point["emission_agree_at"] == choose_emission(probs, y, labels)
    nm = point["emission"]["NM"]
    assert nm["right"] == int((y == 2).sum()) and nm["others"] == int((y == 0).sum())
    # PT + NM confirms more right NM headers than p(NM) alone, at no more than the tolerance
    assert nm["agree_at_emission_agree_at"] > nm["agree_pixels"]
    assert nm["others_agree_at_emission_agree_at"] <= nm["others_agree_pixels"] + 0.05
    assert "emission_agree_at" in shares_markdown(point)


def test_cross_fitted_shares_judge_each_fold_by_the_other_folds_thresholds():
    """A fold whose right headers are less sure than every other fold's is refuted far more often
    by thresholds chosen elsewhere than the in-sample shares say."""
    sure = np.tile([0.95, 0.9, 0.85, 0.8, 0.6], 40)  # 200 right headers of label 0, folds 0-3
    shaky = np.full(50, 0.3)  # fold 4: below every right header the other folds hold
    probs, y = _probs(np.concatenate([sure, shaky]))
    wrong, _ = _probs(np.full(250, 0.02))  # label 1's images, p(label 0) = 0.02
    wrong = wrong[:, [1, 0, 2, 3]]
    probs, y = np.concatenate([probs, wrong]), np.concatenate([y, np.ones(250, np.int64)])
    folds = np.concatenate([np.repeat([0, 1, 2, 3], 50), np.full(50, 4), np.tile([0, 1, 2, 3, 4], 50)])
    groups = np.asarray([f"s{f}/{v}" for f, v in zip(folds, y, strict=True)])
    point = point_for(probs, y, ["A", "B", "C", "D"], groups, 1.0, folds)
    assert point["images"]["false_disagree"] <= 0.01  # in-sample: the budget holds by construction
    cross = point["cross_fitted"]
    assert cross["folds"] == 5
    # Folds 0-3 refute below their own smallest right header (0.6), so fold 4's 0.3 is refuted,
    # while fold 4's own thresholds (chosen with it in the training folds) are never above 0.3.
    assert cross["per_label"]["A"]["false_disagree"] == pytest.approx(50 / 250)
    assert cross["images"]["false_disagree"] > 0.09
    assert cross["per_label"]["A"]["right"] == 250
    assert "cross-fitted" in shares_markdown(point)
    # Without folds (or with one), no cross-fitted shares.
    assert "cross_fitted" not in point_for(probs, y, ["A", "B", "C", "D"], groups, 1.0)
    assert "cross_fitted" not in point_for(probs, y, ["A", "B", "C", "D"], groups, 1.0, folds * 0)


def test_the_shrink_holds_the_refuted_budget_on_folds_the_thresholds_never_saw():
    """Each fold's least sure right headers sit lower than the other folds': thresholds set just
    under the other folds' refute them. ``choose_shrink`` takes the largest factor that keeps the
    cross-fitted share within the budget, and ``point_for`` ships it."""
    rng = np.random.default_rng(3)
    parts, folds = [], []
    for fold in range(5):
        floor = 0.04 * (5 - fold) if fold % 2 else 0.03 * (fold + 1)  # each fold's own floor
        parts.append(np.concatenate([rng.uniform(floor, 1.0, 40), np.full(6, floor)]))
        folds += [fold] * 46
    right, _ = _probs(np.concatenate(parts))
    low = rng.uniform(0.0, 0.02, 230)  # label 1's images: p(label 0) below every floor
    copies = np.stack([low, 0.98 - low, np.full(230, 0.01), np.full(230, 0.01)], axis=1)
    probs = np.concatenate([right, copies])
    y = np.concatenate([np.zeros(230, np.int64), np.ones(230, np.int64)])
    folds_all = np.concatenate([np.asarray(folds), np.arange(230) % 5])
    labels, groups = (
        ["A", "B", "C", "D"],
        np.asarray([f"s{f}/{v}" for f, v in zip(folds_all, y, strict=True)]),
    )
    shrink = choose_shrink(probs, y, folds_all)
    assert 0 < shrink < 1
    unshrunk = cross_fitted(probs, y, labels, groups, folds_all, shrink=1.0)["images"]
    held = cross_fitted(probs, y, labels, groups, folds_all, shrink=shrink)["images"]
    assert unshrunk["false_disagree"] > 0.01 >= held["false_disagree"]
    larger = SHRINKS[SHRINKS.index(shrink) - 1]
    assert cross_fitted(probs, y, labels, groups, folds_all, shrink=larger)["images"]["false_disagree"] > 0.01
    # label 1's images under an A header stay refuted: it shrinks, it does not silence
    assert cross_fitted(probs, y, labels, groups, folds_all, shrink=shrink)["per_label"]["A"]["caught"] > 0.5
    point = point_for(probs, y, labels, groups, 1.0, folds_all)
    assert point["shrink"] == shrink
    assert point["disagree_at"]["A"] == pytest.approx(choose(probs, y, shrink=shrink)[1][0])
    assert point["disagree_at"]["A"] < choose(probs, y)[1][0]
    assert len(point["cross_fitted"]["shrink_per_fold"]) == 5
    assert choose_shrink(probs, y, folds_all * 0) == 1.0  # one fold: nothing to hold out
