"""A decode function for the executor tests, in a module light enough for decode processes to import."""

from __future__ import annotations

import os
import pickle

from sorter.db.queries import Claimed
from sorter.decode import Prepared, decode_one
from sorter.domain import Outcome, Status
from sorter.model.spec import PreprocessParams


def crashing_decode(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """Decode like the pipeline, but die the way a segfaulting codec does on ``boom.dcm``."""
    if item.path.endswith("boom.dcm"):
        os._exit(139)
    return decode_one(item, params, frames)


def report_torch(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """Say in the outcome whether torch is loaded in this decode process."""
    import sys

    return Outcome(item.id, Status.SKIPPED, None, error="probe", detail=str("torch" in sys.modules))


class FakePanic(BaseException):
    """What a Rust codec raises through PyO3 (``pyo3_runtime.PanicException``): a ``BaseException``
    that cannot be pickled back to the scanning process."""

    def __reduce__(self) -> str | tuple[object, ...]:
        raise pickle.PicklingError("a panic cannot be pickled")


def panicking_decode(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """Decode like the pipeline, but panic the way pylibjpeg-rle does on ``panic.dcm``."""
    if item.path.endswith("panic.dcm"):
        raise FakePanic("index out of bounds: the len is 8192 but the index is 8192")
    return decode_one(item, params, frames)
