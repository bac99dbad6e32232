"""``sorter watch DIR``: composition root of the drop-folder watcher.

Builds the database, the model, the in-process executor and the
:class:`~sorter.watch.Watcher`, then runs until SIGINT or SIGTERM. A signal
only sets a flag: the batch in progress is classified and committed, the
observer thread is stopped and joined, and the command exits with status 0
after Ctrl-C, 143 after SIGTERM (128 + 15, what a shell reports for it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sorter.commands.common import (
    blank_is_unset,
    command_settings,
    database,
    database_option,
    metrics_options,
    metrics_server,
    model_options,
)
from sorter.commands.preflight import exit_for_signal, require_broker
from sorter.commands.rules import rules_option
from sorter.commands.runs import executor_for, print_summary, sqlite_files
from sorter.config import Settings
from sorter.stability import StabilityTracker
from sorter.summary import RunSummary
from sorter.watch import After, Watcher

if TYPE_CHECKING:
    from sorter.metrics import Metrics


def serve(
    settings: Settings,
    root: Path,
    stop: threading.Event,
    *,
    source: str | None = None,
    metrics: Metrics | None = None,
) -> RunSummary:
    """Watch ``root`` with ``settings`` until ``stop`` is set; returns the run's counters.

    Raises
    ------
    click.ClickException
        ``--after`` is malformed or moves files into the watched folder, or the
        database or model cannot be opened.
    """
    try:
        after = After.parse(settings.after)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    root = root.absolute()
    if after.dest is not None and (after.dest == root or root in after.dest.parents):
        raise click.ClickException(f"--after move:{after.dest} is inside the watched folder {root}")
    summary = RunSummary()
    started = time.monotonic()
    with database(settings.database_url, create=True) as (engine, sessions):
        observer = metrics.batch_observer(sessions) if metrics is not None else None
        on_rules = metrics.rules_applied if metrics is not None else None
        with executor_for(
            settings, sessions, summary, None, observer=observer, on_rules=on_rules
        ) as executor:
            Watcher(
                str(root),
                sessions,
                executor,
                summary,
                tracker=StabilityTracker(settings.settle),
                after=after,
                source=source,
                batch_size=settings.batch_size,
                rescan_s=settings.rescan,
                exclude=sqlite_files(engine),
                on_rejected=metrics.unclassified if metrics is not None else None,
            ).run(stop)
    summary.elapsed_s = time.monotonic() - started  # the summary's "N files in T s": the whole watch
    return summary


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--after",
    envvar="SORTER_AFTER",
    help="keep (default), delete, or move:DIR once a file is done/skipped/failed in the database.",
)
@click.option(
    "--settle",
    type=float,
    envvar="SORTER_SETTLE",
    help="Seconds a file's size and mtime must stay unchanged before it is read (default 5).",
)
@click.option(
    "--rescan",
    type=float,
    envvar="SORTER_RESCAN",
    help="Seconds between full rescans that catch missed events (default 60).",
)
@click.option(
    "--source",
    envvar="SORTER_SOURCE",
    callback=blank_is_unset,
    help="Source name of every file (default: first folder under DIR).",
)
@rules_option
@model_options
@metrics_options
@database_option
def watch(
    directory: Path,
    after: str | None,
    settle: float | None,
    rescan: float | None,
    batch_size: int | None,
    model: Path | None,
    workers: int | None,
    device: str | None,
    full_decode: bool | None,
    source: str | None,
    metrics_port: int | None,
    metrics_bind: str | None,
    database_url: str | None,
    rules: Path | None,
) -> None:
    """Classify every file copied into DIR once it has stopped changing; runs until Ctrl-C or SIGTERM."""
    settings = command_settings()
    if settings.broker_url and settings.after != "keep":
        # With a broker the files are classified later by `sorter worker`; the watcher cannot
        # know when a file is finished, so moving or deleting it could lose an instance.
        raise click.UsageError("--after move/delete needs in-process classification: unset SORTER_BROKER_URL")
    require_broker(settings.broker_url)
    stop = threading.Event()
    received: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        click.echo(f"\nsignal {signum}: finishing the current batch", err=True)
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with metrics_server(settings) as metrics:
            summary = serve(settings, directory, stop, source=source, metrics=metrics)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_summary(summary, None)
    click.echo(f"stopped watching {os.path.abspath(directory)}")
    exit_for_signal(received)
