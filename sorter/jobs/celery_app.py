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

Losing Redis: the consumer reconnects (``broker_connection_retry``) and the batches
in flight go on; their acknowledgements reach the restarted Redis, or their
messages come back after ``visibility_timeout`` and claim nothing. Broker
connections use :class:`GuardedRedisChannel`, without which kombu stopped the
worker while tearing the broken connection down with a batch in flight; a worker
that stops on an error anyway makes ``sorter worker`` exit with its non-zero
status (:func:`worker_exit_status`), for the supervisor to restart it.

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
from queue import Empty
from typing import TYPE_CHECKING, Any

import redis.exceptions
from celery import Celery
from celery.app.amqp import AMQP
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from kombu import Connection
from kombu.transport import redis as kombu_redis

from sorter.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from sorter.metrics import BatchObserver, Metrics
    from sorter.model.classifier import Classifier
    from sorter.rules.engine import RulesHook

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
    #: ``SORTER_RULES`` applied after each committed batch (:func:`sorter.rules.engine.batch_hook`);
    #: its sender threads are daemons that end with the process.
    rules: RulesHook | None = None


class WorkerContext:
    """What one Celery app's worker keeps: its settings, each pool process's resident resources
    (made after each fork), the sweep thread's stop flag and the worker (``WorkController``) whose
    ``exitcode`` ``sorter worker`` exits with. It lives on the app (:func:`context`), not in
    module globals, so that tests and several apps in one process do not share it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop_sweeps = threading.Event()
        self.controller: Any = None
        self._state: WorkerState | None = None

    def state(self) -> WorkerState:
        """This process's resources, made on first use after a fork (and again after the next one)."""
        if self._state is not None and self._state.pid == os.getpid():
            return self._state
        if self._state is not None:  # inherited across a fork: never close the parent's connections
            self._state.engine.dispose(close=False)
            self._state = None
        self._state = _load_state(self.settings)
        return self._state

    @property
    def loaded(self) -> WorkerState | None:
        """This process's resources if already made (never makes them)."""
        return self._state if self._state is not None and self._state.pid == os.getpid() else None


#: The attribute of a Celery app that holds its :class:`WorkerContext`.
_CONTEXT = "sorter_context"


def context(app: Celery | None = None) -> WorkerContext:
    """The :class:`WorkerContext` of ``app`` (default: the current app); one from the
    environment's settings for an app that :func:`make_celery` did not make."""
    from celery import current_app

    target = app if app is not None else current_app
    found = getattr(target, _CONTEXT, None)
    if not isinstance(found, WorkerContext):
        found = WorkerContext(Settings.from_env())
        setattr(target, _CONTEXT, found)
    return found


class GuardedRedisChannel(kombu_redis.Channel):
    """kombu's Redis channel, made safe to close after Redis vanished while a batch was in flight.

    When the broker dies, Celery closes the consumer's connection twice: ``collect()``
    closes its channels and then detaches the transport (``transport.client = None``),
    then ``close()`` closes them again. kombu's ``Channel.close`` first reads the reply
    of a pending ``BRPOP`` and lets a connection error escape from it, so a channel
    that holds an unacknowledged message *and* waits on ``BRPOP`` (a pool process is
    free) stayed half-closed through ``collect()``. The second close then restored its
    unacknowledged message through a new connection pool built from the detached
    transport: ``AttributeError: 'NoneType' object has no attribute 'hostname'``,
    which no caller expects, and Celery stopped the worker ("Unrecoverable error").
    """

    def close(self) -> None:
        """Close, even when the pending ``BRPOP`` reply can no longer be read."""
        if self._in_poll and not self.closed:
            try:
                self._brpop_read()
            except Empty:
                pass
            except self.connection_errors:
                # The BRPOP socket went with Redis: nothing is left to read, and the rest of
                # the close (pools, unacknowledged messages) must still happen now, while the
                # transport can still make the connection pool that restoring needs.
                pass
        super().close()

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # A connection pool for a channel whose transport has been detached (any late
        # restore or ack after the broker was lost): report the lost broker the way the
        # callers expect (a connection error: "Couldn't ack", restore skipped) instead
        # of an AttributeError that stops the worker.
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection of this channel was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class GuardedRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`GuardedRedisChannel`."""

    Channel = GuardedRedisChannel


class GuardedConnection(Connection):
    """A kombu connection that uses :class:`GuardedRedisTransport` where kombu would use its Redis one.

    The URL keeps its ``redis://`` or ``rediss://`` scheme (and so kombu's TLS handling,
    and the address Celery logs); only the class behind it changes.
    """

    def get_transport_cls(self) -> type[Any]:
        """The transport class: kombu's own, except the guarded one for Redis."""
        cls: type[Any] = super().get_transport_cls()
        return GuardedRedisTransport if cls is kombu_redis.Transport else cls


