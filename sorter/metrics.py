"""Prometheus metrics of a long-running ``sorter`` process (``listen``, ``watch``).

Every metric lives in the :class:`Metrics` object's own ``CollectorRegistry``
(no process-wide default registry), built by the composition root and handed
to the few places that observe: the listener's sink (instances received) and
the executor's batch observer (outcomes, batch size, inference time, queue
latency). Labels stay low-cardinality: calling AE titles, labels and failure
reasons, never UIDs or paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from http.server import HTTPServer
from typing import TYPE_CHECKING

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from sorter.db.queries import instances
from sorter.domain import Status, Verdict

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from sorter.pipeline import Outcome

log = logging.getLogger(__name__)

#: Seconds from registration to stored prediction: a second to a day.
LATENCY_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

BatchObserver = Callable[[Sequence["Outcome"], float], None]


class Metrics:
    """The metric families of one process, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "sorter_instances_received", "Instances received by C-STORE.", ["calling_ae"], registry=r
        )
        self.instances_classified = Counter(
            "sorter_instances_classified", "Instances classified (prediction stored).", registry=r
        )
        self.instances_failed = Counter(
            "sorter_instances_failed", "Instances that ended failed, by reason.", ["reason"], registry=r
        )
        self.instances_skipped = Counter(
            "sorter_instances_skipped",
            "Instances skipped (non-image ...), by reason.",
            ["reason"],
            registry=r,
        )
        self.discrepancies = Counter(
            "sorter_discrepancies",
            "Classified instances whose pixels confidently disagree with their header.",
            ["header_label", "label"],
            registry=r,
        )
        self.queue_latency = Histogram(
            "sorter_queue_latency_seconds",
            "Registration to stored prediction.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "sorter_batch_size", "Instances per committed batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "sorter_inference_seconds",
            "Forward pass, comparison and write of one batch.",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )

    def received(self, calling_ae: str | None) -> None:
        """Count one instance stored by the listener."""
        self.instances_received.labels(calling_ae=(calling_ae or "").strip() or "-").inc()

    def observe_batch(
        self, outcomes: Sequence[Outcome], seconds: float, registered: Sequence[datetime] = ()
    ) -> None:
        """Count one committed batch; ``registered``: the registration times of its classified instances."""
        self.batch_size.observe(len(outcomes))
        self.inference_seconds.observe(seconds)
        for outcome in outcomes:
            if outcome.status is Status.DONE and outcome.prediction is not None:
                self.instances_classified.inc()
                if outcome.verdict is Verdict.DISAGREE:
                    header = outcome.header_label.value if outcome.header_label else "-"
                    self.discrepancies.labels(header_label=header, label=outcome.prediction.label.value).inc()
            elif outcome.status is Status.SKIPPED:
                self.instances_skipped.labels(reason=outcome.error or "unknown").inc()
            else:
                self.instances_failed.labels(reason=outcome.error or "unknown").inc()
        now = datetime.now(UTC)
        for at in registered:
            aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite: naive UTC
            self.queue_latency.observe(max(0.0, (now - aware).total_seconds()))

    def batch_observer(self, sessions: sessionmaker[Session]) -> BatchObserver:
        """An executor ``observer`` that also reads the classified instances' registration times.

        One indexed query per committed batch; a failure there only costs the latency sample.
        """

        def observe(outcomes: Sequence[Outcome], seconds: float) -> None:
            ids = [o.instance_id for o in outcomes if o.status is Status.DONE]
            registered: list[datetime] = []
            if ids:
                try:
                    with sessions() as session:
                        stmt = sa.select(instances.c.registered_at).where(instances.c.id.in_(ids))
                        registered = [at for at in session.scalars(stmt) if at is not None]
                except Exception:  # never cost the run its metrics, or the run itself
                    log.warning("queue latency not recorded for a batch", exc_info=True)
            self.observe_batch(outcomes, seconds, registered)

        return observe


def start_metrics_server(port: int, bind: str, metrics: Metrics) -> HTTPServer:
    """Serve ``metrics`` on ``http://bind:port/metrics`` in a daemon thread; stop with ``shutdown()``."""
    server, _thread = start_http_server(port, addr=bind, registry=metrics.registry)
    log.info("metrics on http://%s:%d/metrics", bind, server.server_port)
    return server
