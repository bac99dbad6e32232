"""Options and output shared by the database commands: the URL, and table/CSV/JSON printing."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import click
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sorter.config import Settings
from sorter.db.session import DatabaseError, open_database, sqlite_file

if TYPE_CHECKING:
    from sorter.metrics import HealthCheck, Metrics

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "csv", "json")
#: Rows used to size table columns; later rows are printed as they come.
_TABLE_SAMPLE = 200


def cannot_bind(what: str, host: str, port: int, exc: OSError) -> click.ClickException:
    """One line for a port that cannot be had, with what to do about the usual causes (an admin
    who sets the DICOM port 104 under the systemd unit's unprivileged user got "Permission
    denied" and nothing more)."""
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = " (another program, or another sorter, has it; choose another port)"
    elif exc.errno in (errno.EACCES, errno.EPERM) and 0 < port < 1024:
        hint = (
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE: add"
            " AmbientCapabilities=CAP_NET_BIND_SERVICE to the systemd unit, or use a port from 1024 up,"
            " such as 11112)"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = " (no network interface of this machine has that address; 0.0.0.0 means every one)"
    return click.ClickException(f"cannot {what} on {host}:{port}: {exc.strerror or exc}{hint}")


def database_option(func: F) -> F:
    """``--database-url`` (``SORTER_DATABASE_URL``; default: ``sorter.db`` here)."""
    return click.option(
        "--database-url",
        envvar="SORTER_DATABASE_URL",
        help="SQLAlchemy URL (default: sqlite:///sorter.db in the working directory).",
    )(func)


def command_settings(exclude: Collection[str] = ()) -> Settings:
    """Settings from ``SORTER_`` variables, overridden by the current command's options of the same name.

    An option left unset (``None``) keeps the environment's value. ``exclude``
    names options that share a field's name but not its meaning.
    """
    fields_ = {f.name for f in dataclasses.fields(Settings)} - set(exclude)
    params = click.get_current_context().params
    return Settings.from_env(**{name: value for name, value in params.items() if name in fields_})


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    from sorter.commands.preflight import require_device

    require_device(value)
    return value


#: ``--device``, refused at start when this host cannot run on it (no traceback, no worker that
#: reports ready and then fails every task).
device_option = click.option(
    "--device",
    envvar="SORTER_DEVICE",
    callback=_check_device,
    help="cpu, cuda, cuda:N (default: CUDA when available, else CPU).",
)


#: ``--full-decode``: every pixel of JPEG 2000 and JPEG frames, instead of the reduced resolution
#: that still covers the model's input (sorter.dicom.reduced); for comparing the two.
full_decode_option = click.option(
    "--full-decode/--reduced-decode",
    "full_decode",
    default=None,
    envvar="SORTER_FULL_DECODE",
    help="Decode JPEG 2000 and JPEG frames at full resolution (default: at the coarsest resolution "
    "that still covers the model's input, several times faster on radiographs).",
)


def model_options(func: F) -> F:
    """``--model``, ``--workers``, ``--batch-size``, ``--device`` and ``--full-decode``: every command
    that runs the model."""
    options = [
        click.option(
            "--model",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            envvar="SORTER_MODEL",
            help="Model artefact (default: the bundled model).",
        ),
        click.option(
            "--workers", type=int, envvar="SORTER_WORKERS", help="Decode processes (default: one per core)."
        ),
        click.option(
            "--batch-size",
            type=int,
            envvar="SORTER_BATCH_SIZE",
            help="Images per forward pass and per transaction.",
        ),
        device_option,
        full_decode_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def metrics_options(func: F) -> F:
    """``--metrics-port`` and ``--metrics-bind``: the Prometheus endpoint of a long-running command."""
    func = click.option(
        "--metrics-bind",
        envvar="SORTER_METRICS_BIND",
        help="Address of the metrics server (default 127.0.0.1).",
    )(func)
    return click.option(
        "--metrics-port",
        type=click.IntRange(min=0, max=65535),
        envvar="SORTER_METRICS_PORT",
        help="Serve Prometheus metrics on http://BIND:PORT/metrics and health on /healthz (default 0: off).",
    )(func)


@contextmanager
def metrics_server(settings: Settings, health: HealthCheck | None = None) -> Iterator[Metrics | None]:
    """A :class:`~sorter.metrics.Metrics` served over HTTP while the command runs (with ``health``
    on ``/healthz``), or ``None`` when off."""
    if not settings.metrics_port:
        yield None
        return
    from sorter.metrics import Metrics, start_metrics_server

    metrics = Metrics()
    try:
        server = start_metrics_server(settings.metrics_port, settings.metrics_bind, metrics, health)
    except OSError as exc:
        raise cannot_bind("serve metrics", settings.metrics_bind, settings.metrics_port, exc) from exc
    click.echo(f"metrics on http://{settings.metrics_bind}:{settings.metrics_port}/metrics", err=True)
    try:
        yield metrics
    finally:
        server.shutdown()
        server.server_close()


def format_option(func: F) -> F:
    """``--format table|csv|json``."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="Output format.",
    )(func)


def blank_is_unset(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A value of spaces only is the option left out: ``--source "  "`` recorded no source at all
    instead of the default (the folder or the calling AE)."""
    return (value.strip() or None) if isinstance(value, str) else value


def check_output_file(_ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """An option's file to write, checked before any work (a summary written after an hour's scan
    into a folder that could not be made failed with a traceback at the end)."""
    if value is not None:
        _check_writable(value.parent, param)
    return value


def check_output_folder(_ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """An option's folder to write in, checked before any work."""
    if value is not None:
        _check_writable(value, param)
    return value


def _check_writable(folder: Path, param: click.Parameter) -> None:
    """``folder``, or the nearest of its parents that exists (the command makes the rest), must take
    a new file. A real file is tried: root passes every permission check, and some file systems
    (/proc, a read-only mount) refuse all the same."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        problem = exc.strerror or exc
        raise click.BadParameter(f"cannot write in the folder {existing}: {problem}", param=param) from exc


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite ``url`` when it does not exist yet (``None`` for an existing file,
    an in-memory database or another backend)."""
    path = sqlite_file(url)
    return path if path is not None and not path.exists() else None


@contextmanager
def database(url: str | None, create: bool = False) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    """Open the configured database for one command; a clear error when it cannot be used.

    A command that only reads results (``create=False``) refuses a SQLite file that does not
    exist, rather than creating an empty database and answering that it holds nothing: run in
    the wrong directory, ``sorter find`` would otherwise print no rows and leave a stray
    ``sorter.db`` behind.
    """
    settings = Settings.from_env(database_url=url)
    missing = None if create else missing_sqlite_file(settings.database_url)
    if missing is not None:
        raise click.ClickException(
            f"no results database at {missing}: `sorter scan PATH` (or listen, watch) creates it; "
            "or point --database-url / SORTER_DATABASE_URL at the one they wrote"
        )
    try:
        engine, sessions = open_database(settings.database_url, migrate_new=create)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield engine, sessions
    finally:
        engine.dispose()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def write_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], out: TextIO) -> int:
    """Print aligned columns; returns the number of rows."""
    iterator = iter(rows)
    sample = [dict(r) for _, r in zip(range(_TABLE_SAMPLE), iterator, strict=False)]
    widths = {c: max([len(c), *(len(_cell(r.get(c))) for r in sample)]) for c in columns}
    out.write("  ".join(c.ljust(widths[c]) for c in columns).rstrip() + "\n")
    count = 0
    for row in [*sample, *iterator]:
        out.write("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns).rstrip() + "\n")
        count += 1
    return count


def write_rows(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str], fmt: str, out: TextIO | None = None
) -> int:
    """Print ``rows`` as a table, CSV, or a JSON array (streamed); returns the number of rows."""
    out = out or sys.stdout
    if fmt == "table":
        return write_table(rows, columns, out)
    count = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
            count += 1
        return count
    out.write("[")
    for row in rows:
        out.write(("," if count else "") + "\n" + json.dumps({c: row.get(c) for c in columns}, default=str))
        count += 1
    out.write("\n]\n")
    return count


def view_model_option(func: F) -> F:
    """``--model NAME|SHA`` on a query command: show that model's predictions, not the active one's."""
    return click.option(
        "--model",
        "model_ref",
        metavar="NAME|SHA",
        help="Show this model's predictions (a name or sha256 prefix from `sorter models`) "
        "instead of the active model's.",
    )(func)


def show_model(session: Session, ref: str | None) -> None:
    """Within ``session``'s transaction, make ``ref`` the model the views show; the session must be
    closed without a commit, which rolls the switch back.

    The same statement as ``sorter models use``, so every view (instance, series, study) answers for
    that model exactly as it would once active. On PostgreSQL it holds row locks on the instances
    that model classified until the query ends.
    """
    if ref is None:
        return
    from sorter.db import catalogue

    try:
        catalogue.activate(session, catalogue.resolve(session, ref).id)
    except catalogue.UnknownModel as exc:
        raise click.ClickException(str(exc)) from exc
