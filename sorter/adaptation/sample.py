"""Which instances an adaptation learns from, and which fold each one is held out in.

An archive is lopsided in every direction: one CT scanner writes half of it, one study holds
2 000 slices, a rare label lives in three series. The sample is drawn so that the adapted model
sees the archive's variety rather than its bulk: balanced by header label (at most
``per_label``), within a label by source (station / institution / calling AE), within a source
by study, within a study by series, with at most ``per_series`` instances of any series
(neighbouring slices teach little that their series has not). Each level is interleaved
round-robin, so cutting the list at ``per_label`` keeps every source, then every study, as
evenly represented as the archive allows.

Folds are dealt by study: all sampled instances of a study share a fold, so a model never
predicts a study it has seen part of. Studies are dealt label by label to the fold that holds
fewest of that label so far, which keeps every label in every fold's training set where the
archive has enough studies of it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One classified instance that may be sampled: its header label and where it came from."""

    instance_id: int
    header_label: str
    source: str  # station / institution / calling AE / scan source, joined (see store.source_key)
    study: str
    series: str


def interleave(groups: Sequence[Sequence[T]]) -> list[T]:
    """Round-robin over ``groups``: the first of each, then the second of each, and so on."""
    out: list[T] = []
    longest = max((len(g) for g in groups), default=0)
    for i in range(longest):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _spread(items: Sequence[T], keep: int) -> list[T]:
    """``keep`` evenly spaced items of ``items`` (all of them when there are no more)."""
    if len(items) <= keep:
        return list(items)
    step = len(items) / keep
    return [items[int(i * step + step / 2)] for i in range(keep)]


def _shuffled(keys: Iterable[str], rng: random.Random) -> list[str]:
    ordered = sorted(keys)
    rng.shuffle(ordered)
    return ordered


def sample(
    candidates: Iterable[Candidate], per_label: int, per_series: int, seed: int = 0
) -> list[Candidate]:
    """The training sample: per header label at most ``per_label`` instances, balanced by source,
    then study, then series, with at most ``per_series`` per series (see the module docstring).

    Deterministic for a given ``seed`` and set of candidates, whatever their order. Within a
    series the kept instances are evenly spaced in instance-id order (the order they were
    registered, which for a scanned folder follows its files).
    """
    if per_label < 1 or per_series < 1:
        raise ValueError("per_label and per_series must be at least 1")
    tree: dict[str, dict[str, dict[str, dict[str, list[Candidate]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    )
    for c in candidates:
        tree[c.header_label][c.source][c.study][c.series].append(c)
    rng = random.Random(seed)
    chosen: list[Candidate] = []
    for label in sorted(tree):
        by_source = tree[label]
        per_source: list[list[Candidate]] = []
        for source in _shuffled(by_source, rng):
            per_study: list[list[Candidate]] = []
            for study in _shuffled(by_source[source], rng):
                series_lists = [
                    _spread(sorted(by_source[source][study][s], key=lambda c: c.instance_id), per_series)
                    for s in _shuffled(by_source[source][study], rng)
                ]
                per_study.append(interleave(series_lists))
            per_source.append(interleave(per_study))
        chosen.extend(interleave(per_source)[:per_label])
    return chosen


def assign_folds(chosen: Sequence[Candidate], folds: int, seed: int = 0) -> dict[str, int]:
    """Fold of every study in ``chosen`` (0 .. folds-1); a study never spans two folds.

    Studies are taken label by label (a study counts under the label most of its sampled
    instances carry), largest first, each to the fold with the fewest instances of that label so
    far (ties: fewest instances overall, then the lowest fold).
    """
    if folds < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    size: dict[str, int] = defaultdict(int)
    labels: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for c in chosen:
        size[c.study] += 1
        labels[c.study][c.header_label] += 1
    main_label = {s: max(sorted(counts), key=lambda lab: counts[lab]) for s, counts in labels.items()}
    rng = random.Random(seed)
    studies = _shuffled(size, rng)  # random order among equal sizes
    studies.sort(key=lambda s: (main_label[s], -size[s]))
    per_label_load: dict[str, list[int]] = defaultdict(lambda: [0] * folds)
    load = [0] * folds
    fold_of: dict[str, int] = {}
    for study in studies:
        label_load = per_label_load[main_label[study]]
        fold = min(range(folds), key=lambda f: (label_load[f], load[f], f))
        fold_of[study] = fold
        label_load[fold] += size[study]
        load[fold] += size[study]
    return fold_of
