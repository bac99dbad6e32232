"""Celery tasks: thin wrappers around :mod:`sorter.pipeline`; reliability is declared here.

``classify_ids`` claims, decodes (in this process: concurrency comes from the
worker processes), infers and writes one batch in one transaction. Transient
database and I/O errors are retried with exponential backoff; once the retries
are spent, the batch's instances that are still ``pending`` are marked
``failed`` with ``retries_exhausted`` (any other error: ``task_error``), so
every instance reaches a terminal status.

When the worker serves metrics, each batch that claimed anything is observed
after its commit (outcomes by status and reason, batch size, queue latency and
the time of the batch less its decoding, as the in-process executor measures
it); instances given up on are counted failed by reason. Metrics never fail a
task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from celery import Task, shared_task

from sorter.db import queries
from sorter.db.queries import instances
from sorter.db.session import describe_database
from sorter.decode import decoder_for
from sorter.domain import FailureReason, Status
from sorter.jobs.celery_app import CLASSIFY_TASK, SWEEP_TASK, worker_state
from sorter.pipeline import Decoder, classify_batch

log = logging.getLogger(__name__)

#: Errors worth retrying: the database or a file share went away for a while.
TRANSIENT: tuple[type[BaseException], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError, OSError)
MAX_RETRIES = 5
#: A batch still running after this many seconds is given up (``task_error``); a process
#: stuck in C code past the hard limit is killed, and its instances come back by the sweep.
SOFT_TIME_LIMIT_S = 600
TIME_LIMIT_S = 660
#: Queue tasks that may take an instance before it is failed with ``attempts_exhausted``:
#: a file whose decoder hangs or kills the worker process would otherwise come back for ever
#: (redelivered when its process dies, re-enqueued by every sweep when it hangs).
MAX_ATTEMPTS = 3
#: Ids per message when a sweep re-enqueues stuck instances; at most SWEEP_LIMIT per sweep.
SWEEP_BATCH = 32
SWEEP_LIMIT = 10_000
#: Longest ``detail`` stored for a batch given up on.
_DETAIL_MAX = 500


def fail_pending(ids: Sequence[int], reason: str, detail: str) -> int:
    """Mark the instances of ``ids`` still ``pending`` (and not held by a worker) ``failed``."""
    state = worker_state()
    with state.sessions() as session:
        items = queries.claim(session, ids)
        queries.mark_finished(
            session,
            [
                {"b_id": item.id, "status": Status.FAILED, "error": reason, "detail": detail[:_DETAIL_MAX]}
                for item in items
            ],
        )
        session.commit()
    _count_failed(reason, len(items))
    return len(items)


def _count_failed(reason: str, n: int) -> None:
    """Count instances this process failed outside a batch, when it serves metrics; never raises."""
    metrics = worker_state().metrics
    if n and metrics is not None:
        try:
            metrics.unclassified(Status.FAILED, reason, n)
        except Exception:  # metrics never fail a task
            log.warning("failed instances not counted", exc_info=True)


def _warn_if_unknown(ids: Sequence[int]) -> None:
    """Say so when this database holds none of a task's instances: the producer (scan, listen,
    watch) writes to another one, and its instances stay ``pending`` there for ever. The usual
    cause is the default ``sqlite:///sorter.db``, which is a different file in every working
    directory. A task whose instances are done already (a duplicate delivery) says nothing."""
    with worker_state().sessions() as session:
        known = session.execute(
            sa.select(sa.func.count()).select_from(instances).where(instances.c.id.in_(list(ids)))
        ).scalar_one()
    if known == 0 and ids:
        log.warning(
            "a task named %d instances (ids %d..%d) this worker's database (%s) does not hold: the "
            "process that queued them writes to another database; give every process the same "
            "SORTER_DATABASE_URL (PostgreSQL for workers on several machines)",
            len(ids),
            min(ids),
            max(ids),
            describe_database(worker_state().settings.database_url),
        )


class ClassifyTask(Task):
    """Gives a batch up for good: its pending instances become ``failed`` rather than stuck."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        ids = list(args[0]) if args else list(kwargs.get("ids", []))
        reason = FailureReason.RETRIES_EXHAUSTED if isinstance(exc, TRANSIENT) else FailureReason.TASK_ERROR
        try:
            failed = fail_pending(ids, reason, f"{type(exc).__name__}: {exc}")
        except Exception:  # the database is still away: the sweep re-enqueues them later
            log.exception("task %s: could not mark %d instances failed", task_id, len(ids))
            return
        log.error("task %s gave up (%s): %d instances failed", task_id, reason, failed)


