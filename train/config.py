"""Training configuration: presets, YAML defaults, CLI overrides, resolved copy saved with outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from sorter.domain import ALL_LABELS
from sorter.model.spec import ModelSpec, PreprocessParams


@dataclass(frozen=True)
class FitConfig:
    """Every knob of a training run; the resolved copy is written to ``config.yaml``."""

    arch: str = "mobilenet_v3_small"
    # Initialise the backbone from ImageNet weights shipped by a pinned package (efficientnet_lite0
    # only; see sorter.model.network.PRETRAINED); the head stays random. Recorded in the spec.
    pretrained: bool = False
    input_size: int = 128
    scaling: str = "percentile"
    letterbox: bool = True
    channels: tuple[str, ...] = ("scaled", "hu")
    features: tuple[str, ...] = ("colourfulness",)
    resize: str = "bilinear"  # or "reduce" (2.5x cheaper); see sorter.model.spec.RESIZES and the README
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    backbone_lr_scale: float = 1.0  # the backbone's learning rate is lr times this (e.g. 0.1 when pretrained)
    momentum: float = 0.9
    weight_decay: float = 0.05
    schedule: str = "cosine"  # cosine | plateau
    epochs: int = 10
    # Linear probing before fine-tuning (LP-FT, Kumar et al., ICLR 2022): this many epochs train
    # the head alone on the frozen pretrained backbone before the `epochs` of full fine-tuning,
    # so that fine-tuning starts from a fitted head and distorts the pretrained features less.
    probe_epochs: int = 0
    # Weight averaging (SWA, Izmailov et al., 2018; dense as in SWAD, Cha et al., NeurIPS 2021):
    # from this fraction of the fine-tuning epochs on, the weights after every step are averaged
    # uniformly and the average is the trained network (its BatchNorm statistics re-estimated).
    # Averages lie in flatter minima, which SWAD found to generalise better to unseen domains.
    # 0 = off (the last step's weights).
    average_from: float = 0.0
    epoch_size: int = 2048  # images drawn per epoch by the balanced sampler
    batch_size: int = 64
    label_smoothing: float = 0.05
    # Acquisition-shift augmentation (8-bit exports, JPEG, text, borders, inversion, resolution;
    # train/augment.py): 0 = off, 1 = the rates in augment.SHIFT_RATES.
    shift_augment: float = 0.0
    # Probability that a frame of a label without physical units (all but CT) is multiplied by a
    # random gain (train/augment.py, unit_gain), so that the hu channel cannot learn each
    # training source's storage scale (SUV, Bq/ml, counts) as the label's. 0 = off.
    unit_augment: float = 0.0
    # Probability that a frame of a label read in either polarity (NM, PT: scintigrams, MIPs and
    # exports are shown black on white as often as white on black) is inverted in training
    # (train/augment.py, polarity_flip). 0 = off.
    polarity_augment: float = 0.0
    # The labels whose frames polarity_augment may invert (train/augment.py, polarity_flip).
    # PET slices are stored white on black; planar scintigrams are exported in either polarity.
    polarity_labels: tuple[str, ...] = ("NM", "PT")
    # Probability that a frame drawn for NM is replaced by a training PET frame degraded into a
    # simulated SPECT (train/augment.py, simulate_spect), labelled NM. 0 = off.
    spect_sim: float = 0.0
    # Probability that a frame of a tomographic label is drawn as a small field of view: a crop of
    # a third to three fifths of the frame instead of three quarters to all of it (train/augment.py,
    # _geometry). Scanners reconstruct extremities, inner ears and hearts on small fields of view
    # with no air around the body, which a network that learnt CT from its air never saw. 0 = off.
    zoom_augment: float = 0.0
    # The labels whose frames zoom_augment may crop: those reconstructed on a chosen field of view.
    zoom_labels: tuple[str, ...] = ("CT", "MR")
    # Keep a zoom_augment crop inside the body's bounding box (pixels above a tenth of the frame's
    # range) instead of anywhere in the frame, where a crop of a trunk can hold air alone.
    zoom_on_body: bool = False
    # Knowledge distillation: a teacher artefact (fit), or a loso run whose fold-N/model.pt teaches
    # fold N (loso; same manifest, folds and seed). Its inputs must be this configuration's.
    teacher: str | None = None
    distill_weight: float = 0.5  # share of the loss that follows the teacher
    distill_temperature: float = 2.0
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of image pairs; 0 = off
    group_balance: float = 0.5  # 0: every image equal in its label; 1: every group equal
    source_balance: float = 1.0  # 1: every source of a label equally likely; 0: by their (damped) size
    val_fraction: float = 0.0  # fraction of each label's sources held out for validation
    val_sources: tuple[str, ...] = ()
    seed: int = 0
    workers: int = 2
    threads: int = 0  # torch intra-op threads; 0 = number of cores
    device: str | None = None
    limit_per_label: int | None = None  # smoke runs: at most N manifest rows per label
    max_frames: int = 8
    axial_slices: int = 24
    reformat_slices: int = 4
    cache_dir: str | None = ".cache/sorter-train"
    labels: tuple[str, ...] = tuple(label.value for label in ALL_LABELS)

    @property
    def cache_size(self) -> int:
        """Side of the cached frames: room for random crops above the input size."""
        return round(self.input_size * 1.15)

    def preprocess(self) -> PreprocessParams:
        """The serving-side preprocessing this configuration trains for."""
        return PreprocessParams(
            input_size=self.input_size,
            scaling=self.scaling,
            letterbox=self.letterbox,
            channels=tuple(self.channels),
            features=tuple(self.features),
            resize=self.resize,
        )

    def spec(self, **extra: Any) -> ModelSpec:
        """A model spec for this configuration."""
        from sorter.domain import Label

        if self.pretrained:
            from sorter.model.network import pretrained_record

            extra["training"] = {**extra.get("training", {}), "pretrained": pretrained_record(self.arch)}
        return ModelSpec(
            arch=self.arch, labels=tuple(Label(v) for v in self.labels), preprocess=self.preprocess(), **extra
        )


PRESETS: dict[str, dict[str, Any]] = {
    # Our default: compact network, robust scaling, letterbox, AdamW + cosine. Chosen on the
    # leave-sources-out evidence in the model card.
    "default": {},
    # The paper's recipe (ResNet-18, 1-channel 224x224, per-image min-max, SGD lr 0.1,
    # momentum 0.9, weight decay 0.005, decay on plateau), for comparison.
    "paper": {
        "arch": "resnet18",
        "input_size": 224,
        "scaling": "minmax",
        "letterbox": False,
        "features": (),
        "channels": ("scaled",),
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 0.005,
        "schedule": "plateau",
        "label_smoothing": 0.0,
        "group_balance": 0.0,
        "source_balance": 0.0,
    },
}


_YAML_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _typed(path: Path, key: str, annotation: str, value: Any) -> Any:
    """``value`` if it has the field's type (``annotation``, e.g. ``"int | None"``), else one
    line (``epochs: two``) instead of a TypeError deep in training.

    A float may be written ``1e-3``: YAML 1.1 (PyYAML) reads an exponent without a dot as a string.
    """
    for kind in (part.strip() for part in annotation.split("|")):
        if kind == "None" and value is None:
            return value
        if kind.startswith("tuple") and isinstance(value, list | tuple):
            return value
        # YAML's true/false are ints to Python; a count or a rate written as a boolean is a mistake.
        if (
            kind in _YAML_TYPES
            and isinstance(value, _YAML_TYPES[kind])
            and (kind == "bool") == isinstance(value, bool)
        ):
            return value
        if kind == "float" and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    wanted = annotation.replace("tuple[str, ...]", "a list").replace(" | None", " or null")
    raise ValueError(f"{path}: {key} must be {wanted}, not {value!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of keys in ``path``; a YAML syntax error or a file that is not a mapping is
    one line naming the file (and the line), not a parser traceback."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected keys and values (epochs: 6), not a {type(data).__name__}")
    return data


def resolve_config(preset: str = "default", yaml_file: Path | None = None, **overrides: Any) -> FitConfig:
    """Preset, then YAML file, then CLI overrides (``None`` means not given)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = replace(FitConfig(), **PRESETS[preset])
    annotations = {f.name: str(f.type) for f in fields(FitConfig)}  # every key, with its type
    layers: list[dict[str, Any]] = []
    if yaml_file is not None:
        data = _read_yaml(Path(yaml_file))
        unknown = set(data) - set(annotations)
        if unknown:
            raise ValueError(f"{yaml_file}: unknown keys {sorted(unknown)}")
        layers.append({key: _typed(yaml_file, key, annotations[key], value) for key, value in data.items()})
    layers.append({k: v for k, v in overrides.items() if v is not None})
    for layer in layers:
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in layer.items()}
        config = replace(config, **clean)
    if config.pretrained:
        from sorter.model.network import PRETRAINED

        if config.arch not in PRETRAINED:
            raise ValueError(f"no pretrained weights for {config.arch!r}; available: {', '.join(PRETRAINED)}")
    config.spec()  # validates the architecture, labels, channels, features, scaling and size
    _check_ranges(config)
    return config


