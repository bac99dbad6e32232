"""Confident learning on out-of-fold predictions: which header labels the archive contradicts.

cleanlab (Northcutt et al., 2021) does the work: ``find_label_issues`` estimates, from the
out-of-fold probabilities, a per-class threshold (the mean self-confidence of each label's
instances) and the joint distribution of given and true labels, and flags the instances it
prunes as mislabelled; ``get_label_quality_scores`` (self-confidence) ranks them. The score we
store is ``1 - quality``: the higher, the more the rest of the archive disagrees with the header.

Only labels the sample holds take part (cleanlab needs examples of every class it is given):
the probabilities of the others are dropped and the rest renormalised.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Issues:
    """Per instance: the probability of its given label, the label-issue score, and the flag."""

    self_confidence: np.ndarray
    score: np.ndarray
    is_issue: np.ndarray


def label_issues(given: np.ndarray, probs: np.ndarray) -> Issues:
    """Score every instance's given label index (N,) against out-of-fold probabilities (N, L)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    given = np.asarray(given, np.int64)
    present = np.unique(given)
    compact = np.searchsorted(present, given)
    sub = np.asarray(probs, np.float64)[:, present]
    sub = np.clip(sub, 1e-12, None)
    sub = sub / sub.sum(axis=1, keepdims=True)
    quality = np.asarray(sub[np.arange(len(given)), compact], np.float64)
    if len(present) < 2:  # one label: nothing can contradict it
        return Issues(quality, 1.0 - quality, np.zeros(len(given), bool))
    with warnings.catch_warnings():
        # cleanlab warns about small classes; the thresholds still follow its method.
        warnings.simplefilter("ignore")
        quality = get_label_quality_scores(compact, sub, method="self_confidence")
        flagged = find_label_issues(compact, sub, filter_by="prune_by_noise_rate")
    return Issues(np.asarray(quality, np.float64), 1.0 - np.asarray(quality), np.asarray(flagged, bool))
