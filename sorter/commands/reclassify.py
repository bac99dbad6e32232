"""``sorter reclassify``: run stored instances through another model.

Predictions are kept per model; the views show the active model's (``sorter
models use``), so classifying with another model never switches them. The work
list is "instances without a prediction from this model" (narrowed by the same
filters as ``find``), so the command is resumable and a second run with the
same model does nothing.
"""

from __future__ import annotations

import time
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
@classify_options
def reclassify(
    include_failed: bool,
    label: tuple[str, ...],
    header: tuple[str, ...],
    source: tuple[str, ...],
    verdict: tuple[str, ...],
    under: tuple[str, ...],
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

                # One drain at the end: pages keep the decode processes fed meanwhile.
                submit_pending(
                    sessions,
                    executor,
                    statuses=[Status.DONE],
                    without_model=executor.model_id,
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
    if not summary.files and not summary.registered:
        click.echo(
            "\nnothing classified again: no classified instance matches the filters, or each match "
            "already has this model's prediction (`sorter report` lists sources and labels)",
            err=True,
        )
    if active is not None and active.id != model_id:
        click.echo(
            f"\nthe views still show the active model {active.name} ({active.sha256[:12]}); "
            "`sorter models use` switches them (`sorter models` lists the models)",
            err=True,
        )
