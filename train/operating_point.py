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

Shares scored on the predictions the thresholds were chosen on flatter them: held
out (:func:`cross_fitted`, each fold judged by thresholds chosen on the others),
the unshrunk thresholds refuted 3 to 8 % of right headers, not 1 %. Exported
models therefore shrink every ``disagree_at`` until the budget holds on folds the
thresholds never saw (:func:`choose_shrink`), and report both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sorter.domain import Label, Thresholds
from sorter.nuclides import EMISSION
from train.calibrate import softmax_np

#: The emission labels (:data:`sorter.nuclides.EMISSION`) as the run's label names.
EMISSION_LABELS = frozenset(label.value for label in EMISSION)
#: Targets of the issue that introduced the header test (model card and README quote them).
TARGETS = {"agree": 0.90, "false_disagree": 0.01, "caught": 0.80}
#: At most this share of the copies relabelled to any one label may be confirmed as ``agree``.
MAX_FALSE_AGREE = 0.05
#: A header label keeping at least even odds is never refuted, whatever the out-of-fold evidence.
MAX_DISAGREE_AT = 0.5
#: No label may bear more than this share of its own right headers refuted.
MAX_LABEL_SHARE = 0.05
#: The per-label shares the model card gives cross-fitted beside the in-sample ones.
HELD_OUT_COLUMNS = ("agree", "false_disagree", "caught", "false_agree")
#: Factors tried on every ``disagree_at`` (:func:`choose_shrink`), the largest first; 0 refutes
#: nothing on the pixels alone.
SHRINKS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0)


@dataclass(frozen=True)
class HeaderShares:
    """How an operating point treats right headers and relabelled copies."""

    agree: float  # right headers called agree
    false_disagree: float  # right headers called disagree
    caught: float  # relabelled copies called disagree
    false_agree: float  # relabelled copies called agree


def _shares(probs: np.ndarray, y: np.ndarray, agree_at: np.ndarray, disagree_at: np.ndarray) -> np.ndarray:
    """Per image: the four shares of :class:`HeaderShares` (N, 4), thresholds per header label
    (``(K,)``) or per image and header label (``(N, K)``: each fold's own, when cross-fitted)."""
    n, k = probs.shape
    rows = np.arange(n)
    p_true = probs[rows, y]
    other = np.ones((n, k), dtype=bool)
    other[rows, y] = False
    high = np.broadcast_to(agree_at, (n, k))
    low = np.broadcast_to(disagree_at, (n, k))
    refuted = probs <= low
    confirmed = probs >= high
    return np.stack(
        [
            p_true >= high[rows, y],
            p_true <= low[rows, y],
            (refuted & other).sum(axis=1) / (k - 1),
            (confirmed & other).sum(axis=1) / (k - 1),
        ],
        axis=1,
    ).astype(np.float64)


def header_shares(
    probs: np.ndarray,
    y: np.ndarray,
    agree_at: np.ndarray | float,
    disagree_at: np.ndarray | float,
    groups: np.ndarray | None = None,
) -> HeaderShares:
    """The shares over images, or averaged over ``groups`` (each group's mean counts once).

    Thresholds are per header label (one per column of ``probs``), per image and header label
    (the shape of ``probs``) or one for all.
    """
    n, k = probs.shape
    shape = (n, k) if np.ndim(agree_at) == 2 else (k,)
    high = np.broadcast_to(np.asarray(agree_at, dtype=np.float64), shape)
    low = np.broadcast_to(np.asarray(disagree_at, dtype=np.float64), shape)
    per_image = _shares(probs, y, high, low)
    if groups is None:
        means = per_image.mean(axis=0)
    else:
        _, inverse = np.unique(groups, return_inverse=True)
        sums = np.zeros((inverse.max() + 1, 4))
        np.add.at(sums, inverse, per_image)
        means = (sums / np.bincount(inverse)[:, None]).mean(axis=0)
    return HeaderShares(*(float(v) for v in means))


