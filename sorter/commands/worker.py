"""``sorter worker``: the composition root of a Celery worker that classifies queued batches.

The main process checks the database schema, then forks ``--concurrency``
processes; each opens its own engine and loads the model once (GPU when
present) in ``worker_process_init``. Start as many workers, on as many
machines, as the database and the broker can serve.

With ``--metrics-port`` the main process serves Prometheus metrics summed over
its pool processes (prometheus_client's multiprocess mode; see
:mod:`sorter.metrics`), in ``PROMETHEUS_MULTIPROC_DIR`` when it is set, else in
a temporary folder removed on exit.

The command exits with the Celery worker's status: 0 after a shutdown asked for
(SIGTERM), non-zero when the worker stopped on an error, so that a supervisor
(systemd ``Restart=on-failure``, compose ``restart:``) starts it again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sorter.commands.common import (
    cannot_bind,
    command_settings,
    database_option,
    device_option,
    full_decode_option,
    metrics_options,
)
from sorter.commands.rules import rules_option
from sorter.db.session import DatabaseError, open_database
from sorter.logs import json_logs


@click.command()
@click.option(
    "--broker-url", envvar="SORTER_BROKER_URL", help="Celery broker, e.g. redis://host:6379/0 (required)."
)
@click.option("--queue", envvar="SORTER_QUEUE", help="Queue to consume (default: sorter).")
@click.option(
    "--concurrency",
    type=int,
    envvar="SORTER_CONCURRENCY",
    help="Worker processes, each with its own resident model (default: 1).",
)
@click.option(
    "--loglevel",
    envvar="SORTER_LOGLEVEL",
    default="INFO",
    show_default=True,
    help="Celery log level.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="SORTER_MODEL",
    help="Model artefact (default: the bundled model).",
)
@device_option
@click.option(
    "--frames", type=int, envvar="SORTER_FRAMES", help="Frames classified per multi-frame instance."
)
@full_decode_option
@click.option(
    "--sweep-interval",
    type=float,
    envvar="SORTER_SWEEP_INTERVAL",
    help="Seconds between sweeps for instances stuck in pending; 0: off (default: 300).",
)
@click.option(
    "--sweep-age",
    type=float,
    envvar="SORTER_SWEEP_AGE",
    help="Seconds an instance must have been pending before a sweep re-enqueues it (default: 900).",
)
@click.option(
    "--hostname",
    envvar="SORTER_WORKER_HOSTNAME",
    help="Celery node name (default: celery@<host>); unique per worker on one host.",
)
@rules_option
@metrics_options
@database_option
def worker(
    broker_url: str | None,
    queue: str | None,
    concurrency: int | None,
    loglevel: str,
    model: Path | None,
    device: str | None,
    frames: int | None,
    full_decode: bool | None,
    sweep_interval: float | None,
    sweep_age: float | None,
    hostname: str | None,
    metrics_port: int | None,
    metrics_bind: str | None,
    database_url: str | None,
    rules: Path | None,
) -> None:
    """Classify batches queued by scan/listen/watch (Celery; needs SORTER_BROKER_URL)."""
    settings = command_settings()
    if not settings.broker_url:
        raise click.UsageError("no broker: set --broker-url or SORTER_BROKER_URL")
    # Fail fast on a database that cannot serve (unreachable, outdated schema); the
    # engine is gone before the fork, so no process inherits its connections.
    try:
        engine, _ = open_database(settings.database_url)
    except DatabaseError as exc:
        raise click.ClickException(str(exc)) from exc
    engine.dispose()

    from sorter.jobs.celery_app import make_celery

    app = make_celery(settings)
    argv = [
        "worker",
        f"--concurrency={max(1, settings.concurrency)}",
        f"--loglevel={loglevel}",
        f"--queues={settings.queue}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if json_logs():
        # Celery's banner is text on stdout: JSON logs only, one object per line. A global option,
        # so before the sub-command.
        argv.insert(0, "--quiet")
        _say_through_logging()
    if not settings.metrics_port:
        _run(app, argv)
        return

    from sorter.metrics import multiprocess_dir, remove_multiprocess_dir, start_multiprocess_server

    folder, made = multiprocess_dir()  # before the fork, and before any metric exists
    try:
        try:
            server = start_multiprocess_server(settings.metrics_port, settings.metrics_bind, folder)
        except OSError as exc:
            raise cannot_bind("serve metrics", settings.metrics_bind, settings.metrics_port, exc) from exc
        click.echo(f"metrics on http://{settings.metrics_bind}:{settings.metrics_port}/metrics", err=True)
        try:
            _run(app, argv)
        finally:
            server.shutdown()
            server.server_close()
    finally:
        remove_multiprocess_dir(folder, made)


def _say_through_logging() -> None:
    """Celery's signal handlers print "worker: Warm shutdown" and the like straight to the
    terminal (``celery.apps.worker.safe_say``), whatever the logging setup: in JSON mode they
    must be log records too. Celery has no setting for it, hence the replacement."""
    import logging

    import celery.apps.worker as celery_worker

    say = logging.getLogger("celery.apps.worker")

    def safe_say(msg: str, f: Any = None) -> None:
        say.warning("%s", msg)

    celery_worker.safe_say = safe_say


def _run(app: Any, argv: list[str]) -> None:
    """Run the Celery worker until it stops; exit with its status when that is not 0.

    Celery returns normally even from a worker stopped by an error ("Unrecoverable
    error", status 1): exiting 0 then would look like a clean stop to
    ``Restart=on-failure``, which would leave the worker down.
    """
    from sorter.jobs.celery_app import worker_exit_status

    app.worker_main(argv)
    status = worker_exit_status(app)
    if status:
        raise click.exceptions.Exit(status)
