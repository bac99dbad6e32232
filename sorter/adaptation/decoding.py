"""The decode side of an adaptation, torch-free: what its worker processes import."""

from __future__ import annotations

from sorter.decode import Prepared, decode_one
from sorter.domain import Claimed
from sorter.model.spec import PreprocessParams


def decode_chunk(args: tuple[list[tuple[int, str]], PreprocessParams, int]) -> list[Prepared | str]:
    """Decode and preprocess ``(instance id, path)`` pairs the service's way; a file that fails
    gives its one-line reason instead."""
    items, params, frames = args
    out: list[Prepared | str] = []
    for instance_id, path in items:
        result = decode_one(Claimed(instance_id, path, None), params, frames)
        out.append(result if isinstance(result, Prepared) else f"{result.error}: {result.detail}")
    return out