def _greedy(gains: list[np.ndarray], budget: int, limits: list[int]) -> list[int]:
    """Spend ``budget`` unit costs over labels, at most ``limits[h]`` on label h; ``gains[h][u]`` is
    label h's cumulative gain after spending u. Each step takes the spend with the best gain per
    unit (looking ahead, since the gains are steps, not a concave curve)."""
    spent = [0] * len(gains)
    left = budget
    while left > 0:
        best: tuple[float, int, int] | None = None
        for h, g in enumerate(gains):
            reach = min(left, limits[h] - spent[h])
            ahead = g[spent[h] + 1 : spent[h] + 1 + reach] - g[spent[h]]
            if not len(ahead) or ahead.max() <= 0:
                continue
            ratio = ahead / np.arange(1, len(ahead) + 1)
            step = int(np.argmax(ratio)) + 1
            if best is None or ratio[step - 1] > best[0]:
                best = (float(ratio[step - 1]), h, step)
        if best is None:
            break
        _, h, step = best
        spent[h] += step
        left -= step
    return spent


def _passing_at_most(wrong: np.ndarray, share: float) -> float:
    """The lowest threshold that at most ``share`` of the sorted values ``wrong`` reach: just above
    the (allowed + 1)-th largest; 0 where all may."""
    allowed = int(np.floor(share * len(wrong)))
    return float(np.nextafter(wrong[-allowed - 1], 1)) if allowed < len(wrong) else 0.0


def as_thresholds(
    labels: Sequence[str],
    agree_at: np.ndarray,
    disagree_at: np.ndarray,
    emission_agree_at: float | None = None,
) -> Thresholds:
    """The header test's thresholds as a model serves them, from per-label arrays in ``labels``' order."""
    return Thresholds(
        agree_at={str(label): float(a) for label, a in zip(labels, agree_at, strict=True)},
        disagree_at={str(label): float(d) for label, d in zip(labels, disagree_at, strict=True)},
        emission_agree_at=emission_agree_at,
    )


