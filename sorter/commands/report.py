"""``sorter report``, ``discrepancies``, ``find`` and ``failures``: read the results."""

from __future__ import annotations

import json
import sys

import click

from sorter import reports
from sorter.commands.common import (
    database,
    database_option,
    format_option,
    show_model,
    view_model_option,
    write_rows,
)
from sorter.db import queries
from sorter.domain import FailureReason, Label, Status

_LABELS = click.Choice([label.value for label in Label], case_sensitive=False)
#: ``--limit``: 0 and negative numbers listed every row (SQLite reads LIMIT -1 as none), and
#: PostgreSQL refuses a negative LIMIT; leaving the option out lists every row.
limit_option = click.option("--limit", type=click.IntRange(min=1), help="At most this many rows.")


@click.command()
@view_model_option
@format_option
@database_option
def report(model_ref: str | None, fmt: str, database_url: str | None) -> None:
    """Counts by header and predicted label, discrepancy rates by source, station and calling AE, failures."""
    with database(database_url) as (_engine, sessions), sessions() as session:
        show_model(session, model_ref)
        sections = reports.report(session)
    if fmt == "json":
        click.echo(json.dumps(sections, indent=2, default=str))
        return
    if fmt == "csv":  # one CSV: the section name, then that section's columns as key=value pairs
        rows = [{"section": name, **row} for name, section in sections.items() for row in section]
        columns = ["section", *dict.fromkeys(k for row in rows for k in row if k != "section")]
        write_rows(rows, columns, "csv")
        return
    for name, rows in sections.items():
        click.echo(f"\n== {name.replace('_', ' ')}")
        if rows:
            write_rows(rows, list(rows[0]), "table", sys.stdout)
        else:
            click.echo("(none)")


@click.command()
@click.option("--level", type=click.Choice(reports.LEVELS), default="instance", show_default=True)
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Lowest confidence (series: mean probability) to list.",
)
@limit_option
@click.option("--unreviewed", is_flag=True, help="Only what no reviewer has decided on (sorter serve).")
@click.option(
    "--by",
    type=click.Choice(["verdict", "label-issue", "joint"]),
    default="verdict",
    show_default=True,
    help="verdict: the shown model's disagreements; label-issue: everything the latest `sorter adapt` "
    "scored, the headers the rest of the archive contradicts most first; joint: the same, the headers "
    "the generic model and the adaptation doubt most together first (joint_score; the better review order).",
)
@view_model_option
@format_option
@database_option
def discrepancies(
    level: str,
    min_confidence: float,
    limit: int | None,
    unreviewed: bool,
    by: str,
    model_ref: str | None,
    fmt: str,
    database_url: str | None,
) -> None:
    """Instances, series or studies whose pixels disagree with their header Modality."""
    columns = {
        "instance": reports.INSTANCE_FIELDS,
        "series": reports.SERIES_FIELDS,
        "study": reports.STUDY_FIELDS,
    }
    with database(database_url) as (_engine, sessions), sessions() as session:
        if by in ("label-issue", "joint"):
            if unreviewed or min_confidence or model_ref:
                raise click.UsageError(f"--by {by} takes neither --unreviewed, --min-confidence nor --model")
            if not reports.has_adaptation(session):
                raise click.ClickException("no finished `sorter adapt` in this database: run it first")
            order = "joint_score" if by == "joint" else "label_issue_score"
            rows = reports.label_issues(session, level, limit, by=order)
            write_rows(rows, reports.LABEL_ISSUE_FIELDS[level], fmt)
            return
        show_model(session, model_ref)
        rows = reports.discrepancies(session, level, min_confidence, limit, unreviewed=unreviewed)
        write_rows(rows, columns[level], fmt)


@click.command()
@click.option("--label", required=True, type=_LABELS, help="What the pixels show.")
@click.option("--header", multiple=True, type=_LABELS, help="Only these header labels (repeatable).")
@click.option("--source", multiple=True, help="Only these sources (repeatable).")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@limit_option
@view_model_option
@format_option
@database_option
def find(
    label: str,
    header: tuple[str, ...],
    source: tuple[str, ...],
    min_confidence: float,
    limit: int | None,
    model_ref: str | None,
    fmt: str,
    database_url: str | None,
) -> None:
    """Find instances by what their pixels show (the active model's prediction)."""
    with database(database_url) as (_engine, sessions), sessions() as session:
        show_model(session, model_ref)
        unknown = reports.unknown_sources(session, source)
        if unknown:  # a typo listed an empty table, as if no image of that source showed the label
            raise click.BadParameter(
                f"no instance has source {', '.join(map(repr, unknown))} (`sorter report` lists the sources)",
                param_hint="'--source'",
            )
        rows = reports.find(
            session,
            Label(label.upper()),
            header=[Label(h.upper()) for h in header],
            sources=source,
            min_confidence=min_confidence,
            limit=limit,
        )
        write_rows(rows, reports.INSTANCE_FIELDS, fmt)


def _reasons(_ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """Known reasons only (``not-dicom`` read as ``not_dicom``): a typo listed nothing, as if
    nothing had failed."""
    known = [reason.value for reason in FailureReason]
    wanted = tuple(v.strip().lower().replace("-", "_") for v in value)
    unknown = [v for v, w in zip(value, wanted, strict=True) if w not in known]
    if unknown:
        raise click.BadParameter(f"no reason {', '.join(unknown)}; reasons: {', '.join(known)}", param=param)
    return wanted


@click.command()
@click.option(
    "--reason",
    multiple=True,
    callback=_reasons,
    help="Only this reason, e.g. permission_denied (repeatable).",
)
@click.option("--skipped", is_flag=True, help="List skipped instances (non-images, links ...) instead.")
@click.option(
    "--under",
    multiple=True,
    type=click.Path(path_type=str),
    help="Only this file, or the files under this folder (repeatable).",
)
@limit_option
@format_option
@database_option
def failures(
    reason: tuple[str, ...],
    skipped: bool,
    under: tuple[str, ...],
    limit: int | None,
    fmt: str,
    database_url: str | None,
) -> None:
    """Files that failed, with their reason: fix them, then `sorter scan` retries what can heal."""
    prefixes = queries.path_scope(under)
    with database(database_url) as (_engine, sessions), sessions() as session:
        rows = reports.failures(
            session,
            reasons=reason,
            statuses=[Status.SKIPPED if skipped else Status.FAILED],
            under=prefixes,
            limit=limit,
        )
        count = write_rows(rows, reports.FAILURE_FIELDS, fmt)
        # `--reason symlink_loop` without --skipped listed nothing: the loop is skipped, not failed.
        other = Status.FAILED if skipped else Status.SKIPPED
        elsewhere = (
            bool(reason)
            and not count
            and bool(
                list(reports.failures(session, reasons=reason, statuses=[other], under=prefixes, limit=1))
            )
        )
    if fmt == "table":
        click.echo(f"{count} {'skipped' if skipped else 'failed'}", err=True)
    if elsewhere:
        switch = "without --skipped" if skipped else "with --skipped"
        click.echo(f"{other.value} instances have that reason: list them {switch}", err=True)