class SorterAMQP(AMQP):
    """Celery's broker glue, making every broker connection a :class:`GuardedConnection`."""

    Connection = GuardedConnection
    BrokerConnection = GuardedConnection


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
    app = Celery(
        "sorter",
        broker=settings.broker_url,
        include=["sorter.jobs.tasks"],
        set_as_current=True,
        amqp=SorterAMQP,
    )
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
        # Celery 6 turns this on: on a broker outage it would kill the batches in flight,
        # and each kill counts as a try (MAX_ATTEMPTS), so a few outages would fail healthy
        # files. A batch that finishes during an outage commits; its message, if its ack is
        # lost, comes back after visibility_timeout and claims nothing.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        # Flower (in deploy/docker-compose.yml) and `celery events` see tasks only with events on.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    setattr(app, _CONTEXT, WorkerContext(settings))
    return app


def worker_state(app: Celery | None = None) -> WorkerState:
    """This process's resources for ``app`` (default: the current app); see :class:`WorkerContext`."""
    return context(app).state()


def _load_state(settings: Settings) -> WorkerState:
    # The model (and torch, unless a cached graph spares it) is loaded here, in the
    # worker process, never in the parent.
    from sorter.db.session import open_database
    from sorter.model.classifier import Classifier
    from sorter.pipeline import register_model
    from sorter.rules.engine import batch_hook

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
    state.rules = batch_hook(settings, sessions, state.metrics.rules_applied if state.metrics else None)
    return state


@worker_init.connect
def _remember_worker(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: keep the worker, to read its exit status once it stopped."""
    if sender is not None:
        context(sender.app).controller = sender


def worker_exit_status(app: Celery | None = None) -> int:
    """The status this process's Celery worker stopped with: 0 unless it stopped on an error.

    Celery sets it (1 after an "Unrecoverable error") but ``Celery.worker_main`` and
    ``Celery.start`` drop it, so without this ``sorter worker`` always exited 0.
    """
    code = getattr(context(app).controller, "exitcode", None)
    if not code:
        return 0
    return code if isinstance(code, int) else 1


@worker_process_init.connect
def _init_worker_process(**_: Any) -> None:
    """Warm up after the fork: this process's engine and resident model."""
    worker_state()


@worker_process_shutdown.connect
def _process_exited(pid: int | None = None, **_: Any) -> None:
    """In a pool process about to exit: the multiprocess bookkeeping of its metrics."""
    state = context().loaded
    if state is not None and state.metrics is not None:
        from sorter.metrics import process_exited

        process_exited(pid or os.getpid())


@worker_ready.connect
def _start_sweeps(sender: Any = None, **_: Any) -> None:
    """In the worker's main process: send a sweep now and every ``sweep_interval`` seconds."""
    if sender is None:
        return
    app = sender.app
    owned = context(app)
    settings, stop = owned.settings, owned.stop_sweeps
    if settings.sweep_interval <= 0:
        return
    stop.clear()

    def loop() -> None:
        while not stop.is_set():
            try:
                app.send_task(SWEEP_TASK, queue=settings.queue)
            except Exception:  # the broker is away; the next tick tries again
                log.warning("could not send the pending sweep", exc_info=True)
            stop.wait(settings.sweep_interval)

    threading.Thread(target=loop, daemon=True, name="pending-sweep").start()


@worker_shutdown.connect
def _stop_sweeping(sender: Any = None, **_: Any) -> None:
    context(sender.app if sender is not None else None).stop_sweeps.set()
