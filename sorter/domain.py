"""Enums and frozen dataclasses shared by every layer; no I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Label(enum.StrEnum):
    """Visual modality labels the model may emit (ARCHITECTURE §3)."""

    CT = "CT"
    MR = "MR"
    PT = "PT"
    NM = "NM"
    XR = "XR"
    MG = "MG"
    US = "US"
    OT = "OT"


ALL_LABELS: tuple[Label, ...] = tuple(Label)


class Verdict(enum.StrEnum):
    """Outcome of comparing the header label with the predicted label."""

    AGREE = "agree"
    DISAGREE = "disagree"
    UNCERTAIN = "uncertain"
    NO_HEADER = "no_header"
    UNSUPPORTED = "unsupported"


class Status(enum.StrEnum):
    """Life cycle of one instance; ``done``, ``failed`` and ``skipped`` are terminal."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class InstanceHeader:
    """The header attributes read without pixel data.

    Institution and station names are kept because users group archives by
    them; patient-identifying attributes are deliberately never read.
    """

    path: str
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    transfer_syntax_uid: str | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    institution_name: str | None = None
    station_name: str | None = None


@dataclass(frozen=True)
class Prediction:
    """Calibrated model output for one image."""

    label: Label
    confidence: float
    second_label: Label
    second_confidence: float
    probabilities: dict[Label, float] = field(default_factory=dict)

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 probability."""
        return self.confidence - self.second_confidence
