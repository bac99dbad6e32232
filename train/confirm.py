"""A confirming partner, chosen on out-of-fold predictions.

An ensemble (:class:`sorter.model.network.EnsembleNet`) runs its two networks on every frame. With
the header beside the pixels, the fast partner may *confirm* a header on its own: where it gives
the header's label at least that label's ``confirm_at`` (never below the operating point's
``agree_at``), the frame is ``agree`` and the main network is skipped
(:class:`sorter.model.spec.PartnerSpec`). It never refutes: every other frame gets the ensemble's
verdict. Most frames of an archive carry a right header, so most skip the slow network.

What it costs is relabelled copies the partner confirms: per header label, ``confirm_at`` is the
lowest value at which the copies relabelled to that label that are confirmed (by the partner or
the ensemble) rise by at most ``tolerance`` over the ensemble's own share. A lost catch is such a
confirmation, so the share of relabelled copies caught falls by at most as much. Chosen and scored
cross-fitted: each fold's images are served with thresholds chosen on the other folds.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from train.calibrate import softmax_np
from train.operating_point import header_shares, read_out_of_fold

#: Candidate thresholds: above 0.5, so that a confirmed frame's top label is the header's.
GRID = np.concatenate([np.round(np.arange(0.51, 1.0, 0.01), 2), [0.995, 0.999, 1.0]])
#: The default rise in relabelled copies confirmed, per header label.
TOLERANCE = 0.01


def served(probs: np.ndarray, partner: np.ndarray, confirm_at: np.ndarray) -> np.ndarray:
    """What the header test sees, per image and header label: the partner's probability where it
    confirms that header (at least ``confirm_at``: per label, or per image and label), else the
    ensemble's."""
    return np.where(partner >= np.broadcast_to(confirm_at, partner.shape), partner, probs)


def choose_confirm(
    probs: np.ndarray, partner: np.ndarray, y: np.ndarray, agree_at: np.ndarray, tolerance: float = TOLERANCE
) -> np.ndarray:
    """Per header label, the lowest :data:`GRID` value (raised to ``agree_at``) at which the copies
    of other labels' images relabelled to it that are confirmed rise by at most ``tolerance``;
    1 where none does, or where no image of another label says."""
    out = np.ones(probs.shape[1])
    for h in range(probs.shape[1]):
        copies = y != h
        if not copies.any():
            continue
        agreed = probs[copies, h] >= agree_at[h]
        budget = agreed.mean() + tolerance
        for c in GRID:
            at = max(float(c), float(agree_at[h]))
            if np.mean(agreed | (partner[copies, h] >= at)) <= budget:
                out[h] = at
                break
    return out


def confirm_point(
    probs: np.ndarray,
    partner: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    groups: np.ndarray,
    thresholds: tuple[np.ndarray, np.ndarray],
    labels: list[str],
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """The confirming partner at the operating point ``thresholds`` (``agree_at``, ``disagree_at``):
    its thresholds (chosen on every fold, for the artefact) and its header-test shares cross-fitted
    over ``folds``, beside the ensemble's own; ``fast`` is the share of right headers the partner
    confirms alone (frames that skip the main network), ``fast_relabelled`` that of the copies."""
    agree_at, disagree_at = thresholds
    final = choose_confirm(probs, partner, y, agree_at, tolerance)
    cross = np.broadcast_to(final, probs.shape).copy()
    per_fold: dict[int, dict[str, float]] = {}
    protocol = "confirm thresholds chosen on these same images (one fold)"
    if len(np.unique(folds)) > 1:
        protocol = (
            "confirm thresholds cross-fitted over the folds (each fold through thresholds chosen on the "
            "other folds)"
        )
        for fold in np.unique(folds):
            held = folds == fold
            at = choose_confirm(probs[~held], partner[~held], y[~held], agree_at, tolerance)
            per_fold[int(fold)] = dict(zip(labels, (float(v) for v in at), strict=True))
            cross[held] = at
    confirmed = partner >= cross
    rows = np.arange(len(y))
    right = confirmed[rows, y]
    copies = confirmed.copy()
    copies[rows, y] = False
    view = served(probs, partner, cross)
    return {
        "tolerance": tolerance,
        "confirm_at": dict(zip(labels, (float(v) for v in final), strict=True)),
        "per_fold": per_fold,
        "fast": float(right.mean()),
        "fast_relabelled": float(copies.sum() / (copies.size - len(y))),
        "images": asdict(header_shares(view, y, agree_at, disagree_at)),
        "sources": asdict(header_shares(view, y, agree_at, disagree_at, groups)),
        "ensemble_images": asdict(header_shares(probs, y, agree_at, disagree_at)),
        "ensemble_sources": asdict(header_shares(probs, y, agree_at, disagree_at, groups)),
        "protocol": f"{protocol}; the operating point chosen on every fold",
    }


def confirm_for_run(
    run: Path, temperature: float, partner_temperature: float, point: dict[str, Any], tolerance: float
) -> dict[str, Any]:
    """:func:`confirm_point` on an ensemble's loso run (``sorter-train ensemble`` keeps the partner's
    out-of-fold logits in it) at the operating point ``point`` (:func:`train.operating_point.point_for`)."""
    oof = read_out_of_fold(run)
    if "partner_logits" not in oof.data:
        raise ValueError(
            f"{run} holds no partner predictions: a confirming partner needs the loso run that "
            "`sorter-train ensemble` writes (--out-run)"
        )
    agree_at, disagree_at = (
        np.asarray([point[key][label] for label in oof.labels]) for key in ("agree_at", "disagree_at")
    )
    return confirm_point(
        softmax_np(oof.data["logits"], temperature),
        softmax_np(oof.data["partner_logits"], partner_temperature),
        oof.y,
        np.asarray(oof.data["folds"]),
        oof.groups,
        (agree_at, disagree_at),
        oof.labels,
        tolerance,
    )
