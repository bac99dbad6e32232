"""The model spec: everything serving needs to reproduce training's view of an image.

The spec travels inside the artefact (ARCHITECTURE §5); training builds it,
serving reads it, and no parameter lives in two places.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sorter.domain import Label, Thresholds
from sorter.errors import IncompatibleModelError

#: Bump when the artefact layout or the meaning of a spec field changes.
FORMAT_VERSION = 1

ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16_bn",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)
CHANNELS = ("scaled", "hu")
#: Scalar inputs beside the image: ``colourfulness`` (0 for greyscale), ``matrix``
#: (the frame's larger side, log2-scaled from 64 px = 0 to 4 096 px = 1) and
#: ``aspect`` (shorter side / longer side): the letterboxed, resized image loses both.
FEATURES = ("colourfulness", "matrix", "aspect")
SCALINGS = ("minmax", "percentile")
#: ``bilinear``: Pillow's antialiased bilinear filter over the whole reduction (the
#: models up to 0.1); ``reduce``: box-average by the largest integer factor first
#: (Pillow's ``reducing_gap=1``), then bilinear for the rest, 2.5x cheaper.
RESIZES = ("bilinear", "reduce")


#: The default ``hu`` window; every artefact without ``hu_low``/``hu_high`` in its spec used it.
HU_WINDOW = (-1000.0, 2000.0)


@dataclass(frozen=True)
class PreprocessParams:
    """How a decoded grey frame becomes network input.

    ``scaling`` is the paper's per-image ``minmax`` or a robust ``percentile``
    clip between ``p_low`` and ``p_high``. ``letterbox`` pads to a square
    before resizing so that shape (a tall mammogram, a wide panoramic) survives.
    """

    input_size: int = 128
    scaling: str = "percentile"
    p_low: float = 0.5
    p_high: float = 99.5
    letterbox: bool = True
    channels: tuple[str, ...] = ("scaled",)
    features: tuple[str, ...] = ("colourfulness",)
    resize: str = "bilinear"  # artefacts written before the field existed used bilinear
    # The ``hu`` channel's window (values after the Modality LUT): air .. dense bone. Part of the
    # spec, so that serving and training read it from one place; artefacts written before the
    # fields existed used exactly this window.
    hu_low: float = HU_WINDOW[0]
    hu_high: float = HU_WINDOW[1]

    def __post_init__(self) -> None:
        if not self.hu_low < self.hu_high:
            raise ValueError(f"hu window must rise: {self.hu_low} .. {self.hu_high}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, not {self.scaling!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, not {self.resize!r}")
        for name in self.channels:
            if name not in CHANNELS:
                raise ValueError(f"unknown input channel {name!r}; known: {CHANNELS}")
        for name in self.features:
            if name not in FEATURES:
                raise ValueError(f"unknown feature {name!r}; known: {FEATURES}")
        if not 16 <= self.input_size <= 1024:
            raise ValueError(f"input_size {self.input_size} is outside 16..1024")


@dataclass(frozen=True)
class ScreenSpec:
    """A fast network that answers first, so that the main network sees only the frames it is unsure of.

    Same inputs and labels as the main network. A frame whose top probability under the screen's
    own calibration (``temperature``) is at least ``thresholds`` of the label it predicts keeps
    the screen's answer; every other frame goes through the main network
    (:class:`sorter.model.network.CascadeNet`). A threshold of 1 sends every frame the screen
    calls that label to the main network.
    """

    arch: str
    temperature: float
    thresholds: dict[str, float]

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown screen architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if self.temperature <= 0:
            raise ValueError("screen temperature must be positive")
        for label, threshold in self.thresholds.items():
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"screen threshold {threshold} for {label} is outside 0..1")


@dataclass(frozen=True)
class PartnerSpec:
    """A second network whose opinion is averaged with the main network's on every frame.

    Same inputs and labels as the main network. The output is ``(1 - weight) x`` the main
    network's logits over its own ``main_temperature`` plus ``weight x`` the partner's over its
    ``temperature``; the spec's temperature then calibrates the average
    (:class:`sorter.model.network.EnsembleNet`).

    ``confirm`` (per label, optional): where the partner alone, under its own temperature, gives
    the label the header names at least this probability, the frame keeps the partner's answer and
    the main network is skipped. The partner may only *confirm* a header, never refute one, so a
    frame without a header, or whose header the partner doubts, always gets the full average. The
    network confirms at no less than the operating point's ``agree_at`` of that label, so a
    confirmed frame is always ``agree``. Chosen on leave-sources-out predictions
    (``sorter-train ensemble --confirm``).
    """

    arch: str
    temperature: float
    main_temperature: float
    weight: float = 0.5
    confirm: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown partner architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if self.temperature <= 0 or self.main_temperature <= 0:
            raise ValueError("partner and main temperatures must be positive")
        if not 0.0 < self.weight < 1.0:
            raise ValueError(f"partner weight {self.weight} is outside (0, 1)")
        for label, threshold in (self.confirm or {}).items():
            if not 0.5 < threshold <= 1.0:  # above 0.5: a confirmed frame's top label is the header's
                raise ValueError(f"partner confirm threshold {threshold} for {label} is outside (0.5, 1]")


@dataclass(frozen=True)
class ModelSpec:
    """Self-description of a trained classifier (with a :class:`ScreenSpec` when it is a cascade)."""

    arch: str
    labels: tuple[Label, ...]
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    temperature: float = 1.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    screen: ScreenSpec | None = None
    partner: PartnerSpec | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError("labels must be at least two distinct labels")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.screen is not None and set(self.screen.thresholds) != {label.value for label in self.labels}:
            raise ValueError("a screen needs one threshold per label")
        if self.screen is not None and self.partner is not None:
            raise ValueError("a model has a screen or a partner, not both")
        confirm = None if self.partner is None else self.partner.confirm
        if confirm is not None and set(confirm) != {label.value for label in self.labels}:
            raise ValueError("a confirming partner needs one threshold per label")

    @property
    def confirms(self) -> bool:
        """True when the network takes the header (its partner may confirm it: :class:`PartnerSpec`)."""
        return self.partner is not None and self.partner.confirm is not None

    def header_codes(self, headers: Sequence[Label | None]) -> np.ndarray:
        """The network's ``header`` input for ``headers``: each one's index among :attr:`labels`,
        -1 for none or a label the model does not know (int64, one per instance)."""
        index = {label: i for i, label in enumerate(self.labels)}
        return np.asarray([index.get(h, -1) if h is not None else -1 for h in headers], dtype=np.int64)

    @property
    def network_name(self) -> str:
        """The architecture as the ``models`` table shows it (at most 64 characters): ``main (screen
        screen)`` for a cascade, ``main + partner`` for an ensemble, ``main + partner (confirms
        headers)`` when its partner confirms headers alone."""
        if self.screen is not None:
            return f"{self.arch} ({self.screen.arch} screen)"
        if self.partner is None:
            return self.arch
        return f"{self.arch} + {self.partner.arch}" + (" (confirms headers)" if self.confirms else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready representation (labels as strings)."""
        data = asdict(self)
        data["labels"] = [label.value for label in self.labels]
        data["preprocess"]["channels"] = list(self.preprocess.channels)
        data["preprocess"]["features"] = list(self.preprocess.features)
        if (self.preprocess.hu_low, self.preprocess.hu_high) == HU_WINDOW:
            # The default window stays implicit, so that releases before the fields still read
            # the artefacts this one writes.
            del data["preprocess"]["hu_low"], data["preprocess"]["hu_high"]
        for second in ("screen", "partner"):  # implicit too: a single network's spec reads as it always did
            if getattr(self, second) is None:
                del data[second]
        if self.partner is not None and self.partner.confirm is None:
            del data["partner"]["confirm"]  # an ensemble without it reads in releases before the field
        if self.thresholds.emission_agree_at is None:
            del data["thresholds"]["emission_agree_at"]  # likewise a model without it
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Rebuild a spec, refusing artefacts written by an incompatible format."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise IncompatibleModelError(
                f"model format version {version!r} is not supported by this dicom-sorter "
                f"(it reads version {FORMAT_VERSION}); re-export the model with a matching release"
            )
        try:
            pre = dict(data.get("preprocess", {}))
            pre["channels"] = tuple(pre.get("channels", ("scaled",)))
            pre["features"] = tuple(pre.get("features", ()))
            return cls(
                arch=data["arch"],
                labels=tuple(Label(v) for v in data["labels"]),
                preprocess=PreprocessParams(**pre),
                temperature=float(data.get("temperature", 1.0)),
                thresholds=Thresholds(**data.get("thresholds", {})),
                training=dict(data.get("training", {})),
                metrics=dict(data.get("metrics", {})),
                format_version=version,
                screen=ScreenSpec(**data["screen"]) if data.get("screen") else None,
                partner=PartnerSpec(**data["partner"]) if data.get("partner") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IncompatibleModelError(f"model spec is malformed: {exc}") from exc