#: The smallest value of each count; below it a run fails deep in training.
_AT_LEAST: dict[str, int] = {
    "epochs": 0,
    "probe_epochs": 0,
    "epoch_size": 1,
    "batch_size": 1,
    "workers": 0,
    "threads": 0,
    "max_frames": 1,
    "axial_slices": 1,
    "reformat_slices": 0,
    "limit_per_label": 1,
}
#: Rates and weights that must be above zero.
_POSITIVE = ("lr", "backbone_lr_scale", "distill_temperature")
#: Fractions and probabilities: (low, high, whether high itself is allowed).
_FRACTIONS: dict[str, tuple[float, float, bool]] = {
    "momentum": (0.0, 1.0, False),
    "weight_decay": (0.0, 1.0, True),
    "average_from": (0.0, 1.0, False),
    "label_smoothing": (0.0, 1.0, False),
    "shift_augment": (0.0, 1.0, True),
    "unit_augment": (0.0, 1.0, True),
    "polarity_augment": (0.0, 1.0, True),
    "spect_sim": (0.0, 1.0, True),
    "zoom_augment": (0.0, 1.0, True),
    "distill_weight": (0.0, 1.0, True),
    "group_balance": (0.0, 1.0, True),
    "source_balance": (0.0, 1.0, True),
    "val_fraction": (0.0, 1.0, False),
}


