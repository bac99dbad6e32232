"""Source-level splits: never by slice, never by file.

A source is an archive, a scanner or a public collection; images of one
source share acquisition, export and anonymisation quirks that a network
learns happily. Holding whole sources out is what measures generalisation to
an archive the model has never seen.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from train.manifest import ManifestRow


def _sources_by_label(rows: Sequence[ManifestRow]) -> dict[str, list[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        found[row.label].add(row.source)
    return {label: sorted(sources) for label, sources in sorted(found.items())}


def validation_sources(rows: Sequence[ManifestRow], fraction: float, seed: int = 0) -> set[str]:
    """Pick about ``fraction`` of each label's sources for validation.

    Labels with fewer than three sources keep all of them for training: the
    model could not learn a label it never saw.
    """
    if fraction <= 0:
        return set()
    rng = random.Random(seed)
    held: set[str] = set()
    for _label, sources in _sources_by_label(rows).items():
        if len(sources) < 3:
            continue
        candidates = [s for s in sources if s not in held]
        rng.shuffle(candidates)
        already = sum(1 for s in sources if s in held)
        want = max(1, round(fraction * len(sources))) - already
        held.update(candidates[: max(0, want)])
    return held


def assign_folds(rows: Sequence[ManifestRow], k: int, seed: int = 0) -> dict[str, int]:
    """Map every source to one of ``k`` folds (``k`` = 0: one fold per source).

    Sources are dealt label by label, rarest label first, so that each fold
    holds out a mix of labels and no fold removes every source of a label.
    """
    by_label = _sources_by_label(rows)
    all_sources = sorted({row.source for row in rows})
    if k <= 0 or k >= len(all_sources):
        return {source: i for i, source in enumerate(all_sources)}
    rng = random.Random(seed)
    fold_of: dict[str, int] = {}
    next_fold = 0
    for _label, sources in sorted(by_label.items(), key=lambda item: len(item[1])):
        pending = [s for s in sources if s not in fold_of]
        rng.shuffle(pending)
        for source in pending:
            fold_of[source] = next_fold % k
            next_fold += 1
    return fold_of
