"""``sorter scan`` and ``sorter reclassify``: composition roots for batch classification.

Each builds the database, the model and the in-process executor, runs, and
prints a summary. Ctrl-C (or SIGTERM) rolls back the batches in flight and
exits with 130 (143 for SIGTERM); re-running the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from sorter.commands.common import command_settings, database, database_option, model_options
from sorter.commands.preflight import require_broker
from sorter.config import Settings
from sorter.domain import Label, Status
from sorter.errors import ModelError
from sorter.pipeline import Outcome, register_model
from sorter.scan import Executor, Scan
from sorter.summary import RunSummary

if TYPE_CHECKING:
    from sorter.jobs.local import LocalExecutor

F = Callable[..., Any]
log = logging.getLogger(__name__)


#: What a scan's executor may claim: new work, and ``done`` instances its model has not classified.
CLAIMABLE = (Status.PENDING, Status.DONE)

#: ``--fail-on`` choices and their exit statuses (1 and 2 are click's errors, 130/143 signals).
FAIL_ON = {"failed": 3, "discrepancy": 4}


def classify_options(func: F) -> F:
    """Options shared by ``scan`` and ``reclassify``: the model's, frames, summary, progress, database."""
    for option in reversed(
        [
            model_options,
            click.option(
                "--frames",
                type=int,
                envvar="SORTER_FRAMES",
                help="Frames classified per multi-frame instance.",
            ),
            click.option(
                "--json-summary",
                type=click.Path(dir_okay=False, path_type=Path),
                help="Also write the run summary as JSON to this file.",
            ),
            click.option(
                "--progress/--no-progress",
                default=None,
                help="Progress bar (default: when stderr is a terminal).",
            ),
            database_option,
        ]
    ):
        func = option(func)
    return func


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same rollback runs, but ending with status 143."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signum}")


@contextmanager
def model_and_executor(
    settings: Settings, sessions: sessionmaker[Session], summary: RunSummary, bar: tqdm[Any] | None, **kw: Any
) -> Iterator[LocalExecutor]:
    """Load the model, register it, and run an in-process executor that counts into ``summary``."""
    # Imported here, not at module level: decode processes started by a console
    # script re-import its __main__ (the CLI), and must not pay for the model's imports.
    from sorter.jobs.local import LocalExecutor
    from sorter.model.classifier import Classifier

    # Decode processes already occupy the cores; an inference thread pool as
    # wide as the machine on top of them slows every forward pass many times
    # over (threads wait on each other at each layer), so it gets what is left.
    spare_cores = (os.cpu_count() or 1) - settings.decode_workers
    try:
        classifier = Classifier.from_settings(settings, settings.inference_threads or max(1, spare_cores))
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    with sessions() as session:
        model_id = register_model(session, classifier)
        session.commit()

    # A second bar under the walk's: the walk reaches 100 % while batches are still classified.
    classified_bar = (
        tqdm(desc="classify", unit="inst", position=1, dynamic_ncols=True, smoothing=0.05, leave=True)
        if bar is not None
        else None
    )

    def on_batch(outcomes: list[Outcome]) -> None:
        summary.add_outcomes(outcomes)
        if classified_bar is not None:
            classified_bar.set_postfix(disagree=summary.discrepancies, failed=sum(summary.failed.values()))
            classified_bar.update(len(outcomes))

    executor = LocalExecutor(
        sessions,
        classifier,
        model_id,
        workers=settings.decode_workers,
        batch_size=settings.batch_size,
        frames=settings.frames,
        on_batch=on_batch,
        **kw,
    )
    try:
        with executor:
            yield executor
    finally:
        if classified_bar is not None:
            classified_bar.close()
        runtime = f"{classifier.runner.name} on {classifier.device}"
        summary.add_stages(executor.stage_seconds, executor.images_here, runtime)


