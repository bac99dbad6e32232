"""The adapted model's card: where it came from and how well it knows its archive."""

from __future__ import annotations

from typing import Any

from sorter.model.spec import ModelSpec


def _pct(value: float) -> str:
    return f"{value:.3f}"


def model_card(spec: ModelSpec) -> str:
    """Markdown for an adapted artefact (``sorter adapt`` writes it beside ``model.pt``)."""
    t: dict[str, Any] = spec.training
    m: dict[str, Any] = spec.metrics.get("cross_fitted", {})
    base = t.get("adapted_from", {})
    lines = [
        "# Adapted model",
        "",
        f"Adapted from `{base.get('path')}` (sha256 `{str(base.get('sha256'))[:12]}`, {spec.arch}) "
        f"to the archive {t.get('archive')} on {t.get('created')} by `sorter adapt`: {t.get('method')}.",
        "",
        f"Sample: {m.get('n')} instances ({t.get('sources')} sources, {t.get('studies')} studies, "
        f"{t.get('series')} series); options {t.get('options')}. "
        f"Decode failures left out: {t.get('decode_failures')}.",
        "",
        "## Cross-fitted accuracy against the archive's own header labels",
        "",
        "Every instance predicted by a head that never saw its study. The header labels include the "
        "archive's own mistakes, so this is a lower bound where the header is wrong.",
        "",
        f"Accuracy {_pct(m.get('accuracy', float('nan')))}, balanced accuracy "
        f"{_pct(m.get('balanced_accuracy', float('nan')))}; label issues flagged: {m.get('label_issues')}; "
        f"temperature {spec.temperature:.3f}.",
        "",
        "| header label | instances | accuracy | label issues | agree_at | disagree_at |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in m.get("per_label", {}).items():
        lines.append(
            f"| {label} | {row['n']} | {_pct(row['accuracy'])} | {row['label_issues']} | "
            f"{spec.thresholds.agree_at.get(label, float('nan')):.4f} | "
            f"{spec.thresholds.disagree_at.get(label, float('nan')):.4f} |"
        )
    emission = spec.thresholds.emission_agree_at
    if emission is not None:
        lines += [
            "",
            f"A PT or NM header whose radionuclide only its own scanner images is also `agree` where PT and "
            f"NM together reach {emission:.4f} (`emission_agree_at`).",
        ]
    lines += ["", "| source | instances | accuracy |", "|---|---:|---:|"]
    for source, row in m.get("per_source", {}).items():
        lines.append(f"| {source} | {row['n']} | {_pct(row['accuracy'])} |")
    lines += [
        "",
        "## Limits",
        "",
        "- Learned from header labels: a station that mislabels everything the same way teaches the "
        "adapted model its mistake. Keep the generic model's verdict beside it (`adapted_instances`, "
        "`sorter report`'s source contradictions).",
        "- Only the head was fine-tuned; the backbone is the base model's.",
        "",
    ]
    return "\n".join(lines)
