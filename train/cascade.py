"""A cascade: a fast screen answers first, the main network takes the frames the screen is unsure of.

``sorter-train cascade`` joins two artefacts with the same inputs and labels (typically the
bundled EfficientNet-Lite0 and a MobileNetV3-Small distilled from it) into one artefact whose
network is a :class:`sorter.model.network.CascadeNet`, and chooses the screen's threshold on
leave-sources-out evidence: the two networks' loso runs (same manifest, folds and seed) give
out-of-fold logits for every held-out image, and :func:`cascade_logits` applies the cascade's
rule to them exactly as the network does. The result is written as a loso run of its own
(``oof.npz``, ``metrics.json``, ``config.yaml``), so that ``sorter-train compare``,
``operating-point`` and ``export --loso`` read it like any other.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from train.calibrate import softmax_np
from train.metrics import compute_metrics, source_macro_recall

#: Shares of the held-out images sent to the main network at the thresholds tried: the screen's
#: calibrated confidence has no fixed scale (a distilled student with label smoothing seldom
#: passes 0.9), so thresholds are its own quantiles.
SHARES = tuple(round(float(q), 2) for q in np.arange(0.0, 1.001, 0.02))


@dataclass(frozen=True)
class LosoRun:
    """The out-of-fold predictions of one ``sorter-train loso`` run."""

    path: Path
    logits: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    folds: np.ndarray
    temperature: float
    config: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> LosoRun:
        """Read a finished run (``oof.npz`` and ``config.yaml``)."""
        data = np.load(Path(path) / "oof.npz")
        config = yaml.safe_load((Path(path) / "config.yaml").read_text())
        return cls(
            Path(path),
            np.asarray(data["logits"], np.float32),
            data["labels"],
            data["sources"],
            data["folds"],
            float(data["temperature"]),
            config,
        )


def cascade_logits(
    main: np.ndarray, screen: np.ndarray, temperature: float, screen_temperature: float, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """What :class:`~sorter.model.network.CascadeNet` returns for these two networks' logits, and
    the mask of the rows that went to the main network."""
    confidence = softmax_np(screen, screen_temperature).max(axis=1)
    unsure = confidence < threshold
    out = screen * np.float32(temperature / screen_temperature)
    out[unsure] = main[unsure]
    return out.astype(np.float32), unsure


def check_pair(main: LosoRun, screen: LosoRun) -> None:
    """Refuse runs that did not predict the same images under the same folds."""
    keys = (
        "manifest",
        "folds",
        "seed",
        "labels",
        "input_size",
        "channels",
        "features",
        "scaling",
        "letterbox",
    )
    differ = [k for k in keys if main.config.get(k) != screen.config.get(k)]
    if differ:
        raise ValueError(f"{main.path} and {screen.path} differ in {', '.join(differ)}")
    same = (
        len(main.labels) == len(screen.labels)
        and (main.labels == screen.labels).all()
        and (main.sources == screen.sources).all()
        and (main.folds == screen.folds).all()
    )
    if not same:
        raise ValueError(f"{main.path} and {screen.path} did not predict the same images in the same order")


def _summary(logits: np.ndarray, run: LosoRun, temperature: float) -> dict[str, Any]:
    labels = [str(v) for v in run.config["labels"]]
    y = [str(v) for v in run.labels]
    sources = [str(v) for v in run.sources]
    probs = softmax_np(logits, temperature)
    metrics = compute_metrics(y, probs, labels, sources)
    keyed = [f"{s}/{label}" for s, label in zip(sources, y, strict=True)]
    by_source_label = compute_metrics(y, probs, labels, keyed)
    metrics["source_macro"] = source_macro_recall(by_source_label, {k: k.rsplit("/", 1)[1] for k in keyed})
    metrics["per_source_label"] = by_source_label["per_source"]
    return metrics


def thresholds_for(screen: LosoRun, shares: Sequence[float] = SHARES) -> list[float]:
    """Thresholds that send about each of ``shares`` of the screen run's images to the main network
    (1.0 sends every one)."""
    confidence = softmax_np(screen.logits, screen.temperature).max(axis=1)
    found = {round(float(np.quantile(confidence, q)), 4) for q in shares if q < 1.0}
    return sorted(found | {1.0})


def sweep(main: LosoRun, screen: LosoRun, thresholds: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The cascade's leave-sources-out metrics at each threshold, and the share sent to the main network."""
    rows = []
    for threshold in thresholds if thresholds is not None else thresholds_for(screen):
        logits, unsure = cascade_logits(
            main.logits, screen.logits, main.temperature, screen.temperature, threshold
        )
        rows.append({"threshold": float(threshold), "to_main": float(unsure.mean()), **scores(logits, main)})
    return rows


#: What a cascade must keep of the main network's leave-sources-out scores (:func:`scores`).
KEPT = ("balanced_accuracy", "source_macro", "agree", "caught")


