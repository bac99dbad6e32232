"""A decode function for the executor tests, in a module light enough for decode processes to import."""

from __future__ import annotations

import os

from sorter.db.queries import Claimed
from sorter.domain import Status
from sorter.model.spec import PreprocessParams
from sorter.pipeline import Outcome, Prepared, decode_one


def crashing_decode(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """Decode like the pipeline, but die the way a segfaulting codec does on ``boom.dcm``."""
    if item.path.endswith("boom.dcm"):
        os._exit(139)
    return decode_one(item, params, frames)


def report_torch(item: Claimed, params: PreprocessParams, frames: int = 1) -> Prepared | Outcome:
    """Say in the outcome whether torch is loaded in this decode process."""
    import sys

    return Outcome(item.id, Status.SKIPPED, None, error="probe", detail=str("torch" in sys.modules))
