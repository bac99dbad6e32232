"""``sorter classify``: classify files or folders and print JSON lines or a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from sorter.commands.common import device_option, full_decode_option
from sorter.config import Settings
from sorter.errors import ModelError
from sorter.fspath import display_path


def _table_row(record: dict[str, Any]) -> str:
    if "status" in record:
        return f"{record['status']:<9} {record['reason']:<28} {'':>6}  {display_path(record['path'])}"
    return (
        f"{record['header_label'] or '-':<4} -> {record['label']:<4} {record['confidence']:>6.3f}  "
        f"{record['verdict']:<11} {display_path(record['path'])}"
    )


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (ARCHITECTURE §6).")
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="SORTER_MODEL",
    help="Model artefact (default: the bundled model).",
)
@click.option("--batch-size", type=int, envvar="SORTER_BATCH_SIZE", help="Images per forward pass.")
@click.option(
    "--frames",
    type=int,
    envvar="SORTER_FRAMES",
    help="Frames averaged per multi-frame instance (default 1: the middle frame).",
)
@device_option
@full_decode_option
def classify(
    paths: tuple[Path, ...],
    as_json: bool,
    model: Path | None,
    batch_size: int | None,
    frames: int | None,
    device: str | None,
    full_decode: bool | None,
) -> None:
    """Classify DICOM files (or folders, recursively) by what their pixels show."""
    # Imported here: torch is heavy, and decode processes re-import the CLI module.
    from sorter.classify import classify_paths
    from sorter.model.classifier import Classifier

    settings = Settings.from_env(
        model=model, batch_size=batch_size, frames=frames, device=device, full_decode=full_decode
    )
    try:
        classifier = Classifier.from_settings(settings, threads=settings.inference_threads or None)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    from sorter.dicom import native

    if sys.stderr is sys.__stderr__:  # the process's own (a test runner's capture is left alone)
        native.install()  # OpenJPEG's complaints go into the file's detail, not between the rows
    readable = classified = total = 0
    if not as_json:
        click.echo(f"{'head':<4}    {'pix':<4} {'conf':>6}  {'verdict':<11} path")
    records = classify_paths(paths, classifier, settings.batch_size, settings.frames, settings.full_decode)
    for record in records:
        total += 1
        classified += "status" not in record
        readable += record.get("status") != "failed"
        click.echo(json.dumps(record) if as_json else _table_row(record))
    if not as_json:
        click.echo(f"{classified} of {total} files classified", err=True)
    if total and not readable:  # the contract: non-zero only when nothing could be read
        sys.exit(1)