def choose(
    probs: np.ndarray,
    y: np.ndarray,
    max_false_disagree: float = TARGETS["false_disagree"],
    max_false_agree: float = MAX_FALSE_AGREE,
    cap: float = MAX_DISAGREE_AT,
    label_budget: float = MAX_LABEL_SHARE,
    shrink: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(agree_at, disagree_at)`` per header label.

    ``disagree_at[h]`` sits just below a right header's probability so that at most
    ``max_false_disagree`` of all right headers are refuted, that budget spent on the labels
    where it catches the most relabelled copies, but never more than ``label_budget`` of one
    label's right headers and never above ``cap`` (a header keeping even odds is never refuted);
    then times ``shrink`` (:func:`choose_shrink`: thresholds that sit just below these images'
    least sure right header refute more of another source's). ``agree_at[h]`` is the lowest
    value, above ``disagree_at[h]``, at which at most ``max_false_agree`` of the copies
    relabelled ``h`` are confirmed: every label's ``agree`` is held to the same standard.
    """
    n, k = probs.shape
    right = [np.sort(probs[y == h, h]) for h in range(k)]
    wrong = [np.sort(probs[y != h, h]) for h in range(k)]

    def below(h: int, u: int) -> float:  # refutes at most the u smallest right headers of label h
        edge = min(float(np.nextafter(right[h][u], 0)), cap) if u < len(right[h]) else cap
        return edge * shrink

    caught = [
        np.asarray([np.searchsorted(wrong[h], below(h, u), side="right") for u in range(len(right[h]) + 1)])
        for h in range(k)
    ]
    limits = [int(np.floor(label_budget * len(r))) for r in right]
    used = _greedy(caught, int(np.floor(max_false_disagree * n)), limits)
    disagree_at = np.asarray([below(h, used[h]) if len(right[h]) else 0.0 for h in range(k)])
    agree_at = np.asarray([_passing_at_most(wrong[h], max_false_agree) for h in range(k)])
    agree_at = np.minimum(np.maximum(agree_at, np.nextafter(disagree_at, 1)), 1.0)
    return agree_at, disagree_at


def _each_fold(
    probs: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    choice: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Any, ...]],
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[Any, ...]]]:
    """Per image and header label, ``(agree_at, disagree_at)`` as ``choice(probs, y, folds)``
    makes them on the other folds' images alone; and what ``choice`` returned, per fold."""
    agree_at, disagree_at = np.empty_like(probs), np.empty_like(probs)
    made = {}
    for fold in np.unique(folds):
        held = folds == fold
        made[int(fold)] = choice(probs[~held], y[~held], folds[~held])
        agree_at[held], disagree_at[held] = made[int(fold)][:2]
    return agree_at, disagree_at, made


def choose_shrink(probs: np.ndarray, y: np.ndarray, folds: np.ndarray) -> float:
    """The largest :data:`SHRINKS` factor at which :func:`choose`, on all folds but one, refutes at
    most its budget (1 %) of that fold's right headers (over every fold): the budget held
    on sources the thresholds never saw, as an archive meets them. On leave-sources-out
    predictions the unshrunk thresholds refuted several times the budget so (a source the model
    doubts as a whole falls below thresholds set just under the other sources' least sure right
    header). 1 with fewer than two folds (nothing to hold out)."""
    if len(np.unique(folds)) < 2:
        return 1.0
    rows = np.arange(len(y))
    for shrink in SHRINKS:
        _, disagree_at, _ = _each_fold(
            probs,
            y,
            folds,
            lambda p, t, _f, s=shrink: choose(p, t, shrink=s),
        )
        if np.mean(probs[rows, y] <= disagree_at[rows, y]) <= TARGETS["false_disagree"]:
            return shrink
    return 0.0


def choose_held_out(
    probs: np.ndarray, y: np.ndarray, folds: np.ndarray, shrink: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(agree_at, disagree_at, shrink)``: :func:`choose` on every image, its ``disagree_at``
    shrunk by :func:`choose_shrink` over ``folds``: what ``sorter-train export`` ships. A given
    ``shrink`` is used as it is (1: the thresholds exported before :func:`choose_shrink`)."""
    if shrink is None:
        shrink = choose_shrink(probs, y, folds)
    agree_at, disagree_at = choose(probs, y, shrink=shrink)
    return agree_at, disagree_at, shrink


def _emission_columns(labels: Sequence[str]) -> list[int]:
    """The columns of PT and NM among ``labels``."""
    return [i for i, label in enumerate(labels) if label in EMISSION_LABELS]


def choose_emission(
    probs: np.ndarray, y: np.ndarray, labels: Sequence[str], max_false_agree: float = MAX_FALSE_AGREE
) -> float | None:
    """``emission_agree_at``: where p(PT) + p(NM) confirms a PT or NM header its radionuclide
    confirms (:func:`sorter.compare.compare`).

    Held to ``agree_at``'s standard: at most ``max_false_agree`` of the images of every other label
    (CT, MR, XR ...), were they under such a header, would be confirmed. Like ``agree_at`` it asks
    whether the pixels leave room for emission imaging, so it may sit below even odds. The PT and
    NM images themselves do not count against it: under the other emission label's header they
    name a nuclide that contradicts it. ``None`` when the model has neither label or no image of
    another label is known.
    """
    columns = _emission_columns(labels)
    if not columns:
        return None
    emission = probs[:, columns].sum(axis=1)
    wrong = np.sort(emission[~np.isin(y, columns)])
    if not len(wrong):
        return None
    return min(_passing_at_most(wrong, max_false_agree), 1.0)


def emission_shares(
    probs: np.ndarray,
    y: np.ndarray,
    labels: Sequence[str],
    thresholds: tuple[np.ndarray, np.ndarray],
    emission_agree_at: float,
) -> dict[str, dict[str, float]]:
    """Per emission header label h (PT, NM), were every image to name a nuclide that h's scanner
    images: the share of right h headers confirmed by the pixels alone, by PT + NM at h's
    ``agree_at`` (the rule before ``emission_agree_at``) and at ``emission_agree_at``; and the same
    for the other labels' images under an h header (the worst case: a PET/CT's CT carries the
    PET's radiopharmaceutical). ``thresholds`` is ``(agree_at, disagree_at)`` per label; the
    bound is :meth:`sorter.domain.Thresholds.emission_bound`'s, as a scan serves it."""
    agree_at, disagree_at = thresholds
    limits = as_thresholds(labels, agree_at, disagree_at, emission_agree_at)
    columns = _emission_columns(labels)
    emission = probs[:, columns].sum(axis=1)
    others = ~np.isin(y, columns)

    def share(hit: np.ndarray, among: np.ndarray) -> float:
        return float(hit[among].mean()) if among.any() else float("nan")

    out = {}
    for h in columns:
        right, pixels = y == h, probs[:, h] >= agree_at[h]
        before = pixels | (emission >= agree_at[h])
        now = pixels | (emission >= limits.emission_bound(Label(labels[h])))
        out[labels[h]] = {
            "right": int(right.sum()),
            "agree_pixels": share(pixels, right),
            "agree_at_agree_at": share(before, right),
            "agree_at_emission_agree_at": share(now, right),
            "others": int(others.sum()),
            "others_agree_pixels": share(pixels, others),
            "others_agree_at_agree_at": share(before, others),
            "others_agree_at_emission_agree_at": share(now, others),
        }
    return out


def _label_shares(
    probs: np.ndarray, y: np.ndarray, agree_at: np.ndarray, disagree_at: np.ndarray, h: int
) -> dict[str, float]:
    """Header label h's shares: right h headers called agree and disagree, the other labels'
    images relabelled h called disagree and agree. Thresholds per header label (``(K,)``) or per
    image and header label (``(N, K)``, as :func:`header_shares` takes them)."""
    high = np.broadcast_to(agree_at, probs.shape)[:, h]
    low = np.broadcast_to(disagree_at, probs.shape)[:, h]
    confirmed, refuted = probs[:, h] >= high, probs[:, h] <= low
    right, copy = y == h, y != h
    return {
        "right": int(right.sum()),
        "agree": float(np.mean(confirmed[right])) if right.any() else float("nan"),
        "false_disagree": float(np.mean(refuted[right])) if right.any() else float("nan"),
        "caught": float(np.mean(refuted[copy])),
        "false_agree": float(np.mean(confirmed[copy])),
    }


def by_header_label(
    probs: np.ndarray, y: np.ndarray, agree_at: np.ndarray, disagree_at: np.ndarray, labels: list[str]
) -> dict[str, dict[str, float]]:
    """Per header label h: its thresholds and :func:`_label_shares`."""
    return {
        # Unrounded: agree_at may sit one float above disagree_at.
        label: {
            "agree_at": float(agree_at[h]),
            "disagree_at": float(disagree_at[h]),
            **_label_shares(probs, y, agree_at, disagree_at, h),
        }
        for h, label in enumerate(labels)
    }


def cross_fitted(
    probs: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    groups: np.ndarray,
    folds: np.ndarray,
    shrink: float | None = None,
) -> dict[str, Any]:
    """The header test's shares where each fold's images are judged by thresholds chosen on the
    other folds' images only, as a new archive meets thresholds chosen on sources it does not
    hold: by :func:`choose_held_out` there (its shrink chosen on those folds alone, nested, or
    the given ``shrink``). :func:`point_for`'s own shares are in-sample (chosen
    and scored on the same images, so its right headers refuted stay within the budget by
    construction)."""

    agree_at, disagree_at, made = _each_fold(
        probs, y, folds, lambda p, t, f: choose_held_out(p, t, f, shrink)
    )
    per_label = {label: _label_shares(probs, y, agree_at, disagree_at, h) for h, label in enumerate(labels)}
    return {
        "protocol": "each fold's images through thresholds chosen on the other folds",
        "folds": len(np.unique(folds)),
        "shrink_per_fold": {fold: float(found[2]) for fold, found in made.items()},
        "images": asdict(header_shares(probs, y, agree_at, disagree_at)),
        "sources": asdict(header_shares(probs, y, agree_at, disagree_at, groups)),
        "per_label": per_label,
    }


def point_for(
    probs: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    groups: np.ndarray,
    temperature: float,
    folds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Choose the operating point on calibrated out-of-fold ``probs`` and report its shares, per
    image, averaged over ``groups`` (source/label) and per header label. With the images'
    ``folds`` (two or more) it is :func:`choose_held_out`'s, and :func:`cross_fitted` reports
    its shares on folds it did not see; without, :func:`choose`'s."""
    held_out = folds is not None and len(np.unique(folds)) > 1
    if held_out:
        assert folds is not None
        agree_at, disagree_at, shrink = choose_held_out(probs, y, folds)
    else:
        (agree_at, disagree_at), shrink = choose(probs, y), 1.0
    per_label = by_header_label(probs, y, agree_at, disagree_at, labels)
    emission = choose_emission(probs, y, labels)
    return {
        "agree_at": {label: row["agree_at"] for label, row in per_label.items()},
        "disagree_at": {label: row["disagree_at"] for label, row in per_label.items()},
        "emission_agree_at": emission,
        **(
            {}
            if emission is None
            else {"emission": emission_shares(probs, y, labels, (agree_at, disagree_at), emission)}
        ),
        "temperature": temperature,
        "n": len(y),
        "images": asdict(header_shares(probs, y, agree_at, disagree_at)),
        "sources": asdict(header_shares(probs, y, agree_at, disagree_at, groups)),
        "per_label": per_label,
        "shrink": shrink,
        **(
            {"cross_fitted": cross_fitted(probs, y, labels, groups, folds)}
            if held_out and folds is not None
            else {}
        ),
        "targets": TARGETS,
        "max_false_agree": MAX_FALSE_AGREE,
    }


@dataclass(frozen=True)
class OutOfFold:
    """A ``sorter-train loso`` run's out-of-fold predictions, as the header test scores them."""

    data: Any  # the run's oof.npz (logits, labels, sources, folds, temperature, ...)
    labels: list[str]  # the model's labels, in output order
    y: np.ndarray  # each image's label, as an index into ``labels``
    groups: np.ndarray  # each image's (source/label) group, for the per-source shares


def read_out_of_fold(run: Path) -> OutOfFold:
    """Read ``run``'s ``oof.npz`` and its labels (``config.yaml``)."""
    data = np.load(run / "oof.npz")
    labels = [str(v) for v in yaml.safe_load((run / "config.yaml").read_text())["labels"]]
    index = {label: i for i, label in enumerate(labels)}
    y = np.asarray([index[str(v)] for v in data["labels"]])
    groups = np.asarray([f"{s}/{lab}" for s, lab in zip(data["sources"], data["labels"], strict=True)])
    return OutOfFold(data, labels, y, groups)


def operating_point(run: Path, temperature: float | None = None) -> dict[str, Any]:
    """:func:`point_for` on a ``sorter-train loso`` run (at its own temperature by default)."""
    oof = read_out_of_fold(run)
    t = float(oof.data["temperature"]) if temperature is None else temperature
    probs = softmax_np(oof.data["logits"], t)
    return point_for(probs, oof.y, oof.labels, oof.groups, t, np.asarray(oof.data["folds"]))


def shares_markdown(point: dict[str, Any]) -> str:
    """The operating point's shares as the markdown tables of the model card."""
    lines = [
        "A header is confirmed (`agree`) when the calibrated probability of its label is at least that "
        "label's `agree_at`, refuted (`disagree`) when at most its `disagree_at`, `uncertain` in between. "
        f"Chosen on {point['n']} out-of-fold images so that at most {TARGETS['false_disagree']:.0%} of "
        "right headers are refuted, that budget spent on the labels where it catches the most "
        "relabelled copies (every image once under each other label's header), and at most "
        f"{point['max_false_agree']:.0%} of the copies relabelled to any one label are confirmed."
        + (
            f" Every `disagree_at` is then multiplied by {point['shrink']:.2f}: the largest factor at "
            f"which thresholds chosen on all folds but one refute at most {TARGETS['false_disagree']:.0%} "
            "of that fold's right headers, so that the budget holds on sources the thresholds never saw."
            if point.get("shrink", 1.0) < 1.0
            else ""
        ),
        "",
        "| | right header: agree | right header: disagree | relabelled: disagree | relabelled: agree |",
        "|---|---:|---:|---:|---:|",
        f"| target | >= {TARGETS['agree']:.2f} | <= {TARGETS['false_disagree']:.2f} | "
        f">= {TARGETS['caught']:.2f} | |",
    ]
    rows = [("per image", point["images"]), ("per source", point["sources"])]
    cross = point.get("cross_fitted")
    if cross:
        rows += [
            ("per image, cross-fitted", cross["images"]),
            ("per source, cross-fitted", cross["sources"]),
        ]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['agree']:.3f} | {s['false_disagree']:.3f} | {s['caught']:.3f} | "
            f"{s['false_agree']:.3f} |"
        )
    if cross:
        lines += [
            "",
            f"Cross-fitted: each of the {cross['folds']} folds' images judged by thresholds chosen, factor "
            "included, on the other folds alone, as an archive meets thresholds chosen on sources it "
            "does not hold (factors "
            + ", ".join(f"{v:.2f}" for v in cross["shrink_per_fold"].values())
            + "). The first two rows are in-sample: chosen and scored on the same images, so their "
            "right headers refuted stay within the budget by construction.",
        ]
    lines += [
        "",
        "| header label | agree_at | disagree_at | right headers | agree | disagree | "
        "relabelled to it: disagree | relabelled: agree |"
        + (" cross-fitted: agree | disagree | relabelled: disagree | relabelled: agree |" if cross else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 4 if cross else ""),
    ]
    for label, r in point["per_label"].items():
        held = (
            "".join(f" {cross['per_label'][label][key]:.3f} |" for key in HELD_OUT_COLUMNS) if cross else ""
        )
        lines.append(
            f"| {label} | {r['agree_at']:.4g} | {r['disagree_at']:.4g} | {r['right']} | {r['agree']:.3f} | "
            f"{r['false_disagree']:.3f} | {r['caught']:.3f} | {r['false_agree']:.3f} |{held}"
        )
    if point.get("emission"):
        lines += ["", *_emission_markdown(point)]
    return "\n".join(lines) + "\n"


def _emission_markdown(point: dict[str, Any]) -> list[str]:
    """The radionuclide's confirmation at ``emission_agree_at``, as :func:`shares_markdown` ends."""
    lines = [
        f"A PT or NM header whose radionuclide only its own scanner images (F-18 for PT, Tc-99m for NM) is "
        f"also confirmed where PT and NM together reach `emission_agree_at` = "
        f"{point['emission_agree_at']:.4g}: the pixels leave room for emission imaging, the nuclide says "
        f"which. Chosen, as `agree_at` is, so that at most {point['max_false_agree']:.0%} of the other "
        "labels' images would pass. "
        "Shares were every image to name such a nuclide (as stored, many name none):",
        "",
        "| header label | right headers | agree: pixels | agree: PT + NM at agree_at | "
        "agree: at emission_agree_at | other labels' images | their agree: pixels | at agree_at | "
        "at emission_agree_at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in point["emission"].items():
        lines.append(
            f"| {label} | {r['right']} | {r['agree_pixels']:.3f} | {r['agree_at_agree_at']:.3f} | "
            f"{r['agree_at_emission_agree_at']:.3f} | {r['others']} | {r['others_agree_pixels']:.3f} | "
            f"{r['others_agree_at_agree_at']:.3f} | {r['others_agree_at_emission_agree_at']:.3f} |"
        )
    return lines


__all__ = [
    "TARGETS",
    "HeaderShares",
    "as_thresholds",
    "by_header_label",
    "choose",
    "choose_emission",
    "choose_held_out",
    "choose_shrink",
    "cross_fitted",
    "emission_shares",
    "header_shares",
    "operating_point",
    "point_for",
    "shares_markdown",
]