@contextmanager
def executor_for(
    settings: Settings, sessions: sessionmaker[Session], summary: RunSummary, bar: tqdm[Any] | None, **kw: Any
) -> Iterator[Executor]:
    """The queue executor when ``SORTER_BROKER_URL`` is set, else :func:`model_and_executor` with ``kw``.

    With a broker no model is loaded here and ``kw`` (options of the in-process
    executor) does not apply: ``sorter worker`` processes classify, and the
    summary counts registrations only.
    """
    if not settings.broker_url:
        with model_and_executor(settings, sessions, summary, bar, **kw) as local:
            yield local
        return
    from sorter.jobs.celery_app import make_celery
    from sorter.jobs.queue import CeleryExecutor

    app = make_celery(settings)
    with CeleryExecutor(app, batch_size=settings.batch_size, queue=settings.queue) as queued:
        yield queued
    log.info("%d instances sent to queue %r", queued.sent, settings.queue)


def sqlite_files(engine: Engine) -> frozenset[str]:
    """The embedded database and its journals, never to be scanned as archive files."""
    name = engine.url.database if engine.dialect.name == "sqlite" else None
    if not name or name == ":memory:":
        return frozenset()
    base = os.path.abspath(name)
    return frozenset({base, base + "-wal", base + "-shm", base + "-journal"})


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def print_summary(summary: RunSummary, json_path: Path | None) -> None:
    """The final tables: header label x predicted label, verdicts, skipped and failed by reason."""
    data = summary.to_dict()
    rate = f" ({data['files_per_s']} files/s)" if data["files_per_s"] else ""
    click.echo(
        f"\n{plural(summary.files, 'file')} in {summary.elapsed_s:.1f} s{rate}: "
        f"{summary.registered} registered, {summary.unchanged} unchanged, "
        f"{plural(summary.duplicates, 'duplicate')}, {summary.resumed} resumed, "
        f"{summary.classified} classified, {plural(summary.discrepancies, 'discrepancy', 'discrepancies')}"
    )
    if summary.confusion:
        headers = sorted({h for h, _ in summary.confusion})
        labels = [label.value for label in Label if any(p == label.value for _, p in summary.confusion)]
        click.echo("\nheader \\ pixels " + "".join(f"{label:>7}" for label in labels))
        for header in headers:
            counts = "".join(f"{summary.confusion.get((header, label), 0):>7}" for label in labels)
            click.echo(f"{header:<16}{counts}")
        click.echo("\nverdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.verdicts.items())))
    for title, counter in (("skipped", summary.skipped), ("failed", summary.failed)):
        if counter:
            click.echo(f"{title}: " + ", ".join(f"{reason} {n}" for reason, n in counter.most_common()))
    stages = summary.stage_line()
    if stages:
        click.echo(stages)
    if json_path is not None:
        json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into a short message and exit status 130 and 143 (128 + the signal)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except KeyboardInterrupt as exc:
        click.echo(
            "\ninterrupted: committed batches are kept; run the same command again to resume", err=True
        )
        sys.exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_bar(enabled: bool | None, desc: str, total: int | None = None) -> tqdm[Any] | None:
    """A tqdm bar (files/s, ETA once the total is known) or ``None``."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(desc=desc, total=total, unit="file", dynamic_ncols=True, smoothing=0.05) if enabled else None


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--source",
    envvar="SORTER_SOURCE",
    help="Source name for every file (default: the first folder under each PATH).",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Read again unchanged files that failed for a reason that can heal (permissions, a "
    "vanished file, a missing codec); without it they are retried once their mode or ctime changes.",
)
@click.option(
    "--fail-on",
    "fail_on",
    multiple=True,
    type=click.Choice(FAIL_ON),
    help="Exit 3 when a file of this run failed, 4 when one disagrees with its header (repeatable; "
    "for cron and CI).",
)
@classify_options
def scan(
    paths: tuple[Path, ...],
    source: str | None,
    retry_failed: bool,
    fail_on: tuple[str, ...],
    model: Path | None,
    workers: int | None,
    batch_size: int | None,
    frames: int | None,
    device: str | None,
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
    summary = RunSummary()
    with interruptible(), database(settings.database_url) as (engine, sessions):
        bar = progress_bar(progress, "scan")
        try:
            with executor_for(settings, sessions, summary, bar, statuses=CLAIMABLE) as executor:
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
        finally:
            if bar is not None:
                bar.close()
    print_summary(summary, json_summary)
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
