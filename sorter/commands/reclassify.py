"""``sorter reclassify``: run stored instances through another model.

Predictions are kept per model; the views show each instance's latest. The
work list is "instances without a prediction from this model", so the
command is resumable and a second run with the same model does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from sorter.commands.common import command_settings, database
from sorter.commands.scan import (
    classify_options,
    interruptible,
    model_and_executor,
    print_summary,
    progress_bar,
)
from sorter.db import queries
from sorter.domain import Status
from sorter.scan import Scan
from sorter.summary import RunSummary

PAGE = 2000


@click.command()
@click.option(
    "--include-failed",
    is_flag=True,
    help="Also read every failed instance's file again, header first, and classify what now reads.",
)
@classify_options
def reclassify(
    include_failed: bool,
    model: Path | None,
    workers: int | None,
    batch_size: int | None,
    frames: int | None,
    device: str | None,
    json_summary: Path | None,
    progress: bool | None,
    database_url: str | None,
) -> None:
    """Classify stored instances again with --model (default: the bundled model)."""
    settings = command_settings()
    statuses = [Status.DONE]
    summary = RunSummary()
    started = time.monotonic()
    with interruptible(), database(settings.database_url) as (_engine, sessions):
        bar = progress_bar(progress, "reclassify")
        try:
            # PENDING too: what --include-failed re-reads is registered pending, then classified here.
            claimable = [*statuses, Status.PENDING]
            with model_and_executor(settings, sessions, summary, bar, statuses=claimable) as executor:
                if include_failed:  # headers first: a file that failed before its header was read
                    Scan(sessions, executor, summary).reread_failed()
                after = 0
                while True:
                    with sessions() as session:
                        ids = queries.next_ids(
                            session,
                            after=after,
                            limit=PAGE,
                            statuses=statuses,
                            without_model=executor.model_id,
                        )
                    if not ids:
                        break
                    after = ids[-1]
                    summary.files += len(ids)
                    executor.submit(ids)
                    if bar is not None:
                        bar.update(len(ids))
                executor.drain()
        finally:
            if bar is not None:
                bar.close()
    summary.elapsed_s = time.monotonic() - started
    print_summary(summary, json_summary)
