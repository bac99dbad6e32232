"""Where committed instance ids go to be classified, and how a process opens it.

Every source (scan, watch, the listener's spool, reclassify) registers and commits, then submits
ids to an :class:`Executor`: the in-process :class:`~sorter.jobs.local.LocalExecutor` (decode
processes and a resident model), or, with ``SORTER_BROKER_URL``, the
:class:`~sorter.jobs.queue.CeleryExecutor` that hands them to ``sorter worker`` processes.
:func:`open_executor` chooses and builds one from the settings; :func:`submit_pending` is the one
keyset loop that re-submits stored instances (resuming, sweeping the spool, reclassifying).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from sorter.config import Settings
from sorter.db import queries
from sorter.domain import Status
from sorter.summary import RunSummary

if TYPE_CHECKING:
    from sorter.domain import Outcome
    from sorter.jobs.local import LocalExecutor

log = logging.getLogger(__name__)

#: Stored instances fetched per page by :func:`submit_pending`.
PAGE = 2000


class Executor(Protocol):
    """Where committed instance ids go to be classified."""

    def submit(self, ids: Iterable[int]) -> None:
        """Queue ids (after their registration committed)."""

    def drain(self) -> None:
        """Finish everything queued (a queue executor sends its partial batch and returns)."""

    def already_submitted(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` this executor was given before: a queue executor remembers what it
        sent (a scan's closing resume finds them still pending); the in-process one finishes what
        it is given before anyone reads again, so for it none."""


def submit_pending(
    sessions: sessionmaker[Session],
    executor: Executor,
    *,
    statuses: Sequence[Status] = (Status.PENDING,),
    under: Sequence[str] = (),
    without_model: int | None = None,
    predicted_before: datetime | None = None,
    only: queries.InstanceFilter | None = None,
    drain_each_page: bool = True,
    on_page: Callable[[list[int]], None] | None = None,
) -> int:
    """Submit every stored instance in ``statuses`` (under the folder prefixes ``under``, without a
    prediction from ``without_model`` made at or after ``predicted_before``, kept by ``only``)
    page by page; returns how many.

    ``drain_each_page`` finishes each page before reading the next (resuming: the next page then
    starts from committed work); ``on_page`` is told each page's ids (progress, counters).
    """
    total = 0
    for part in queries.query_groups(list(under)):  # many PATHs: one query per group of them
        after = 0
        while True:
            with sessions() as session:
                ids = queries.next_ids(
                    session,
                    after=after,
                    limit=PAGE,
                    statuses=list(statuses),
                    under=part,
                    without_model=without_model,
                    predicted_before=predicted_before,
                    only=only,
                )
            if not ids:
                break
            after, total = ids[-1], total + len(ids)
            if on_page is not None:
                on_page(ids)
            executor.submit(ids)
            if drain_each_page:
                executor.drain()
    return total


OutcomeObserver = Callable[[list["Outcome"]], None]


@contextmanager
def open_local_executor(
    settings: Settings,
    sessions: sessionmaker[Session],
    summary: RunSummary,
    on_outcomes: OutcomeObserver | None = None,
    **kw: Any,
) -> Iterator[LocalExecutor]:
    """Load the model, register it, and run an in-process executor that counts into ``summary``.

    Raises :class:`~sorter.errors.ModelError` when the model cannot be loaded. ``kw`` goes to
    :class:`~sorter.jobs.local.LocalExecutor` (``statuses``, ``observer``), but ``on_rules``,
    which sees what ``SORTER_RULES`` did after each batch (:func:`~sorter.rules.engine.batch_hook`).
    """
    # Imported here, not at module level: decode processes started by a console
    # script re-import its __main__ (the CLI), and must not pay for the model's imports.
    from sorter.decode import decoder_for
    from sorter.jobs.local import LocalExecutor
    from sorter.model.classifier import Classifier
    from sorter.pipeline import register_model
    from sorter.rules.engine import batch_hook

    # Decode processes already occupy the cores; an inference thread pool as
    # wide as the machine on top of them slows every forward pass many times
    # over (threads wait on each other at each layer), so it gets what is left.
    spare_cores = (os.cpu_count() or 1) - settings.decode_workers
    classifier = Classifier.from_settings(settings, settings.inference_threads or max(1, spare_cores))
    with sessions() as session:
        model_id = register_model(session, classifier)
        session.commit()

    rules = batch_hook(settings, sessions, kw.pop("on_rules", None), own_process=True)

    def on_batch(outcomes: list[Outcome]) -> None:
        summary.add_outcomes(outcomes)
        if rules is not None:
            rules(outcomes)
        if on_outcomes is not None:
            on_outcomes(outcomes)

    kw.setdefault("decode", decoder_for(settings.full_decode))
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
        if rules is not None:
            rules.close()
        runtime = f"{classifier.runner.name} on {classifier.device}"
        summary.add_stages(executor.stage_seconds, executor.images_here, runtime)


@contextmanager
def open_executor(
    settings: Settings,
    sessions: sessionmaker[Session],
    summary: RunSummary,
    on_outcomes: OutcomeObserver | None = None,
    **kw: Any,
) -> Iterator[Executor]:
    """The queue executor when ``SORTER_BROKER_URL`` is set, else :func:`open_local_executor`.

    With a broker no model is loaded here and ``kw`` (options of the in-process
    executor) does not apply: ``sorter worker`` processes classify, and the
    summary counts registrations only.
    """
    if not settings.broker_url:
        with open_local_executor(settings, sessions, summary, on_outcomes, **kw) as local:
            yield local
        return
    from sorter.jobs.celery_app import make_celery
    from sorter.jobs.queue import CeleryExecutor

    app = make_celery(settings)
    with CeleryExecutor(app, batch_size=settings.batch_size, queue=settings.queue) as queued:
        try:
            yield queued
        finally:
            summary.queued += queued.sent  # what was sent, also when the run stopped early
    log.info("%d instances sent to queue %r", queued.sent, settings.queue)
