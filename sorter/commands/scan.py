"""``sorter scan`` and ``sorter reclassify``: composition roots for batch classification.

Each builds the database, the model and the in-process executor, runs, and
prints a summary. Ctrl-C (or SIGTERM) rolls back the batches in flight and
exits with 130 (143 for SIGTERM); re-running the same command resumes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sorter.commands.common import blank_is_unset, command_settings, database
from sorter.commands.preflight import require_broker
from sorter.commands.rules import read_rules, rules_option
from sorter.commands.runs import (
    classify_options,
    executor_for,
    interruptible,
    print_summary,
    progress_bar,
    sqlite_files,
)
from sorter.domain import Status
from sorter.rules.engine import RulesReport, apply_rules
from sorter.scan import Scan
from sorter.summary import RunSummary

if TYPE_CHECKING:
    pass

F = Callable[..., Any]
log = logging.getLogger(__name__)


#: What a scan's executor may claim: new work, and ``done`` instances its model has not classified.
CLAIMABLE = (Status.PENDING, Status.DONE)

#: ``--fail-on`` choices and their exit statuses (1 and 2 are click's errors, 130/143 signals).
FAIL_ON = {"failed": 3, "discrepancy": 4}


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--source",
    envvar="SORTER_SOURCE",
    callback=blank_is_unset,
    help="Source name for every file (default: the first folder under each PATH).",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    envvar="SORTER_RETRY_FAILED",
    help="Read again unchanged files that failed for a reason that can heal (permissions, a "
    "vanished file, a missing codec); without it they are retried once their mode or ctime changes.",
)
@click.option(
    "--fail-on",
    "fail_on",
    multiple=True,
    type=click.Choice(FAIL_ON),
    envvar="SORTER_FAIL_ON",
    help="Exit 3 when a file of this run failed, 4 when one disagrees with its header (repeatable; "
    "for cron and CI; the variable takes both, space-separated).",
)
@rules_option
@classify_options
def scan(
    paths: tuple[Path, ...],
    source: str | None,
    retry_failed: bool,
    fail_on: tuple[str, ...],
    rules: Path | None,
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
    """Register and classify every DICOM file under PATH... (resumable; re-runs skip finished files)."""
    settings = command_settings()
    if "discrepancy" in fail_on and settings.broker_url:
        raise click.UsageError(
            "--fail-on discrepancy needs in-process classification: with SORTER_BROKER_URL the "
            "workers classify after the scan has ended"
        )
    require_broker(settings.broker_url)
    if rules is not None and settings.broker_url:
        # SORTER_RULES set for the whole deployment must not stop a producer: the workers that
        # classify apply their own SORTER_RULES after each batch.
        click.echo(
            "rules: not applied here; the workers apply theirs (SORTER_RULES) as they classify",
            err=True,
        )
        rules = None
    rule_set = read_rules(rules) if rules is not None else None
    summary = RunSummary()
    batches, batches_lock = RulesReport(), threading.Lock()

    def on_rules(report: RulesReport) -> None:  # from the batch loop and the senders' thread
        with batches_lock:
            batches.add(report)

    with interruptible(), database(settings.database_url, create=True) as (engine, sessions):
        bar = progress_bar(progress, "scan")
        try:
            with executor_for(
                settings, sessions, summary, bar, statuses=CLAIMABLE, on_rules=on_rules
            ) as executor:
                Scan(
                    sessions,
                    executor,
                    summary,
                    source=source,
                    progress=bar,
                    exclude=sqlite_files(engine),
                    retry_failed=retry_failed,
                    # In process: what this model has not classified under PATH is classified too.
                    unseen_by=getattr(executor, "model_id", None),
                ).run([str(p) for p in paths])
            # After each batch (SORTER_RULES) and once more over PATH: what an earlier run classified,
            # and series that matched only once complete.
            report = apply_rules(sessions, rule_set, under=[str(p) for p in paths]) if rule_set else None
            if report is not None:
                with batches_lock:
                    report = report.after(batches)
        finally:
            if bar is not None:
                bar.close()
    print_summary(summary, json_summary)
    if report is not None:
        click.echo(report.line())
        if sum(report.failed.values()):
            click.echo("some rule actions failed: `sorter rules failed` lists them and why", err=True)
    exit_for_outcome(summary, fail_on)


def exit_for_outcome(summary: RunSummary, fail_on: Collection[str]) -> None:
    """Exit with ``FAIL_ON``'s status for the first outcome asked for that this run had."""
    failed = sum(summary.failed.values())
    if "failed" in fail_on and failed:
        click.echo(f"{failed} files failed: `sorter failures` lists them", err=True)
        raise click.exceptions.Exit(FAIL_ON["failed"])
    if "discrepancy" in fail_on and summary.discrepancies:
        click.echo(f"{summary.discrepancies} instances disagree: `sorter discrepancies` lists them", err=True)
        raise click.exceptions.Exit(FAIL_ON["discrepancy"])
