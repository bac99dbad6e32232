"""Rebuild the decoded cache from pack.py's parts under the key this machine computes: the corpus
is not here, so the key differs from the one the cache was made under.

    python3 .devcache/b/unpack.py /root/keep/a
"""

import lzma
import sys
from pathlib import Path

import numpy as np

from train.config import resolve_config
from train.data import DecodeOptions, _cache_key
from train.runs import select_rows

PART_B = Path(".devcache/b")


def _array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    with lzma.open(path) as fh:
        return np.frombuffer(fh.read(), np.float16).reshape(shape).astype(np.float32)


def main(part_a: Path) -> None:
    """Write ``.cache/sorter-train/images-<key>.npz`` for the packed manifest."""
    meta = np.load(PART_B / "meta.npz")
    cfg = resolve_config("default", Path("train/recipes/pretrained.yaml"))
    rows = select_rows(PART_B / "manifest.csv", cfg)
    options = DecodeOptions(cfg.max_frames, cfg.axial_slices, cfg.reformat_slices)
    key = _cache_key(rows, cfg.preprocess(), cfg.cache_size, options)
    raw = _array(PART_B / "raw.f16.xz", tuple(meta["raw_shape"])) * meta["scale"][:, None, None]
    evaluation = _array(part_a / "eval.f16.xz", tuple(meta["eval_shape"]))
    out = Path(cfg.cache_dir or ".cache/sorter-train") / f"images-{key}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: meta[k] for k in ("features", "labels", "sources", "groups", "rows", "failures")}
    np.savez(out, raw=raw, eval=evaluation, **kept)
    print("cache", out, raw.shape, evaluation.shape, len(rows), "rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
