"""``sorter reclassify``: run stored instances through another model.

Predictions are kept per model; the views show the active model's (``sorter
models use``), so classifying with another model never switches them. The work
list is "instances without a prediction from this model" (narrowed by the same
filters as ``find``), so the command is resumable and a second run with the
same model does nothing; ``--predicted-before`` counts that model's older
predictions as none (after an upgrade), and stays resumable; ``--reread-headers``
reads the selected instances' headers again and classifies those whose stored header
changed (:mod:`sorter.reread`).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import click

from sorter.commands.common import command_settings, database
from sorter.commands.runs import (
    classify_options,
    executor_for,
    interruptible,
    print_summary,
    progress_bar,
)
from sorter.db import catalogue, queries
from sorter.domain import Label, Status, Verdict
from sorter.jobs.executor import submit_pending
from sorter.reread import Reread
from sorter.reread import reread_headers as reread_headers_of
from sorter.scan import Scan
from sorter.summary import RunSummary

_LABELS = click.Choice([label.value for label in Label], case_sensitive=False)


@click.command()
@click.option(
    "--include-failed",
    is_flag=True,
    help="Also read every failed instance's file again, header first, and classify what now reads.",
)
@click.option("--label", multiple=True, type=_LABELS, help="Only instances the views label so (repeatable).")
@click.option("--header", multiple=True, type=_LABELS, help="Only these header labels (repeatable).")
@click.option("--source", multiple=True, help="Only these sources (repeatable).")
@click.option(
    "--verdict",
    multiple=True,
    type=click.Choice([v.value for v in Verdict]),
    help="Only instances whose shown verdict is this (repeatable), e.g. uncertain.",
)
@click.option(
    "--under",
    multiple=True,
    type=click.Path(path_type=str),
    help="Only this file, or the files under this folder (repeatable).",
)
@click.option(
    "--predicted-before",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]),
    help="Also classify again instances whose prediction from this model was made before this "
    "date or time (local time), e.g. the day you upgraded sorter: a release that reads pixels or "
    "judges headers differently changes nothing stored until then. Resumable: a rerun with the "
    "same value skips what it redid.",
)
@click.option(
    "--reread-headers",
    is_flag=True,
    help="First read the selected instances' headers again (not their pixels), store what changed "
    "(header label, SOP class, radionuclide ...) and classify those again: a release that reads "
    "headers differently changes nothing stored for files a rescan skips as unchanged.",
)
@classify_options
def reclassify(
    include_failed: bool,
    label: tuple[str, ...],
    header: tuple[str, ...],
    source: tuple[str, ...],
    verdict: tuple[str, ...],
    under: tuple[str, ...],
    predicted_before: datetime | None,
    reread_headers: bool,
    model: Path | None,
    workers: int | None,
    batch_size: int | None,
    frames: int | None,
    device: str | None,
    full_decode: bool | None,
    json_summary: Path | None,
    progress: bool | None,
    database_url: str | None,
) -> None:
    """Classify stored instances again with --model (default: the bundled model)."""
    settings = command_settings()
    only = queries.InstanceFilter(
        labels=tuple(Label(x.upper()) for x in label),
        headers=tuple(Label(x.upper()) for x in header),
        sources=source,
        verdicts=tuple(Verdict(v) for v in verdict),
        under=tuple(queries.path_scope(under)),
    )
    summary = RunSummary()
    reread = Reread()
    started = time.monotonic()
    with interruptible(), database(settings.database_url) as (_engine, sessions):
        bar = progress_bar(progress, "reclassify")
        try:
            # PENDING too: what --include-failed re-reads is registered pending, then classified here.
            claimable = [Status.DONE, Status.PENDING]
            with executor_for(settings, sessions, summary, bar, local=True, statuses=claimable) as executor:
                if include_failed:  # headers first: a file that failed before its header was read
                    Scan(sessions, executor, summary).reread_failed()

                def count(ids: list[int]) -> None:
                    summary.files += len(ids)
                    if bar is not None:
                        bar.update(len(ids))

                def classify_now(ids: list[int]) -> None:
                    count(ids)
                    executor.submit(ids)
                    executor.drain()  # before the pages below: what it redid is then newer

                if reread_headers:
                    reread = reread_headers_of(sessions, only, on_changed=classify_now)

                # One drain at the end: pages keep the decode processes fed meanwhile.
                submit_pending(
                    sessions,
                    executor,
                    statuses=[Status.DONE],
                    without_model=executor.model_id,
                    # Naive is local time, as `find -newermt` reads it; the database compares UTC.
                    predicted_before=predicted_before.astimezone(UTC) if predicted_before else None,
                    only=only,
                    drain_each_page=False,
                    on_page=count,
                )
                executor.drain()
                model_id = executor.model_id
        finally:
            if bar is not None:
                bar.close()
        with sessions() as session:
            active = next((r for r in catalogue.list_models(session) if r.active), None)
    summary.elapsed_s = time.monotonic() - started
    print_summary(summary, json_summary)
    if reread_headers:
        click.echo(
            f"\nheaders read again: {reread.read} ({reread.changed} changed and classified again, "
            f"{reread.unreadable} unreadable now, {reread.replaced} now another instance: "
            "`sorter scan` records those)",
            err=True,
        )
    if not summary.files and not summary.registered:
        click.echo(
            "\nnothing classified again: no classified instance matches the filters, or each match "
            "already has this model's prediction (`sorter report` lists sources and labels; "
            "--predicted-before DATE classifies again what it predicted before DATE)",
            err=True,
        )
    if active is not None and active.id != model_id:
        click.echo(
            f"\nthe views still show the active model {active.name} ({active.sha256[:12]}); "
            "`sorter models use` switches them (`sorter models` lists the models)",
            err=True,
        )