@shared_task(
    name=CLASSIFY_TASK,
    base=ClassifyTask,
    acks_late=True,
    ignore_result=True,
    autoretry_for=TRANSIENT,
    max_retries=MAX_RETRIES,
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=True,
    soft_time_limit=SOFT_TIME_LIMIT_S,
    time_limit=TIME_LIMIT_S,
)
def classify_ids(ids: list[int]) -> int:
    """Classify the instances of ``ids`` that are still ``pending``; returns how many were.

    Each try is counted (and committed) first. Instances tried before come back
    as tasks of their own, so that one poison file cannot take its batch down
    with it again; those tried ``MAX_ATTEMPTS`` times are failed.
    """
    state = worker_state()
    with state.sessions() as session:
        taken = queries.take_attempts(session, ids, MAX_ATTEMPTS)
        session.commit()
    for instance_id in taken.retried:
        classify_ids.apply_async(args=[[instance_id]], queue=state.settings.queue)
    if taken.exhausted:
        log.warning("instances %s failed: %d tries never finished", taken.exhausted, MAX_ATTEMPTS)
        _count_failed(FailureReason.ATTEMPTS_EXHAUSTED, len(taken.exhausted))
    if not (taken.fresh or taken.retried or taken.exhausted):
        _warn_if_unknown(ids)
    if not taken.fresh:
        return 0
    ids = taken.fresh
    decoding = [0.0]
    base_decode = decoder_for(state.settings.full_decode)
    decode: Decoder = base_decode
    if state.observe is not None:

        def decode(*args: Any) -> Any:
            started = time.perf_counter()
            try:
                return base_decode(*args)
            finally:
                decoding[0] += time.perf_counter() - started

    started = time.perf_counter()
    with state.sessions() as session:
        written = classify_batch(
            session, ids, state.classifier, state.model_id, frames=state.settings.frames, decode=decode
        )
        session.commit()
    outcomes = written.outcomes
    if written.again:  # failed here, but a copy elsewhere may read
        classify_ids.apply_async(args=[written.again], queue=state.settings.queue)
    if state.rules is not None and outcomes:
        state.rules(outcomes)  # never raises: a committed batch is never retried for its rules
    if state.observe is not None and outcomes:  # a redelivered batch already done claims nothing
        try:
            state.observe(outcomes, max(0.0, time.perf_counter() - started - decoding[0]))
        except Exception:  # never retry a committed batch for its metrics
            log.warning("batch not observed", exc_info=True)
    return len(outcomes)


@shared_task(name=SWEEP_TASK, acks_late=True, ignore_result=True)
def sweep_pending() -> int:
    """Re-enqueue instances ``pending`` for longer than ``sweep_age`` seconds; returns how many."""
    state = worker_state()
    settings = state.settings
    cutoff = datetime.now(UTC) - timedelta(seconds=settings.sweep_age)
    with state.sessions() as session:
        ids = queries.stale_pending(session, older_than=cutoff, limit=SWEEP_LIMIT)
        queries.touch(session, ids)
        session.commit()
    for start in range(0, len(ids), SWEEP_BATCH):
        classify_ids.apply_async(args=[ids[start : start + SWEEP_BATCH]], queue=settings.queue)
    if ids:
        log.warning("sweep: re-enqueued %d instances pending since before %s", len(ids), cutoff)
    return len(ids)
