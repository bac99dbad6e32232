"""A cascade: a fast screen answers first, the main network takes the frames the screen is unsure of.

``sorter-train cascade`` joins two artefacts with the same inputs and labels (typically the
bundled EfficientNet-Lite0 and a MobileNetV3-Small distilled from it) into one artefact whose
network is a :class:`sorter.model.network.CascadeNet`, and chooses the screen's thresholds, one
per label it predicts, on leave-sources-out evidence: the two networks' loso runs (same
manifest, folds and seed) give out-of-fold logits for every held-out image, and
:func:`cascade_logits` applies the cascade's rule to them exactly as the network does.

:func:`choose_thresholds` keeps the screen's answer for a label down to the confidence where,
on the frames it would keep, the screen stops being right at least as often as the main network
(``tolerance`` below it): so the screen answers where it is as good, and the main network takes
what the screen gets confidently wrong (a distilled MobileNetV3-Small calls radiographs OT with
confidence). Thresholds chosen on the images they are scored on would flatter the cascade, so
the reported out-of-fold predictions are cross-fitted (:func:`cross_fit`): each fold's images go
through thresholds chosen on the other folds only. They are written as a loso run of their own
(``oof.npz``, ``metrics.json``, ``config.yaml``), so that ``sorter-train compare``,
``operating-point`` and ``export --loso`` read it like any other; the artefact's thresholds are
chosen on every fold.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from train.calibrate import softmax_np
from train.metrics import compute_metrics

if TYPE_CHECKING:
    from sorter.model.spec import ModelSpec


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
    main: np.ndarray,
    screen: np.ndarray,
    temperature: float,
    screen_temperature: float,
    thresholds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """What :class:`~sorter.model.network.CascadeNet` returns for these two networks' logits with
    per-label ``thresholds`` (in label order), and the mask of the rows that went to the main network."""
    probs = softmax_np(screen, screen_temperature)
    unsure = probs.max(axis=1) < np.asarray(thresholds)[probs.argmax(axis=1)]
    out = screen * np.float32(temperature / screen_temperature)
    out[unsure] = main[unsure]
    return out.astype(np.float32), unsure


def choose_thresholds(
    main: np.ndarray,
    screen: np.ndarray,
    y: np.ndarray,
    screen_temperature: float,
    tolerance: float = 0.0,
) -> np.ndarray:
    """Per-label thresholds: for each label the screen predicts, the lowest confidence down to which
    the screen, on every frame it keeps (the most confident first), is right at least as often as
    the main network is on those frames, less ``tolerance`` per frame. 1 where it never is."""
    probs = softmax_np(screen, screen_temperature)
    confidence, label = probs.max(axis=1), probs.argmax(axis=1)
    main_right = main.argmax(axis=1) == y
    thresholds = np.ones(screen.shape[1])
    for k in range(screen.shape[1]):
        rows = np.flatnonzero(label == k)
        rows = rows[np.argsort(-confidence[rows], kind="stable")]
        margin = (
            np.cumsum(y[rows] == k) - np.cumsum(main_right[rows]) + tolerance * np.arange(1, len(rows) + 1)
        )
        failing = np.flatnonzero(margin < 0)
        kept = len(rows) if len(failing) == 0 else int(failing[0])
        if kept:
            thresholds[k] = float(confidence[rows[kept - 1]])
    return thresholds


def cross_fit(
    main: LosoRun, screen: LosoRun, tolerance: float
) -> tuple[np.ndarray, np.ndarray, dict[int, list[float]]]:
    """The cascade's out-of-fold logits with each fold's thresholds chosen on the other folds, the
    mask of rows sent to the main network, and each fold's thresholds."""
    y = _label_indices(main)
    logits = np.empty_like(main.logits)
    unsure = np.zeros(len(y), dtype=bool)
    chosen: dict[int, list[float]] = {}
    for fold in np.unique(main.folds):
        held = main.folds == fold
        thresholds = choose_thresholds(
            main.logits[~held], screen.logits[~held], y[~held], screen.temperature, tolerance
        )
        logits[held], unsure[held] = cascade_logits(
            main.logits[held], screen.logits[held], main.temperature, screen.temperature, thresholds
        )
        chosen[int(fold)] = [float(t) for t in thresholds]
    return logits, unsure, chosen


