"""The verdict's operating point, chosen on out-of-fold predictions of held-out sources.

The verdict tests the header, not the argmax: a header is confirmed (``agree``)
when the calibrated probability of its label is at least ``agree_at`` and
refuted (``disagree``) when it is at most ``disagree_at``; in between the
verdict is ``uncertain`` (see :func:`sorter.compare.compare`). Refuting needs
only that the pixels make the header implausible, not that the model knows the
right answer: a Lu-177 SPECT stored as PT is refuted once PT is unlikely, even
while NM and OT share the rest.

Three shares measure an operating point over leave-sources-out predictions:

* right headers called ``agree`` (target >= 0.90) and ``disagree`` (<= 0.01);
* relabelled copies (each image once with every other label's Modality
  written in) called ``disagree`` (>= 0.80), and called ``agree`` (the errors
  a user would take as confirmed).

Each share is given per image and averaged over (source, label) groups, so a
180-slice series does not outweigh twenty radiograph collections.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from train.calibrate import softmax_np

#: Targets of the issue that introduced the header test (model card and README quote them).
TARGETS = {"agree": 0.90, "false_disagree": 0.01, "caught": 0.80}
#: At most this share of relabelled copies may be confirmed as ``agree``.
MAX_FALSE_AGREE = 0.05


@dataclass(frozen=True)
class HeaderShares:
    """How an operating point treats right headers and relabelled copies."""

    agree: float  # right headers called agree
    false_disagree: float  # right headers called disagree
    caught: float  # relabelled copies called disagree
    false_agree: float  # relabelled copies called agree


def _shares(probs: np.ndarray, y: np.ndarray, agree_at: float, disagree_at: float) -> np.ndarray:
    """Per image: the four shares of :class:`HeaderShares` (N, 4)."""
    n, k = probs.shape
    p_true = probs[np.arange(n), y]
    other = np.ones((n, k), dtype=bool)
    other[np.arange(n), y] = False
    p_other = probs[other].reshape(n, k - 1)
    return np.stack(
        [
            p_true >= agree_at,
            p_true <= disagree_at,
            (p_other <= disagree_at).mean(axis=1),
            (p_other >= agree_at).mean(axis=1),
        ],
        axis=1,
    ).astype(np.float64)


def header_shares(
    probs: np.ndarray, y: np.ndarray, agree_at: float, disagree_at: float, groups: np.ndarray | None = None
) -> HeaderShares:
    """The shares over images, or averaged over ``groups`` (each group's mean counts once)."""
    per_image = _shares(probs, y, agree_at, disagree_at)
    if groups is None:
        means = per_image.mean(axis=0)
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.zeros((inverse.max() + 1, 4))
        np.add.at(sums, inverse, per_image)
        means = (sums / np.bincount(inverse)[:, None]).mean(axis=0)
    return HeaderShares(*(float(v) for v in means))


def choose(
    probs: np.ndarray,
    y: np.ndarray,
    max_false_disagree: float = TARGETS["false_disagree"],
    max_false_agree: float = MAX_FALSE_AGREE,
) -> tuple[float, float]:
    """``(agree_at, disagree_at)``: refute as much as the false-disagree budget allows,
    then confirm as much as the false-agree budget allows.

    ``disagree_at`` is the largest probability of a right header's label that
    keeps the share of right headers refuted within ``max_false_disagree``;
    ``agree_at`` the smallest one (not below ``disagree_at``) that keeps the
    share of relabelled copies confirmed within ``max_false_agree``.
    """
    n = len(y)
    p_true = np.sort(probs[np.arange(n), y])
    allowed = int(np.floor(max_false_disagree * n))
    # Strictly below the (allowed+1)-th smallest right-header probability.
    disagree_at = float(np.nextafter(p_true[allowed], 0)) if allowed < n else 1.0
    disagree_at = min(max(disagree_at, 0.0), 0.5)
    other = np.ones(probs.shape, dtype=bool)
    other[np.arange(n), y] = False
    p_other = np.sort(probs[other])[::-1]
    cap = int(np.floor(max_false_agree * len(p_other)))
    agree_at = float(np.nextafter(p_other[cap], 1)) if cap < len(p_other) else 0.0
    return max(agree_at, np.nextafter(disagree_at, 1)), disagree_at


def operating_point(run: Path, temperature: float | None = None) -> dict[str, Any]:
    """Choose the operating point on a ``sorter-train loso`` run and report its shares."""
    data = np.load(run / "oof.npz")
    labels = [str(v) for v in yaml.safe_load((run / "config.yaml").read_text())["labels"]]
    t = float(data["temperature"]) if temperature is None else temperature
    probs = softmax_np(data["logits"], t)
    index = {label: i for i, label in enumerate(labels)}
    y = np.asarray([index[str(v)] for v in data["labels"]])
    groups = np.asarray([f"{s}/{lab}" for s, lab in zip(data["sources"], data["labels"], strict=True)])
    agree_at, disagree_at = choose(probs, y)
    per_label = {}
    for label, i in index.items():
        mask = y == i
        if mask.any():
            per_label[label] = asdict(header_shares(probs[mask], y[mask], agree_at, disagree_at))
    return {
        "agree_at": round(agree_at, 6),
        "disagree_at": round(disagree_at, 6),
        "temperature": t,
        "n": len(y),
        "images": asdict(header_shares(probs, y, agree_at, disagree_at)),
        "sources": asdict(header_shares(probs, y, agree_at, disagree_at, groups)),
        "per_label": per_label,
        "targets": TARGETS,
        "max_false_agree": MAX_FALSE_AGREE,
    }


def shares_markdown(point: dict[str, Any]) -> str:
    """The operating point's shares as the markdown table of the model card."""
    lines = [
        f"Header confirmed (`agree`) when p(header label) >= {point['agree_at']:.4g}, refuted "
        f"(`disagree`) when <= {point['disagree_at']:.4g}, `uncertain` in between; chosen on "
        f"{point['n']} out-of-fold images so that at most {TARGETS['false_disagree']:.0%} of right "
        f"headers are refuted and at most {point['max_false_agree']:.0%} of relabelled copies confirmed.",
        "",
        "| | right header: agree | right header: disagree | relabelled: disagree | relabelled: agree |",
        "|---|---:|---:|---:|---:|",
        f"| target | >= {TARGETS['agree']:.2f} | <= {TARGETS['false_disagree']:.2f} | "
        f">= {TARGETS['caught']:.2f} | |",
    ]
    rows = [("per image", point["images"]), ("per source", point["sources"])]
    rows += [(f"{label} (per image)", s) for label, s in point["per_label"].items()]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['agree']:.3f} | {s['false_disagree']:.3f} | {s['caught']:.3f} | "
            f"{s['false_agree']:.3f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["TARGETS", "HeaderShares", "choose", "header_shares", "operating_point", "shares_markdown"]
