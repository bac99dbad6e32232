"""``sorter listen``: the composition root of the DICOM Storage SCP.

Builds the settings, the spool worker (database, model and in-process
executor, opened on its own thread and reopened after an outage) and the AE,
then serves until SIGINT or SIGTERM; on either it stops accepting
associations, registers what is queued and exits 0 (Ctrl-C) or 143 (SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.orm import Session, sessionmaker

from sorter.commands.common import (
    blank_is_unset,
    cannot_bind,
    command_settings,
    database_option,
    metrics_options,
    metrics_server,
    model_options,
)
from sorter.commands.preflight import AeTitles, exit_for_signal, validate_ae_title
from sorter.commands.rules import rules_option
from sorter.commands.runs import executor_for
from sorter.config import Settings
from sorter.db.session import open_database
from sorter.dicom.storage import has_free_space
from sorter.jobs.executor import Executor
from sorter.retention import Retention, parse_retention
from sorter.spool import Backend, SpoolWorker
from sorter.summary import RunSummary

if TYPE_CHECKING:
    from sorter.listener import Sink
    from sorter.metrics import ListenerMetrics, Metrics

log = logging.getLogger(__name__)


def backend(settings: Settings, summary: RunSummary, metrics: Metrics | None = None) -> Backend:
    """``(sessions, executor)`` contexts for the spool worker; entering fails while the database is away."""

    @contextmanager
    def connect() -> Iterator[tuple[sessionmaker[Session], Executor]]:
        engine, sessions = open_database(settings.database_url)
        observer = metrics.batch_observer(sessions) if metrics is not None else None
        on_rules = metrics.rules_applied if metrics is not None else None
        try:
            with executor_for(
                settings, sessions, summary, None, observer=observer, on_rules=on_rules
            ) as executor:
                yield sessions, executor
        finally:
            engine.dispose()

    return connect


def _spool_sweep_interval(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """SORTER_SWEEP_INTERVAL used to set this too; it is the workers' re-queue sweep now."""
    source = ctx.get_parameter_source(param.name or "")
    old = os.environ.get("SORTER_SWEEP_INTERVAL")
    if source is click.core.ParameterSource.DEFAULT and old is not None:
        click.echo(
            "warning: SORTER_SWEEP_INTERVAL for the listener is deprecated (it also sets the workers' "
            "re-queue sweep): set SORTER_SPOOL_SWEEP_INTERVAL",
            err=True,
        )
        try:
            value = float(old)
        except ValueError as exc:
            raise click.BadParameter(f"SORTER_SWEEP_INTERVAL={old!r} is not a number of seconds") from exc
        if not value >= 0:  # also NaN
            raise click.BadParameter(f"SORTER_SWEEP_INTERVAL={old!r} must be 0 or more seconds")
    return value


