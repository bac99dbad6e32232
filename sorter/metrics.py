"""Prometheus metrics of a long-running ``sorter`` process (``listen``, ``watch``, ``worker``).

Every metric lives in the :class:`Metrics` object's own ``CollectorRegistry``
(no process-wide default registry), built by the composition root and handed
to the few places that observe: the listener's sink (instances received) and
the executor's batch observer (outcomes, batch size, inference time, queue
latency). Labels stay low-cardinality: calling AE titles, labels and failure
reasons, never UIDs or paths.

``sorter worker`` classifies in Celery's prefork pool processes, so it uses
prometheus_client's multiprocess mode: :func:`multiprocess_dir` points
``PROMETHEUS_MULTIPROC_DIR`` at an empty folder before any metric exists, each
pool process builds its own :class:`Metrics` (whose values then live in
per-process files there), and the main process serves the sum of every
process's files (:func:`start_multiprocess_server`), those of processes that
have exited included, so that counters never go back when a pool process is
replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from http.server import HTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import sqlalchemy as sa
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    multiprocess,
    start_http_server,
)
from prometheus_client import values as prometheus_values

from sorter.db.queries import as_utc, instances
from sorter.domain import Status, Verdict

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from sorter.associations import AssociationRecord
    from sorter.domain import Outcome
    from sorter.rules.engine import RulesReport

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
        self.rule_actions = Counter(
            "sorter_rule_actions",
            "Rule actions by rule and result (done; failed: tried again later; dead: gave up).",
            ["rule", "result"],
            registry=r,
        )
        self.inference_seconds = Histogram(
            "sorter_inference_seconds",
            "Forward pass, comparison and write of one batch.",
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )

    def rules_applied(self, report: RulesReport) -> None:
        """Count what rules did after one batch (:func:`sorter.rules.engine.batch_hook`)."""
        for result, counter in (("done", report.done), ("failed", report.failed), ("dead", report.dead)):
            for rule, n in counter.items():
                if n:
                    self.rule_actions.labels(rule=rule, result=result).inc(n)

    def received(self, calling_ae: str | None) -> None:
        """Count one instance stored by the listener."""
        self.instances_received.labels(calling_ae=(calling_ae or "").strip() or "-").inc()

    def unclassified(self, status: Status, reason: str | None, n: int = 1) -> None:
        """Count ``n`` instances that ended ``failed`` or ``skipped`` with ``reason``.

        Batch outcomes come here, and so do files rejected at registration
        (not_dicom, non_image ...: the ``on_rejected`` hook of scan, watch and listen).
        """
        counter = self.instances_skipped if status is Status.SKIPPED else self.instances_failed
        counter.labels(reason=reason or "unknown").inc(n)

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
            else:
                self.unclassified(outcome.status, outcome.error)
        now = datetime.now(UTC)
        for at in registered:
            self.queue_latency.observe(max(0.0, (now - as_utc(at)).total_seconds()))

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


class ListenerMetrics:
    """What a PACS admin alerts on for ``sorter listen``, in the same registry as ``metrics``.

    Separate from :class:`Metrics`, whose families the worker's pool processes also build (in
    multiprocess mode, where gauges need a merge mode these do not have).
    """

    def __init__(self, metrics: Metrics, spool: Path) -> None:
        r = metrics.registry
        self.spool_free = Gauge(
            "sorter_spool_free_bytes", "Free bytes on the spool's volume (at scrape time).", registry=r
        )
        self.spool_free.set_function(lambda: _free_bytes(spool))
        self.pending = Gauge(
            "sorter_pending_instances",
            "Instances registered and not yet classified (NaN while the database is away).",
            registry=r,
        )
        self.oldest_pending = Gauge(
            "sorter_oldest_pending_age_seconds",
            "Age of the oldest pending instance (0 when none; NaN while the database is away).",
            registry=r,
        )
        self.last_store = Gauge(
            "sorter_last_store_timestamp_seconds",
            "Unix time of the last instance stored (0: none since start).",
            registry=r,
        )
        self.associations = Counter(
            "sorter_associations",
            "Associations by result (accepted, released, aborted, rejected) and rejection reason.",
            ["result", "reason"],
            registry=r,
        )
        self.pending.set(float("nan"))
        self.oldest_pending.set(float("nan"))

    def stored(self) -> None:
        """One instance stored now."""
        self.last_store.set_to_current_time()

    def association(self, record: AssociationRecord) -> None:
        """Count one finished association."""
        self.associations.labels(result=record.result, reason=record.reason or "").inc()

    def backlog(self, pending: int | None, oldest_age_s: float | None) -> None:
        """The database's backlog; ``None``: unknown (the database is away)."""
        self.pending.set(float("nan") if pending is None else pending)
        self.oldest_pending.set(float("nan") if oldest_age_s is None else oldest_age_s)