def scores(logits: np.ndarray, run: LosoRun) -> dict[str, float]:
    """Balanced, source-averaged and plain accuracy of out-of-fold ``logits`` (at ``run``'s
    temperature), and at their own operating point the shares of right headers confirmed
    (``agree``) and of relabelled copies refuted (``caught``)."""
    from train.operating_point import point_for

    metrics = _summary(logits, run, run.temperature)
    labels = [str(v) for v in run.config["labels"]]
    index = {label: i for i, label in enumerate(labels)}
    y = np.asarray([index[str(v)] for v in run.labels])
    groups = np.asarray([f"{s}/{lab}" for s, lab in zip(run.sources, run.labels, strict=True)])
    point = point_for(softmax_np(logits, run.temperature), y, labels, groups, run.temperature)
    return {
        "balanced_accuracy": float(metrics["balanced_accuracy"]),
        "source_macro": float(metrics["source_macro"]["balanced_accuracy"]),
        "accuracy": float(metrics["accuracy"]),
        "agree": float(point["images"]["agree"]),
        "caught": float(point["images"]["caught"]),
    }


def choose_threshold(rows: Sequence[dict[str, Any]], reference: dict[str, float], tolerance: float) -> float:
    """The lowest threshold (fewest frames for the main network) at which every score in
    :data:`KEPT` that ``reference`` (the main network alone) has stays within ``tolerance`` of it."""
    kept = [key for key in KEPT if key in reference]
    for row in sorted(rows, key=lambda r: r["threshold"]):
        if all(row[key] >= reference[key] - tolerance for key in kept):
            return float(row["threshold"])
    return float(max(r["threshold"] for r in rows))


def write_cascade_run(main: LosoRun, screen: LosoRun, threshold: float, out_dir: Path) -> dict[str, Any]:
    """Write the cascade's out-of-fold predictions at ``threshold`` as a loso run in ``out_dir``.

    The temperature stays the main network's (the cascade's rescaled screen logits are calibrated
    by it), so the operating point and the exported artefact use the one the network was built with.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    logits, unsure = cascade_logits(
        main.logits, screen.logits, main.temperature, screen.temperature, threshold
    )
    metrics = _summary(logits, main, main.temperature)
    y, sources = [str(v) for v in main.labels], [str(v) for v in main.sources]
    raw = compute_metrics(y, softmax_np(logits, 1.0), [str(v) for v in main.config["labels"]], sources)
    previous = json.loads((main.path / "metrics.json").read_text())
    metrics.update(
        temperature=main.temperature,
        ece_uncalibrated=raw["ece"],
        folds=previous.get("folds"),
        folds_evaluated=previous.get("folds_evaluated"),
        per_label=_per_label(metrics, main),
        protocol=previous.get("protocol", "leave-sources-out"),
        cascade={
            "main": str(main.path),
            "screen": str(screen.path),
            "threshold": threshold,
            "screen_temperature": screen.temperature,
            "to_main": float(unsure.mean()),
        },
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, default=float))
    config = dict(main.config, cascade={"screen": str(screen.path), "threshold": threshold})
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(main.path / "folds.json", out_dir / "folds.json")
    np.savez(
        out_dir / "oof.npz",
        logits=logits,
        labels=main.labels,
        sources=main.sources,
        folds=main.folds,
        temperature=main.temperature,
        to_main=unsure,
    )
    return metrics


def _per_label(metrics: dict[str, Any], run: LosoRun) -> dict[str, Any]:
    from train.loso import per_label_summary

    sources: dict[str, set[str]] = {}
    for label, source in zip(run.labels, run.sources, strict=True):
        sources.setdefault(str(label), set()).add(str(source))
    return per_label_summary(metrics, sources)


def assemble(
    main_path: Path, screen_path: Path, threshold: float, temperatures: tuple[float, float], out: Path
) -> str:
    """Join two artefacts into a cascade artefact at ``out``; returns its sha256.

    ``temperatures`` calibrate the main network and the screen: their loso runs', the ones the
    threshold was chosen with. The main network's verdict thresholds and metrics stay until
    ``sorter-train export --loso`` sets the cascade run's.
    """
    from sorter.model.artefact import read_spec, save_artefact
    from sorter.model.network import build_network
    from sorter.model.spec import ScreenSpec

    main_spec, _, main_state = read_spec(main_path)
    screen_spec, _, screen_state = read_spec(screen_path)
    if main_spec.screen is not None or screen_spec.screen is not None:
        raise ValueError("a cascade joins two single networks; one of these already has a screen")
    if main_spec.preprocess != screen_spec.preprocess or main_spec.labels != screen_spec.labels:
        raise ValueError(f"{main_path} and {screen_path} take different inputs or give different labels")
    screen = ScreenSpec(arch=screen_spec.arch, temperature=temperatures[1], threshold=threshold)
    training = dict(main_spec.training, screen=dict(screen_spec.training, artefact=Path(screen_path).name))
    spec = replace(main_spec, temperature=temperatures[0], screen=screen, training=training)
    network = build_network(spec)
    state = dict(main_state) | {f"screen.{k}": v for k, v in screen_state.items()}
    network.load_state_dict(state)
    return save_artefact(network, spec, out)
