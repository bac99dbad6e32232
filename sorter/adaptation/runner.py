"""``sorter adapt`` step by step, resumable from its work folder.

1. sample (:mod:`sorter.adaptation.sample`) and deal folds by study; the sample and folds are
   written to ``OUT/state.json`` first, so a resumed run works on the same instances;
2. embed the sample with the current model (``OUT/embeddings-NNN.npz``, one per block of
   instances: an interrupted run keeps the blocks it finished);
3. cross-fit the head (``OUT/fold-K.npz`` per finished fold), calibrate, score label issues;
4. fit the final head and write the adapted artefact ``OUT/model.pt`` and ``OUT/MODEL_CARD.md``;
5. store it all (``sorter.adaptation.store``) in one transaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sorter.adaptation.crossfit import HeadRecipe
from sorter.adaptation.sample import Candidate, assign_folds, sample
from sorter.errors import SorterError
from sorter.fsutil import atomic_file

log = logging.getLogger(__name__)

#: Instances per embeddings file: the unit an interrupted run keeps.
BLOCK = 2048


class AdaptError(SorterError):
    """An adaptation cannot start or go on; the message says why and what to do."""


@dataclass(frozen=True)
class Options:
    """What to sample and how to fit (``sorter adapt``'s options)."""

    per_label: int = 2000
    per_series: int = 3
    folds: int = 5
    seed: int = 0
    frames: int = 1
    recipe: HeadRecipe = field(default_factory=HeadRecipe)

    def key(self) -> dict[str, Any]:
        """What a resumed run must share with the run that started the folder."""
        return asdict(self)


@dataclass
class Plan:
    """The sample, its folds, and where its files are."""

    chosen: list[Candidate]
    fold_of: dict[str, int]
    paths: dict[int, str]

    def folds(self) -> np.ndarray:
        """Fold per sampled instance, in sample order."""
        return np.asarray([self.fold_of[c.study] for c in self.chosen], dtype=np.int64)


def plan(
    out: Path,
    candidates: Callable[[], tuple[list[Candidate], dict[int, str]]],
    options: Options,
    base_sha256: str,
    restart: bool = False,
) -> Plan:
    """The run's sample: from ``OUT/state.json`` when resuming, else drawn and written there."""
    state_file = out / "state.json"
    wanted = {"options": options.key(), "base_sha256": base_sha256}
    if state_file.exists() and not restart:
        state = json.loads(state_file.read_text())
        if {k: state.get(k) for k in wanted} != wanted:
            raise AdaptError(
                f"{out} holds an adaptation with other options or another starting model; "
                "use another --out, or --restart to start this folder over"
            )
        chosen = [Candidate(*row[:5]) for row in state["sample"]]
        return Plan(
            chosen,
            {c.study: int(row[5]) for c, row in zip(chosen, state["sample"], strict=True)},
            {int(k): v for k, v in state["paths"].items()},
        )
    if restart and out.exists():
        for old in [*out.glob("embeddings-*.npz"), *out.glob("fold-*.npz")]:
            old.unlink()
    pool, paths = candidates()
    chosen = sample(pool, options.per_label, options.per_series, options.seed)
    if not chosen:
        raise AdaptError("nothing to adapt on: no classified instance with a header Modality")
    labels = {c.header_label for c in chosen}
    if len(labels) < 2:
        raise AdaptError(
            f"the archive's sample holds one header label only ({labels.pop()}): nothing to contrast"
        )
    studies = {c.study for c in chosen}
    if len(studies) < options.folds:
        raise AdaptError(
            f"{len(studies)} studies in the sample, fewer than --folds {options.folds}: lower --folds"
        )
    fold_of = assign_folds(chosen, options.folds, options.seed)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        **wanted,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sample": [
            [c.instance_id, c.header_label, c.source, c.study, c.series, fold_of[c.study]] for c in chosen
        ],
        "paths": {str(c.instance_id): paths[c.instance_id] for c in chosen},
    }
    with atomic_file(state_file, "w") as handle:
        handle.write(json.dumps(state))
    return Plan(chosen, fold_of, paths)


def embed_blocks(
    out: Path,
    items: Sequence[tuple[int, str]],
    embed: Callable[[Sequence[tuple[int, str]]], tuple[np.ndarray, np.ndarray, dict[int, str]]],
    on_skip: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Embeddings of ``items``, block by block; blocks finished by an earlier run are read back."""
    ids, vectors, failures = [], [], {}
    for n, start in enumerate(range(0, len(items), BLOCK)):
        block = items[start : start + BLOCK]
        path = out / f"embeddings-{n:03d}.npz"
        if path.exists():
            with np.load(path) as data:
                b_ids, b_vec, b_fail = data["ids"], data["vectors"], json.loads(str(data["failures"]))
            if on_skip is not None:
                on_skip(len(block))
        else:
            b_ids, b_vec, b_fail = embed(block)
            with atomic_file(path) as handle:
                np.savez(
                    handle,
                    ids=b_ids,
                    vectors=b_vec,
                    failures=json.dumps({str(k): v for k, v in b_fail.items()}),
                )
        ids.append(b_ids)
        vectors.append(b_vec)
        failures.update({int(k): v for k, v in b_fail.items()})
    width = vectors[0].shape[1] if vectors else 0
    return (
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(vectors) if vectors else np.zeros((0, width), np.float32),
        failures,
    )


def fold_store(out: Path) -> tuple[Callable[[int], np.ndarray | None], Callable[[int, np.ndarray], None]]:
    """``done`` and ``save`` callbacks of :func:`sorter.adaptation.crossfit.cross_fit` over ``OUT``."""

    def done(k: int) -> np.ndarray | None:
        path = out / f"fold-{k}.npz"
        if not path.exists():
            return None
        with np.load(path) as data:
            return np.asarray(data["logits"])

    def save(k: int, logits: np.ndarray) -> None:
        path = out / f"fold-{k}.npz"
        with atomic_file(path) as handle:
            np.savez(handle, logits=logits)

    return done, save