def _label_indices(run: LosoRun) -> np.ndarray:
    index = {str(label): i for i, label in enumerate(run.config["labels"])}
    return np.asarray([index[str(v)] for v in run.labels])


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
    """``run``'s images scored with ``logits`` at ``temperature`` (:func:`train.compare.score`)."""
    from train.compare import score

    labels = [str(v) for v in run.config["labels"]]
    y, sources = [str(v) for v in run.labels], [str(v) for v in run.sources]
    metrics, macro, _ = score(y, softmax_np(logits, temperature), labels, sources, temperature, point=False)
    metrics["source_macro"] = macro
    return metrics


def scores(logits: np.ndarray, run: LosoRun) -> dict[str, float]:
    """Balanced, source-averaged and plain accuracy of out-of-fold ``logits`` (at ``run``'s
    temperature), and at their own operating point (export's) the shares of right headers
    confirmed (``agree``) and of relabelled copies refuted (``caught``), cross-fitted over the
    run's folds (:func:`train.compare.held_out_shares`)."""
    from train.compare import held_out_shares, score

    labels = [str(v) for v in run.config["labels"]]
    y, sources = [str(v) for v in run.labels], [str(v) for v in run.sources]
    probs = softmax_np(logits, run.temperature)
    metrics, macro, point = score(y, probs, labels, sources, run.temperature, folds=np.asarray(run.folds))
    assert point is not None
    shares = held_out_shares(point)
    return {
        "balanced_accuracy": float(metrics["balanced_accuracy"]),
        "source_macro": float(macro["balanced_accuracy"]),
        "accuracy": float(metrics["accuracy"]),
        "agree": float(shares["agree"]),
        "caught": float(shares["caught"]),
    }


#: Screen confidences tried by :func:`confirming_screen` (descriptive: none is chosen).
CONFIRM_AT = (0.5, 0.6, 0.7, 0.8, 0.9)


def confirming_screen(
    main: LosoRun, screen: LosoRun, confirm_at: tuple[float, ...] = CONFIRM_AT
) -> list[dict[str, float]]:
    """The header test if the screen may only *confirm* a header (``p_screen(header) >= c``: agree)
    and every other (image, header) pair gets the main network's verdict at its own operating point.

    Not what :class:`~sorter.model.network.CascadeNet` does (serving would need the header beside
    the pixels); measured so that the next step is chosen on evidence. Per image: right headers
    answered by the screen (``fast``), confirmed (``agree``) and refuted (``false_disagree``);
    relabelled copies refuted (``caught``) and confirmed (``false_agree``).
    """
    from train.operating_point import choose

    y = _label_indices(main)
    rows = np.arange(len(y))
    main_p, screen_p = (
        softmax_np(main.logits, main.temperature),
        softmax_np(screen.logits, screen.temperature),
    )
    agree_at, disagree_at = choose(main_p, y)
    others = np.asarray([[h for h in range(main_p.shape[1]) if h != label] for label in y])

    def verdicts(p: np.ndarray, header: np.ndarray) -> np.ndarray:  # 1 agree, -1 disagree, 0 uncertain
        return np.where(p >= agree_at[header], 1, np.where(p <= disagree_at[header], -1, 0))

    right = verdicts(main_p[rows, y], y)
    copies = verdicts(main_p[rows[:, None], others], others)
    out = [{"confirm_at": 1.0, "fast": 0.0, **_header_shares(right, copies)}]
    for c in confirm_at:
        fast = screen_p[rows, y] >= c
        shares = _header_shares(
            np.where(fast, 1, right), np.where(screen_p[rows[:, None], others] >= c, 1, copies)
        )
        out.append({"confirm_at": float(c), "fast": float(fast.mean()), **shares})
    return out


def _header_shares(right: np.ndarray, copies: np.ndarray) -> dict[str, float]:
    return {
        "agree": float((right == 1).mean()),
        "false_disagree": float((right == -1).mean()),
        "caught": float((copies == -1).mean()),
        "false_agree": float((copies == 1).mean()),
    }


def write_cascade_run(main: LosoRun, screen: LosoRun, tolerance: float, out_dir: Path) -> dict[str, Any]:
    """Write the cascade's cross-fitted out-of-fold predictions (:func:`cross_fit`) as a loso run in
    ``out_dir``, with its metrics, both networks' scores alone and the thresholds for the artefact
    (chosen on every fold).

    The temperature stays the main network's (the cascade's rescaled screen logits are calibrated
    by it), so the operating point and the exported artefact use the one the network was built with.
    """
    logits, unsure, per_fold = cross_fit(main, screen, tolerance)
    labels = [str(v) for v in main.config["labels"]]
    final = choose_thresholds(main.logits, screen.logits, _label_indices(main), screen.temperature, tolerance)
    found = {
        "main": str(main.path),
        "screen": str(screen.path),
        "tolerance": tolerance,
        "screen_temperature": screen.temperature,
        "to_main": float(unsure.mean()),
        "to_main_per_label": {
            label: float(unsure[main.labels == label].mean())
            for label in labels
            if (main.labels == label).any()
        },
        "thresholds": dict(zip(labels, map(float, final), strict=True)),
        "thresholds_per_fold": per_fold,
        "cascade": scores(logits, main),
        "main_alone": scores(main.logits, main),
        "screen_alone": scores(screen.logits, screen),
        "confirming_screen": confirming_screen(main, screen),
    }
    protocol = "screen thresholds cross-fitted over the folds"
    return _write_run(main, logits, main.temperature, out_dir, "cascade", found, protocol, to_main=unsure)


