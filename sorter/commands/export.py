"""``sorter export``: a (balanced) training manifest from the results database."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sorter.commands.common import check_output_file, database, database_option, show_model, view_model_option
from sorter.commands.runs import plural
from sorter.domain import Label
from sorter.export import LABEL_SOURCES, selection, write_manifest


def _stdout(out: Path) -> bool:
    return str(out) == "-"


@click.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    callback=lambda ctx, param, value: value if _stdout(value) else check_output_file(ctx, param, value),
    help="Manifest CSV to write; - writes it to standard output, paths relative to the working directory.",
)
@click.option("--balanced", is_flag=True, help="Keep at most --per-label instances per label.")
@click.option("--per-label", type=click.IntRange(min=1), help="Quota per label (with --balanced).")
@click.option("--by-source", is_flag=True, help="Spread each label's quota evenly over sources.")
@click.option(
    "--label-from",
    type=click.Choice(LABEL_SOURCES),
    default="agree",
    show_default=True,
    help="agree: header and pixels agree; predicted: the model's label; header: the header's label; "
    "reviewed: what reviewers decided (sorter serve).",
)
@click.option(
    "--reviewed",
    is_flag=True,
    help="Only reviewed instances, with the reviewers' labels (confirmed: the reviewer's label; "
    "rejected: the header's); short for --label-from reviewed.",
)
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@view_model_option
@database_option
def export(
    out: Path,
    balanced: bool,
    per_label: int | None,
    by_source: bool,
    label_from: str,
    reviewed: bool,
    min_confidence: float,
    model_ref: str | None,
    database_url: str | None,
) -> None:
    """Write a manifest that sorter-train reads (paths relative to the manifest's folder)."""
    if reviewed:
        if label_from not in ("agree", "reviewed"):
            raise click.UsageError("--reviewed and --label-from cannot both choose the label")
        label_from = "reviewed"
    if balanced and per_label is None:
        raise click.UsageError("--balanced needs --per-label N")
    if per_label is not None and not balanced:
        raise click.UsageError("--per-label only applies with --balanced")
    if by_source and not balanced:  # there is no quota to spread: it wrote every row, as if unasked
        raise click.UsageError("--by-source only applies with --balanced --per-label N")
    with database(database_url) as (_engine, sessions), sessions() as session:
        show_model(session, model_ref)
        rows = selection(
            session,
            label_from=label_from,
            per_label=per_label,
            by_source=by_source,
            min_confidence=min_confidence,
        )
        written = write_manifest(rows, out, sys.stdout if _stdout(out) else None)
    where = "standard output" if _stdout(out) else str(out)
    by_label: dict[str, int] = {}
    for (label, _source), n in written.counts.items():
        by_label[label] = by_label.get(label, 0) + n
    if by_label:
        click.echo(
            f"wrote {plural(sum(by_label.values()), 'row')} to {where}: "
            + ", ".join(f"{label} {n}" for label, n in sorted(by_label.items())),
            err=True,
        )
    else:
        click.echo(
            f"wrote no rows to {where} (the header line only): no classified instance has a label "
            + f"from --label-from {label_from}"
            + (f" with confidence >= {min_confidence:g}" if min_confidence else "")
            + "; `sorter report` shows what is classified",
            err=True,
        )
    if per_label is not None:
        short = {label: n for label, n in sorted(by_label.items()) if n < per_label}
        missing = [label.value for label in Label if label.value not in by_label]
        if short or missing:
            click.echo(
                f"short of --per-label {per_label}: "
                + ", ".join([f"{label} {n}" for label, n in short.items()] + [f"{m} 0" for m in missing])
                + f" (only what exists with --label-from {label_from}"
                + (f" and confidence >= {min_confidence:g}" if min_confidence else "")
                + "); lower --per-label or --min-confidence, or classify more",
                err=True,
            )
    if written.gone:
        click.echo(
            f"left out {written.gone} instances whose file is gone (deleted or moved since they were "
            "classified): training could not read them",
            err=True,
        )
    if written.not_utf8:
        click.echo(
            f"left out {written.not_utf8} instances whose file names are not valid UTF-8 "
            "(a manifest is UTF-8 text): rename them to export them",
            err=True,
        )
