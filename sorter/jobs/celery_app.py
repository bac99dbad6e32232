"""The Celery application: the distributed executor behind ``SORTER_BROKER_URL`` (ARCHITECTURE §1, §7, §8).

Producers (``sorter scan``, ``listen``, ``watch``) send batches of instance ids
after their registration committed; ``sorter worker`` processes classify them
with :func:`sorter.pipeline.classify_batch`. Only ids cross the broker, as JSON.

Reliability: a task is acknowledged after it ran (``acks_late``) and put back
when its worker process dies (``task_reject_on_worker_lost``); each process
takes one task at a time (prefetch 1). A worker machine that vanishes leaves
its message unacknowledged in Redis, which redelivers it after
``visibility_timeout``; its database transaction rolls back, so the instances
are still ``pending``, and the claim re-checks the status, so an id delivered
twice is classified once. Anything still ``pending`` after ``sweep_age`` (a
message lost with a broker restart, a producer that died between commit and
send) is re-enqueued by a sweep that each worker triggers every
``sweep_interval`` seconds.

Per-process resources are made after the fork, in ``worker_process_init``:
inherited engines are disposed of without closing the parent's connections, and
the model is loaded once per process (on the GPU when there is one) and stays
resident. The parent never touches CUDA.

Metrics (``--metrics-port``): each pool process makes its own
:class:`~sorter.metrics.Metrics` in ``worker_process_init``, written to the
multiprocess folder that ``sorter worker`` set up before the fork; the main
process serves their sum.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown

from sorter.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from sorter.metrics import BatchObserver, Metrics
    from sorter.model.classifier import Classifier

log = logging.getLogger(__name__)

#: Task names: producers send by name, so they never import the task module (or torch).
CLASSIFY_TASK = "sorter.classify_ids"
SWEEP_TASK = "sorter.sweep_pending"
#: Seconds a new pool process may take to open its engine and load the model.
PROCESS_START_TIMEOUT_S = 120.0


@dataclass
class WorkerState:
    """One worker process's resident resources."""

    pid: int
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    classifier: Classifier
    model_id: int
    #: This process's metrics, when the worker serves them (``--metrics-port``).
    metrics: Metrics | None = None
    observe: BatchObserver | None = None


_settings: Settings | None = None
_state: WorkerState | None = None
_stop_sweeps = threading.Event()


def make_celery(settings: Settings) -> Celery:
    """The Celery app for ``settings.broker_url``; JSON only, late acks, prefetch 1, no results.

    Parameters
    ----------
    settings
        ``broker_url`` (``SORTER_BROKER_URL``) must be set; ``queue`` names the
        default queue, and worker processes read the database, model, device
        and frames from the same settings.

    Raises
    ------
    ValueError
        No broker URL.
    """
    if not settings.broker_url:
        raise ValueError("SORTER_BROKER_URL is not set: there is no queue to use")
    global _settings
    _settings = settings
    app = Celery("sorter", broker=settings.broker_url, include=["sorter.jobs.tasks"], set_as_current=True)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A pool process reports for work only after worker_process_init has loaded
        # the model, which takes longer than Celery's default 4 s on a cold GPU.
        worker_proc_alive_timeout=PROCESS_START_TIMEOUT_S,
        task_default_queue=settings.queue,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def worker_state() -> WorkerState:
    """This process's resources, made on first use after a fork (and again after the next one)."""
    global _state
    if _state is not None and _state.pid == os.getpid():
        return _state
    if _state is not None:  # inherited across a fork: never close the parent's connections
        _state.engine.dispose(close=False)
        _state = None
    _state = _load_state(_settings or Settings.from_env())
    return _state


def _load_state(settings: Settings) -> WorkerState:
    # The model (and torch, unless a cached graph spares it) is loaded here, in the
    # worker process, never in the parent.
    from sorter.db.session import open_database
    from sorter.model.classifier import Classifier
    from sorter.pipeline import register_model

    # One inference thread pool per process, sharing the cores with the others.
    cores = os.cpu_count() or 1
    threads = settings.inference_threads or max(1, cores // max(1, settings.concurrency))
    engine, sessions = open_database(settings.database_url)
    try:
        classifier = Classifier.from_settings(settings, threads)
        with sessions() as session:
            model_id = register_model(session, classifier)
            session.commit()
    except BaseException:
        engine.dispose()
        raise
    log.info("worker process %d: model %s on %s", os.getpid(), classifier.sha256[:12], classifier.device)
    state = WorkerState(os.getpid(), settings, engine, sessions, classifier, model_id)
    if settings.metrics_port:
        from sorter.metrics import Metrics, multiprocess_enabled

        if multiprocess_enabled():
            state.metrics = Metrics()
            state.observe = state.metrics.batch_observer(sessions)
        else:  # values in this process alone would never reach the main process's endpoint
            log.warning("worker process %d: metrics off (no multiprocess folder)", os.getpid())
    return state


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    """Warm up after the fork: this process's engine and resident model."""
    worker_state()


@worker_process_shutdown.connect
def _process_exited(pid: int | None = None, **_: Any) -> None:
    """In a pool process about to exit: the multiprocess bookkeeping of its metrics."""
    if _state is not None and _state.metrics is not None:
        from sorter.metrics import process_exited

        process_exited(pid or os.getpid())


@worker_ready.connect
def _start_sweeps(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: send a sweep now and every ``sweep_interval`` seconds."""
    settings = _settings
    if settings is None or settings.sweep_interval <= 0 or sender is None:
        return
    app = sender.app
    _stop_sweeps.clear()

    def loop() -> None:
        while not _stop_sweeps.is_set():
            try:
                app.send_task(SWEEP_TASK, queue=settings.queue)
            except Exception:  # the broker is away; the next tick tries again
                log.warning("could not send the pending sweep", exc_info=True)
            _stop_sweeps.wait(settings.sweep_interval)

    threading.Thread(target=loop, daemon=True, name="pending-sweep").start()


@worker_shutdown.connect
def _stop_sweeping(**_: Any) -> None:
    _stop_sweeps.set()
