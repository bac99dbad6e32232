"""Enums and frozen dataclasses shared by every layer; no I/O here."""

from __future__ import annotations

import enum
import math
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
    #: Image Type (0008,0008) names LOCALIZER: a scout, topogram or surview.
    localizer: bool = False
    #: The first radiopharmaceutical's Radionuclide Code Sequence (0054,0016)/(0054,0300) code
    #: value (C-111A1, 77004003 ...): which scanner can have imaged it (:mod:`sorter.nuclides`).
    radionuclide: str | None = None


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


@dataclass(frozen=True)
class Witnesses:
    """What a header's other attributes say about its Modality's label (:func:`sorter.compare.compare`;
    :func:`sorter.compare.witnesses_of` reads them as every path that classifies does)."""

    # The labels its SOP class allows, when they exclude the Modality's (taxonomy.class_contradiction).
    contradicted_by: frozenset[Label] | None = None
    # The labels its radionuclide allows, when they exclude the header's (nuclides.nuclide_contradiction).
    nuclide_allows: frozenset[Label] | None = None
    # Its radionuclide is one only the header's scanner images (nuclides.nuclide_confirms).
    nuclide_confirms: bool = False


#: A header with nothing but its Modality to go on.
NO_WITNESSES = Witnesses()


@dataclass(frozen=True)
class Claimed:
    """An instance taken for classification: what the decode side needs."""

    id: int
    path: str
    header_label: Label | None
    status: Status = Status.PENDING  # DONE: classified before (`sorter reclassify`)
    sop_instance_uid: str | None = None
    witnesses: Witnesses = NO_WITNESSES


@dataclass(frozen=True)
class Outcome:
    """The terminal result for one instance."""

    instance_id: int
    status: Status
    header_label: Label | None = None
    prediction: Prediction | None = None
    verdict: Verdict | None = None
    error: str | None = None
    detail: str | None = None
    # A classified instance whose file could not be read again (deleted by `watch --after delete`
    # or spool retention, moved, changed): ``status`` and ``error`` say why, but the instance
    # keeps its status and earlier predictions (it was turned into ``failed``).
    kept: bool = False


@dataclass(frozen=True)
class Thresholds:
    """The verdict's operating point (see :func:`sorter.compare.compare`).

    With ``agree_at`` and ``disagree_at`` (per header label; models since the
    header test) the verdict tests the header: ``agree`` when the calibrated
    probability of the header's label is at least ``agree_at[label]``,
    ``disagree`` when it is at most ``disagree_at[label]``, ``uncertain`` in
    between. They are chosen on leave-sources-out predictions
    (``train/operating_point.py``), per label because the model refutes a CT
    header far more safely than an NM one. Without them (older artefacts) a
    prediction must be confident (both bounds below hold) and its argmax decides.

    ``emission_agree_at`` (models since 2026-12-06) is where a PT or NM header that its
    radionuclide confirms is ``agree``: the probability of emission imaging, PT and NM together,
    at which no more than the share of other labels' images that ``agree_at`` lets through would
    pass. ``None`` (older artefacts): that header label's own ``agree_at``.
    """

    min_confidence: float = 0.8
    min_margin: float = 0.2
    agree_at: dict[str, float] = field(default_factory=dict)
    disagree_at: dict[str, float] = field(default_factory=dict)
    emission_agree_at: float | None = None

    def __post_init__(self) -> None:
        if set(self.agree_at) != set(self.disagree_at):
            raise ValueError("agree_at and disagree_at must name the same labels")
        if self.emission_agree_at is not None and not 0.0 < self.emission_agree_at <= 1.0:
            raise ValueError(f"emission_agree_at must be in (0, 1], not {self.emission_agree_at}")
        for label, high in self.agree_at.items():
            low = self.disagree_at[label]
            if not 0.0 <= low < high <= 1.0:
                raise ValueError(f"{label}: need 0 <= disagree_at < agree_at <= 1, not {low}, {high}")

    @property
    def header_test(self) -> bool:
        """True when the verdict tests the header's probability (see the class docstring)."""
        return bool(self.agree_at)

    def bounds(self, label: Label) -> tuple[float, float] | None:
        """``(agree_at, disagree_at)`` for a header of ``label``, or ``None`` without the header test."""
        if label.value not in self.agree_at:
            return None
        return self.agree_at[label.value], self.disagree_at[label.value]

    def emission_bound(self, label: Label) -> float | None:
        """Where PT and NM together confirm a ``label`` header its radionuclide confirms, or
        ``None`` without the header test for it. Always above the label's ``disagree_at``, as its
        ``agree_at`` is: a header that all of emission imaging's probability would leave refuted
        stays refuted."""
        bounds = self.bounds(label)
        if bounds is None:
            return None
        agree_at, disagree_at = bounds
        if self.emission_agree_at is None:
            return agree_at
        return max(self.emission_agree_at, math.nextafter(disagree_at, 1.0))


class FailureReason(enum.StrEnum):
    """Why an instance ended ``failed`` or ``skipped``: stored in ``instances.error`` and printed by
    ``sorter classify``, so the values are stable. A StrEnum: each member is its string (SQL
    parameters, JSON and comparisons with stored values see the string)."""

    NOT_DICOM = "not_dicom"
    TRUNCATED = "truncated"
    NO_PIXEL_DATA = "no_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    DECODE_ERROR = "decode_error"
    NON_IMAGE = "non_image"
    BLANK = "blank"
    UNREADABLE = "unreadable"
    PERMISSION_DENIED = "permission_denied"
    VANISHED = "vanished"
    BROKEN_SYMLINK = "broken_symlink"
    SYMLINK_LOOP = "symlink_loop"
    NOT_REGULAR_FILE = "not_regular_file"
    HEADER_ERROR = "header_error"
    SYMLINK_DUPLICATE = "symlink_duplicate"
    RETRIES_EXHAUSTED = "retries_exhausted"
    TASK_ERROR = "task_error"
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