def average_logits(
    main: np.ndarray, partner: np.ndarray, temperatures: tuple[float, float], weight: float
) -> np.ndarray:
    """What :class:`~sorter.model.network.EnsembleNet` returns for these two networks' logits."""
    return ((1.0 - weight) * main / temperatures[0] + weight * partner / temperatures[1]).astype(np.float32)


#: Partner weights tried when ``sorter-train ensemble`` chooses one.
WEIGHTS = tuple(round(w / 10, 1) for w in range(1, 10))


def choose_weight(
    main: LosoRun, partner: LosoRun, rows: np.ndarray, weights: tuple[float, ...] = WEIGHTS
) -> float:
    """The weight whose average has the best balanced accuracy on ``rows`` (each average
    temperature-scaled there, as ``loso`` does); the smaller weight on a tie."""
    from train.calibrate import fit_temperature

    def balanced(weight: float) -> float:
        logits = average_logits(
            main.logits[rows], partner.logits[rows], (main.temperature, partner.temperature), weight
        )
        temperature = float(fit_temperature(logits, _label_indices(main)[rows]))
        part = replace(
            main, logits=logits, labels=main.labels[rows], sources=main.sources[rows], folds=main.folds[rows]
        )
        return float(_summary(logits, part, temperature)["balanced_accuracy"])

    return max(weights, key=lambda w: (balanced(w), -w))


def write_ensemble_run(
    main: LosoRun, partner: LosoRun, weight: float | None, out_dir: Path
) -> dict[str, Any]:
    """Write the ensemble's out-of-fold predictions (each fold's two networks never saw its sources)
    as a loso run in ``out_dir``, calibrated by a temperature fitted on them as ``loso`` fits one.

    ``weight`` None: chosen (:func:`choose_weight`), and cross-fitted like a cascade's thresholds:
    each fold's images are averaged with the weight chosen on the other folds; the artefact's is
    chosen on every fold.
    """
    from train.calibrate import fit_temperature

    temperatures = (main.temperature, partner.temperature)
    per_fold: dict[int, float] = {}
    protocol = ""
    if weight is None and len(np.unique(main.folds)) < 2:  # nothing to cross-fit on
        weight = choose_weight(main, partner, np.ones(len(main.labels), dtype=bool))
        protocol = "partner weight chosen on these same images (one fold)"
    if weight is None:
        protocol = "partner weight cross-fitted over the folds"
        logits = np.empty_like(main.logits)
        for fold in np.unique(main.folds):
            held = main.folds == fold
            per_fold[int(fold)] = choose_weight(main, partner, ~held)
            logits[held] = average_logits(
                main.logits[held], partner.logits[held], temperatures, per_fold[int(fold)]
            )
        weight = choose_weight(main, partner, np.ones(len(main.labels), dtype=bool))
    else:
        logits = average_logits(main.logits, partner.logits, temperatures, weight)
    temperature = float(fit_temperature(logits, _label_indices(main)))
    joined = replace(main, logits=logits, temperature=temperature)
    found = {
        "main": str(main.path),
        "partner": str(partner.path),
        "weight": weight,
        "weights_per_fold": per_fold,
        "main_temperature": main.temperature,
        "partner_temperature": partner.temperature,
        "ensemble": scores(logits, joined),
        "main_alone": scores(main.logits, main),
        "partner_alone": scores(partner.logits, partner),
    }
    # The partner's own predictions stay beside the average: `sorter-train export --confirm` chooses
    # where the partner may confirm a header alone (train/confirm.py).
    return _write_run(
        main,
        logits,
        temperature,
        out_dir,
        "ensemble",
        found,
        protocol,
        partner_logits=partner.logits,
        partner_temperature=np.float64(partner.temperature),
    )