def _free_bytes(path: Path) -> float:
    try:
        return float(shutil.disk_usage(path).free)
    except OSError:
        return float("nan")


HealthCheck = Callable[[], dict[str, Any]]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every 15 s must not fill the log."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def start_metrics_server(
    port: int, bind: str, metrics: Metrics, health: HealthCheck | None = None
) -> WSGIServer:
    """Serve ``metrics`` on ``http://bind:port/metrics`` and ``health`` on ``/healthz`` in a daemon
    thread; stop with ``shutdown()``.

    ``/healthz`` answers 200 with ``health()``'s JSON when its ``ok`` is true, else 503 (no check:
    always 200, the process answering is the check).
    """
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return cast(Iterable[bytes], metrics_app(environ, start_response))
        try:
            report = health() if health is not None else {"ok": True}
        except Exception as exc:  # a failing check is an unhealthy answer, not a 500
            report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        body = json.dumps(report, default=str).encode()
        status = "200 OK" if report.get("ok") else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server_class = type("MetricsServer", (_Server,), {"address_family": _family(bind)})
    server: WSGIServer = make_server(bind, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", bind, server.server_port)
    return server


def _family(bind: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in bind else socket.AF_INET


#: prometheus_client's multiprocess mode reads its folder from this variable.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> tuple[Path, bool]:
    """Turn on multiprocess mode for this process and the ones it forks; ``(folder, made_here)``.

    Uses ``PROMETHEUS_MULTIPROC_DIR`` when it is set (its ``*.db`` files from a
    previous run are removed, as prometheus_client requires), else a new
    temporary folder that the caller removes with :func:`remove_multiprocess_dir`.
    Call it before any metric is constructed in this process: the mode is chosen
    when the first one is.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        folder, made = Path(given), False
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
    else:
        folder, made = Path(tempfile.mkdtemp(prefix="sorter-metrics-")), True
        os.environ[MULTIPROC_ENV] = str(folder)
    # prometheus_client picks its value class when it is first imported; this module
    # imported it before the variable was set, so pick again (no metric exists yet).
    if prometheus_values.ValueClass is prometheus_values.MutexValue:
        prometheus_values.ValueClass = prometheus_values.get_value_class()
    return folder, made


def remove_multiprocess_dir(folder: Path, made: bool) -> None:
    """Remove the folder :func:`multiprocess_dir` made (one it was given is left for the next run)."""
    if made:
        shutil.rmtree(folder, ignore_errors=True)


def multiprocess_enabled() -> bool:
    """Whether metrics made in this process are written to the multiprocess folder."""
    multiprocess_values = prometheus_values.ValueClass is not prometheus_values.MutexValue
    return bool(os.environ.get(MULTIPROC_ENV)) and multiprocess_values


def process_exited(pid: int) -> None:
    """Bookkeeping for a process that exits in multiprocess mode (``mark_process_dead``).

    Only live gauges keep per-process files that must go; counters and histograms
    of the process stay, so that the totals never go back.
    """
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def start_multiprocess_server(port: int, bind: str, folder: Path) -> HTTPServer:
    """Serve the sum of every process's metrics in ``folder`` on ``http://bind:port/metrics``."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    server, _thread = start_http_server(port, addr=bind, registry=registry)
    log.info("metrics of every worker process on http://%s:%d/metrics", bind, server.server_port)
    return server
