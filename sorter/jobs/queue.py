"""The queue executor: committed instance ids go to Celery in batches (``SORTER_BROKER_URL``).

The producer side of :mod:`sorter.jobs.celery_app`, with the interface of
:class:`sorter.jobs.local.LocalExecutor` (``submit``, ``drain``, a context
manager). Nothing is classified here and no model is loaded: ``drain`` sends
the partial batch and returns; ``sorter worker`` processes do the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from types import TracebackType

from celery import Celery

from sorter.errors import QueueUnavailable
from sorter.jobs.celery_app import CLASSIFY_TASK

log = logging.getLogger(__name__)


class CeleryExecutor:
    """Send submitted (committed) instance ids to the queue, ``batch_size`` ids per task.

    Parameters
    ----------
    app
        The Celery app (:func:`sorter.jobs.celery_app.make_celery`).
    batch_size
        Ids per task: one transaction and one forward pass in the worker.
    queue
        Queue the tasks go to.

    An id is sent at most once per executor: a scan ends by submitting every
    instance still ``pending`` under its roots, which with a queue are mostly
    the ones it has just sent. An id re-sent anyway is harmless (the task
    re-checks the status).
    """

    def __init__(self, app: Celery, *, batch_size: int, queue: str) -> None:
        self.app = app
        self.batch_size = max(1, batch_size)
        self.queue = queue
        self.sent = 0
        self._waiting: list[int] = []
        self._seen: set[int] = set()

    def __enter__(self) -> CeleryExecutor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On an exception the unsent ids stay pending: the next scan or a worker's sweep sends them.
        if kind is None:
            self.drain()
        self._waiting = []

    def submit(self, ids: Iterable[int]) -> None:
        """Queue committed instance ids; full batches are sent at once."""
        for i in ids:
            if i not in self._seen:
                self._seen.add(i)
                self._waiting.append(i)
        while len(self._waiting) >= self.batch_size:
            self._send(self._waiting[: self.batch_size])
            del self._waiting[: self.batch_size]

    def already_submitted(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` were submitted to this executor before (sent or about to be)."""
        return sum(1 for i in ids if i in self._seen)

    def drain(self) -> None:
        """Send the partial batch (the workers finish it; this does not wait)."""
        if self._waiting:
            self._send(self._waiting)
            self._waiting = []

    def _send(self, ids: Sequence[int]) -> None:
        try:
            self.app.send_task(CLASSIFY_TASK, args=[list(ids)], queue=self.queue)
        except Exception as exc:  # kombu's OperationalError, redis' ConnectionError ...
            raise QueueUnavailable(len(ids), exc) from exc
        self.sent += len(ids)