def _retention(_ctx: click.Context, _param: click.Parameter, value: str) -> Retention:
    try:
        return parse_retention(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command()
@click.option(
    "--ae-title",
    envvar="SORTER_AE_TITLE",
    required=True,
    callback=validate_ae_title,
    help="Our AE title (at most 16 characters).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    envvar="SORTER_PORT",
    required=True,
    help="TCP port to listen on.",
)
@click.option("--bind", envvar="SORTER_BIND", default="0.0.0.0", show_default=True, help="Address to bind.")
@click.option(
    "--spool",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SORTER_SPOOL",
    default=Path("spool"),
    show_default=True,
    help="Folder received instances are written to (<study>/<series>/<sop>.dcm).",
)
@click.option(
    "--allow-ae",
    "allow_ae",
    multiple=True,
    type=AeTitles(),
    envvar="SORTER_ALLOW_AE",
    callback=validate_ae_title,
    help="Calling AE title allowed to associate (repeat; env: space separated, or comma separated "
    "for titles with inner spaces). Default: any.",
)
@click.option(
    "--max-associations",
    type=click.IntRange(min=1),
    envvar="SORTER_MAX_ASSOCIATIONS",
    default=10,
    show_default=True,
    help="Concurrent associations; the next one is rejected (local limit exceeded).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    envvar="SORTER_TIMEOUT",
    default=30.0,
    show_default=True,
    help="Network, ACSE and DIMSE timeout in seconds; also the most a whole PDU may take to arrive "
    "(the association request: from the connection, TLS handshake included).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="SORTER_TLS_CERT",
    help="Server certificate (PEM); enables TLS.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="SORTER_TLS_KEY",
    help="Private key of --tls-cert (PEM).",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="SORTER_TLS_CA",
    help="CA bundle: clients must present a certificate it signed (mutual TLS).",
)
@click.option(
    "--min-free-mb",
    type=click.IntRange(min=0),
    envvar="SORTER_MIN_FREE_MB",
    default=1024,
    show_default=True,
    help="Refuse associations and stores while the spool volume has less free space.",
)
@click.option(
    "--source",
    envvar="SORTER_SOURCE",
    callback=blank_is_unset,
    help="Source name for every instance (default: the calling AE).",
)
@click.option(
    "--spool-sweep-interval",
    "--sweep-interval",  # the earlier name, kept
    "sweep_interval",
    # 0 or less swept the whole spool after every batch (a full walk each second); 0 is "off" now,
    # as for the workers' sweep: the sweeps at start-up and at each reconnection still run.
    type=click.FloatRange(min=0),
    envvar="SORTER_SPOOL_SWEEP_INTERVAL",
    default=300.0,
    show_default=True,
    callback=_spool_sweep_interval,
    help=(
        "Seconds between spool sweeps that register files the queue missed; 0: only at start-up"
        " and reconnection."
    ),
)
@click.option(
    "--sweep-grace",
    type=click.FloatRange(min=0),
    envvar="SORTER_SWEEP_GRACE",
    default=60.0,
    show_default=True,
    help=(
        "Age a spool file without its calling AE in its meta (written by an older version) must reach"
        " before a sweep registers it; files that record it are registered at once."
    ),
)
@click.option(
    "--spool-retention",
    envvar="SORTER_SPOOL_RETENTION",
    default="keep",
    show_default=True,
    callback=_retention,
    help="keep, delete-after-classify, or age:N[s|m|h|d]: delete spool files the database knows "
    "(classified, skipped, or failed for good), at once or at that age. Pending and retryable "
    "files are never deleted.",
)
@model_options
@rules_option
@metrics_options
@database_option
def listen(
    ae_title: str,
    port: int,
    bind: str,
    spool: Path,
    allow_ae: tuple[str, ...],
    max_associations: int,
    timeout: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    min_free_mb: int,
    source: str | None,
    model: Path | None,
    workers: int | None,
    batch_size: int | None,
    device: str | None,
    full_decode: bool | None,
    sweep_interval: float,
    sweep_grace: float,
    spool_retention: Retention,
    metrics_port: int | None,
    metrics_bind: str | None,
    database_url: str | None,
    rules: Path | None,
) -> None:
    """Receive instances by DICOM C-STORE, store them in the spool, register and classify them."""
    from sorter import listener  # pynetdicom costs every other command a quarter of a second
    from sorter.associations import AssociationTracker
    from sorter.metrics import ListenerMetrics

    settings = command_settings(exclude=("sweep_interval",))
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-ca needs --tls-cert and --tls-key")
    context = listener.tls_context(tls_cert, tls_key, tls_ca) if tls_cert and tls_key else None
    require_spool(spool)
    config = listener.ListenerConfig(
        ae_title=ae_title,
        port=port,
        spool=spool.absolute(),
        bind=bind,
        allowed_aes=tuple(allow_ae),
        max_associations=max_associations,
        timeout_s=timeout,
        min_free_bytes=min_free_mb * 1024 * 1024,
        ssl_context=context,
    )
    stop = threading.Event()
    state: dict[str, Any] = {}

    def health() -> dict[str, Any]:
        """Ready while accepting and above the free-space floor; the database is reported, not
        required: the spool keeps what arrives during an outage."""
        spool_ok = has_free_space(config.spool, config.min_free_bytes)
        accepting = "server" in state and not stop.is_set()
        connected = bool(state.get("worker") and state["worker"].connected)
        return {
            "ok": accepting and spool_ok,
            "accepting": accepting,
            "spool_above_floor": spool_ok,
            "database": "connected" if connected else "unavailable",
        }

    with metrics_server(settings, health) as metrics:
        gauges = ListenerMetrics(metrics, config.spool) if metrics is not None else None
        worker = SpoolWorker(
            config.spool,
            backend(settings, RunSummary(), metrics),
            source=source,
            batch_size=settings.batch_size,
            sweep_s=sweep_interval,
            grace_s=sweep_grace,
            on_rejected=metrics.unclassified if metrics is not None else None,
            retention=spool_retention,
            on_backlog=gauges.backlog if gauges is not None else None,
            tick_s=min(15.0, sweep_interval or 15.0),  # retention and backlog: at least every sweep
        )
        state["worker"] = worker
        tracker = AssociationTracker(gauges.association if gauges is not None else None)
        received: list[int] = []

        def request_stop(signum: int, _frame: object) -> None:
            received.append(signum)
            stop.set()

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            worker.start()
            try:
                server = listener.start(config, counted(worker.offer, metrics, gauges), tracker)
            except OSError as exc:
                raise cannot_bind("listen", bind, port, exc) from exc
            state["server"] = server
            click.echo(
                f"listening as {ae_title} on {bind}:{port}; spool {config.spool} "
                f"(retention: {spool_retention})",
                err=True,
            )
            stop.wait()
            click.echo("stopping: no new associations; registering what was received", err=True)
            server.shutdown()
        finally:
            worker.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    exit_for_signal(received)


def require_spool(spool: Path) -> None:
    """Create the spool folder and prove it writable, or exit with one line that names the problem
    (left to the listener, it surfaced as "cannot listen on ...: Not a directory")."""
    import tempfile

    try:
        spool.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=spool):
            pass
    except OSError as exc:
        raise click.ClickException(
            f"cannot use the spool folder {spool}: {exc.strerror or exc}; choose another with --spool"
        ) from exc


def counted(sink: Sink, metrics: Metrics | None, gauges: ListenerMetrics | None = None) -> Sink:
    """``sink``, counting each received instance by calling AE when ``metrics`` is on."""
    if metrics is None:
        return sink

    def count_and_offer(path: Path, calling_ae: str) -> object:
        metrics.received(calling_ae)
        if gauges is not None:
            gauges.stored()
        return sink(path, calling_ae)

    return count_and_offer