def _check_ranges(config: FitConfig) -> None:
    """One line naming the key for a value no run can use, before any image is decoded."""
    for name, least in _AT_LEAST.items():
        value = getattr(config, name)
        if value is not None and value < least:
            raise ValueError(f"{name} must be at least {least}, not {value}")
    if config.epochs + config.probe_epochs < 1:  # ``epochs: 0`` saved the untrained network as a model
        raise ValueError(
            f"epochs must be at least 1 (or probe_epochs, for the head alone), not {config.epochs}"
        )
    for name in _POSITIVE:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be above 0, not {getattr(config, name)}")
    for name, (low, high, closed) in _FRACTIONS.items():
        value = getattr(config, name)
        if not (low <= value <= high if closed else low <= value < high):
            bracket = "]" if closed else ")"
            raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}, not {value}")
    # Against the taxonomy, not the run's labels: a run without NM simply has no NM frame to invert.
    known = [label.value for label in ALL_LABELS]
    for name in ("polarity_labels", "zoom_labels"):
        stray = sorted(set(getattr(config, name)) - set(known))
        if stray:
            raise ValueError(f"{name} names {', '.join(stray)}, not among the labels {', '.join(known)}")
    if config.mixup < 0:
        raise ValueError(f"mixup is a Beta distribution's alpha: {config.mixup} is negative")


def save_config(config: FitConfig, path: Path, **context: Any) -> None:
    """Write the resolved configuration (and run context) as YAML."""
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    data.update(context)
    path.write_text(yaml.safe_dump(data, sort_keys=True))


def load_config(path: Path) -> FitConfig:
    """Read a ``config.yaml`` written by :func:`save_config` (context keys ignored)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(FitConfig)}
    return replace(
        FitConfig(), **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    )


def load_run_config(run: Path) -> tuple[FitConfig, Path]:
    """A finished run's configuration and the manifest it was trained on (its ``config.yaml``)."""
    data = yaml.safe_load((Path(run) / "config.yaml").read_text()) or {}
    return load_config(Path(run) / "config.yaml"), Path(data["manifest"])


__all__ = ["PRESETS", "FitConfig", "load_config", "load_run_config", "resolve_config", "save_config"]