def _write_run(
    main: LosoRun,
    logits: np.ndarray,
    temperature: float,
    out_dir: Path,
    kind: str,
    found: dict[str, Any],
    protocol: str,
    **arrays: np.ndarray,
) -> dict[str, Any]:
    """``out_dir`` as a finished loso run of ``logits`` (same images, folds and config as ``main``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [str(v) for v in main.config["labels"]]
    metrics = _summary(logits, main, temperature)
    y, sources = [str(v) for v in main.labels], [str(v) for v in main.sources]
    raw = compute_metrics(y, softmax_np(logits, 1.0), labels, sources)
    previous = json.loads((main.path / "metrics.json").read_text())
    metrics.update(
        temperature=temperature,
        ece_uncalibrated=raw["ece"],
        folds=previous.get("folds"),
        folds_evaluated=previous.get("folds_evaluated"),
        per_label=_per_label(metrics, main),
        protocol="; ".join(filter(None, [previous.get("protocol", "leave-sources-out"), protocol])),
        **{kind: found},
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, default=float))
    config = dict(main.config, **{kind: {k: v for k, v in found.items() if not isinstance(v, (dict, list))}})
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copyfile(main.path / "folds.json", out_dir / "folds.json")
    np.savez(
        out_dir / "oof.npz",
        logits=logits,
        labels=main.labels,
        sources=main.sources,
        folds=main.folds,
        temperature=temperature,
        **arrays,
    )
    return metrics


def _per_label(metrics: dict[str, Any], run: LosoRun) -> dict[str, Any]:
    from train.loso import per_label_summary

    sources: dict[str, set[str]] = {}
    for label, source in zip(run.labels, run.sources, strict=True):
        sources.setdefault(str(label), set()).add(str(source))
    return per_label_summary(metrics, sources)


def assemble(
    main_path: Path,
    screen_path: Path,
    thresholds: dict[str, float],
    temperatures: tuple[float, float],
    out: Path,
) -> str:
    """Join two artefacts into a cascade artefact at ``out``; returns its sha256.

    ``thresholds``: per label, as :func:`choose_thresholds` gives them. ``temperatures`` calibrate
    the main network and the screen: their loso runs', the ones the thresholds were chosen with.
    The main network's verdict thresholds and metrics stay until ``sorter-train export --loso``
    sets the cascade run's.
    """
    from sorter.model.spec import ScreenSpec

    def spec_of(main: ModelSpec, second: ModelSpec) -> ModelSpec:
        screen = ScreenSpec(arch=second.arch, temperature=temperatures[1], thresholds=dict(thresholds))
        return replace(main, temperature=temperatures[0], screen=screen)

    return _join(main_path, screen_path, "screen", spec_of, out)


def assemble_ensemble(
    main_path: Path, partner_path: Path, temperatures: tuple[float, float], weight: float, out: Path
) -> str:
    """Join two artefacts into an ensemble artefact at ``out``; returns its sha256.

    ``temperatures``: the main network's and the partner's, from their loso runs. The spec's own
    temperature, verdict thresholds and metrics come from ``sorter-train export --loso`` on the
    ensemble's run.
    """
    from sorter.model.spec import PartnerSpec

    def spec_of(main: ModelSpec, second: ModelSpec) -> ModelSpec:
        partner = PartnerSpec(
            arch=second.arch, temperature=temperatures[1], main_temperature=temperatures[0], weight=weight
        )
        return replace(main, partner=partner)

    return _join(main_path, partner_path, "partner", spec_of, out)


def _join(
    main_path: Path,
    second_path: Path,
    role: str,
    spec_of: Callable[[ModelSpec, ModelSpec], ModelSpec],
    out: Path,
) -> str:
    from sorter.model.artefact import read_spec, save_artefact
    from sorter.model.network import build_network

    main_spec, _, main_state = read_spec(main_path)
    second_spec, _, second_state = read_spec(second_path)
    if any(s.screen is not None or s.partner is not None for s in (main_spec, second_spec)):
        raise ValueError(
            "only two single networks can be joined; one of these already has a screen or partner"
        )
    if main_spec.preprocess != second_spec.preprocess or main_spec.labels != second_spec.labels:
        raise ValueError(f"{main_path} and {second_path} take different inputs or give different labels")
    training = dict(main_spec.training, **{role: dict(second_spec.training, artefact=Path(second_path).name)})
    spec = replace(spec_of(main_spec, second_spec), training=training)
    network = build_network(spec)
    network.load_state_dict(dict(main_state) | {f"{role}.{k}": v for k, v in second_state.items()})
    return save_artefact(network, spec, out)
