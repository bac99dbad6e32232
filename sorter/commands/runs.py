"""What the commands that run the pipeline share: options, the executor with its progress bars,
signals, and the printed summary. Command modules import from here (and from
:mod:`sorter.jobs.executor`), never from each other."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from sorter import interrupts
from sorter.commands.common import check_output_file, database_option, model_options
from sorter.config import Settings
from sorter.db.session import sqlite_file
from sorter.domain import Label
from sorter.errors import ModelError
from sorter.fsutil import atomic_file
from sorter.jobs.executor import open_executor, open_local_executor
from sorter.summary import RunSummary

if TYPE_CHECKING:
    from sorter.domain import Outcome

F = Callable[..., Any]


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
                envvar="SORTER_JSON_SUMMARY",
                callback=check_output_file,
                help="Also write the run summary as JSON to this file.",
            ),
            click.option(
                "--progress/--no-progress",
                default=None,
                envvar="SORTER_PROGRESS",
                help="Progress bar (default: when stderr is a terminal).",
            ),
            database_option,
        ]
    ):
        func = option(func)
    return func


@contextmanager
def executor_for(
    settings: Settings,
    sessions: sessionmaker[Session],
    summary: RunSummary,
    bar: tqdm[Any] | None,
    local: bool = False,
    **kw: Any,
) -> Iterator[Any]:
    """:func:`sorter.jobs.executor.open_executor` for a command: a second progress bar counts
    classified instances under ``bar`` (the walk's reaches 100 % while batches are still
    classified), and a model that cannot be loaded is one line and status 1. ``local``: always
    the in-process executor (:func:`~sorter.jobs.executor.open_local_executor`), whose model id
    the caller needs."""
    classified_bar = (
        tqdm(desc="classify", unit="inst", position=1, dynamic_ncols=True, smoothing=0.05, leave=True)
        if bar is not None
        else None
    )

    def on_outcomes(outcomes: list[Outcome]) -> None:
        if classified_bar is not None:
            classified_bar.set_postfix(disagree=summary.discrepancies, failed=sum(summary.failed.values()))
            classified_bar.update(len(outcomes))

    try:
        opener = open_local_executor if local else open_executor
        with opener(settings, sessions, summary, on_outcomes, **kw) as executor:
            yield executor
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if classified_bar is not None:
            classified_bar.close()


def sqlite_files(engine: Engine) -> frozenset[str]:
    """The embedded database and its journals, never to be scanned as archive files."""
    path = sqlite_file(engine.url)
    if path is None:
        return frozenset()
    base = str(path)
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
    if summary.reused_uids:
        click.echo(
            f"reused UIDs: {plural(summary.reused_uids, 'duplicate')} from another series: another image "
            "under a SOP Instance UID already registered, not classified (each logged as a warning)"
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
    if summary.not_read_again:
        reasons = ", ".join(f"{reason} {n}" for reason, n in summary.not_read_again.most_common())
        click.echo(
            f"not read again: {reasons} (classified before; their files are gone or changed, so they keep "
            "their status and earlier predictions; `sorter scan` reads changed files again)"
        )
    if summary.queued:
        # "0 classified" alone read as if nothing had happened: the workers classify them.
        click.echo(
            f"queued: {plural(summary.queued, 'instance')} for `sorter worker` to classify "
            "(`sorter status` shows the backlog)"
        )
    stages = summary.stage_line()
    if stages:
        click.echo(stages)
    if json_path is not None:
        try:  # whole or not at all: a monitor reading it never sees half a summary
            json_path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(json_path, "w", encoding="utf-8") as out:
                out.write(json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            problem = exc.strerror or exc
            raise click.ClickException(f"cannot write the summary to {json_path}: {problem}") from exc


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into a short message and exit status 130 and 143 (128 + the signal).
    Neither is raised inside a database commit (:mod:`sorter.interrupts`)."""
    try:
        with interrupts.handled():
            yield
    except KeyboardInterrupt as exc:
        click.echo(
            "\ninterrupted: committed batches are kept; run the same command again to resume", err=True
        )
        sys.exit(128 + (signal.SIGTERM if isinstance(exc, interrupts.Terminated) else signal.SIGINT))


def progress_bar(
    enabled: bool | None, desc: str, total: int | None = None, unit: str = "file"
) -> tqdm[Any] | None:
    """A tqdm bar (``unit``/s, ETA once the total is known) or ``None``."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(desc=desc, total=total, unit=unit, dynamic_ncols=True, smoothing=0.05) if enabled else None
