"""Background senders: one thread per forward destination and per webhook.

Each thread wakes when a batch has queued work (:meth:`Deliverer.wake`) or every ``poll_s``
seconds, when retries fall due and series become complete while nothing arrives, and sends what is
due of its one action (:func:`sorter.rules.engine.deliver_action`). Destinations never wait for
each other, and classification never waits for any of them. Rows are claimed before they are
sent, so threads in several processes (Celery pool processes, ``sorter rules apply`` from cron)
never send one twice.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from sorter.rules.forward import ForwardAction
from sorter.rules.notify import NotifyAction, OrthancAction, SeriesAction
from sorter.rules.spec import RuleSet

log = logging.getLogger(__name__)

#: Seconds between looks for due work when no batch wakes a sender.
POLL_S = 5.0
#: A destination found down is not asked again for this long, doubling each time it is still
#: down, up to the cap, whatever batches queue meanwhile: asked at every batch and every look, a
#: PACS that refuses connections cost a warning every 5 s (17 000 a day) while it was away.
DOWN_FIRST_S = 15.0
DOWN_MAX_S = 300.0


class Deliverer:
    """The sender threads of one rule set."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        rules: RuleSet,
        on_report: Callable[..., None] | None = None,
        poll_s: float | None = None,
    ) -> None:
        self.sessions, self.on_report = sessions, on_report
        self.poll_s = POLL_S if poll_s is None else poll_s
        self.actions = [
            (rule.name, action)
            for rule in rules.rules
            for action in rule.actions
            if isinstance(action, ForwardAction | NotifyAction | OrthancAction)
        ]
        self._stop = threading.Event()
        self._wakes = [threading.Event() for _ in self.actions]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start one daemon thread per action (none without forwards or notifications)."""
        for (rule, action), wake in zip(self.actions, self._wakes, strict=True):
            thread = threading.Thread(
                target=self._run, args=(rule, action, wake), name=f"rules-{rule}-{action.kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Work was queued: every sender looks now."""
        for wake in self._wakes:
            wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Let each sender finish what it is sending, then end the threads."""
        self._stop.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, rule: str, action: ForwardAction | SeriesAction, wake: threading.Event) -> None:
        from sorter.rules.engine import RulesReport, deliver_action

        pause = 0.0  # while the destination is down: how long it is left alone
        while not self._stop.is_set():
            if pause:
                self._stop.wait(pause)
            else:
                wake.wait(self.poll_s)
            wake.clear()
            if self._stop.is_set():
                return
            report = RulesReport()
            try:
                with self.sessions() as session:
                    down = deliver_action(session, rule, action, report)
            except Exception:  # the database away, say: the next look tries again
                log.exception("rule %s: could not send what is due to %s", rule, action.to)
                continue
            if down:
                pause = min(DOWN_MAX_S, max(DOWN_FIRST_S, 2 * pause))
                log.info("rule %s: %s is down; asking again in %.0f s", rule, action.to, pause)
            elif pause:  # it answered, or nothing was due to ask it with
                if report.done:  # a warning, as the ones it ends: a sender process logs no less
                    log.warning("rule %s: %s answers again", rule, action.to)
                pause = 0.0
            if self.on_report is not None and (report.done or report.failed or report.dead):
                self.on_report(report)


def _serve(
    database_url: str,
    rules_path: str,
    wake: Any,
    stop: Any,
    reports: Any,
    log_format: str,
    poll_s: float,
    parent_pid: int,
) -> None:
    """The sender process: its own database engine and :class:`Deliverer` threads until ``stop``,
    or until the parent has exited (killed outright: nobody would ever set ``stop``)."""
    from sorter.db.session import open_database
    from sorter.lifeline import watch_parent
    from sorter.logs import configure_logging
    from sorter.rules.spec import load_rules

    # Ctrl-C reaches the whole process group; the parent decides when the senders stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def parent_gone() -> None:
        # Sends under way finish (Deliverer.stop); claims not yet taken stay for the next sender.
        # Nobody reads the reports any more: exiting must not wait to flush them into a full pipe.
        reports.cancel_join_thread()
        stop.set()
        wake.set()

    watch_parent(parent_pid, on_gone=parent_gone)
    configure_logging(logging.WARNING, log_format)
    engine, sessions = open_database(database_url)
    deliverer = Deliverer(sessions, load_rules(Path(rules_path)), on_report=reports.put, poll_s=poll_s)
    deliverer.start()
    try:
        while not stop.is_set():
            if wake.wait(poll_s):
                wake.clear()
                deliverer.wake()
    finally:
        deliverer.stop()
        engine.dispose()


class DeliveryProcess:
    """:class:`Deliverer` in a process of its own, beside a service that receives or classifies.

    Threads in the receiving process competed for its interpreter lock: `sorter listen` received
    24 % fewer instances/s while its sender threads forwarded everything (tests/bench/
    bench_forward.py). A spawned process (never forked from a threaded one) shares no lock;
    what it reports comes back through a queue to ``on_report`` (metrics).
    """

    def __init__(
        self,
        database_url: str,
        rules_path: Path,
        on_report: Callable[..., None] | None = None,
        poll_s: float | None = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._wake, self._stop = context.Event(), context.Event()
        self._reports: Any = context.Queue()
        self.on_report = on_report
        log_format = os.environ.get("SORTER_LOG_FORMAT", "text") or "text"
        self.process = context.Process(
            target=_serve,
            args=(
                database_url,
                str(rules_path),
                self._wake,
                self._stop,
                self._reports,
                log_format,
                POLL_S if poll_s is None else poll_s,
                os.getpid(),
            ),
            name="sorter-rules-sender",
            daemon=True,
        )
        self._relay = threading.Thread(target=self._relay_reports, name="rules-reports", daemon=True)

    def start(self) -> None:
        """Start the process and the thread that relays its reports."""
        self.process.start()
        self._relay.start()

    def wake(self) -> None:
        """Work was queued: the senders look now."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Let the senders finish what they are sending, then end the process."""
        self._stop.set()
        self._wake.set()
        self.process.join(timeout)
        if self.process.is_alive():  # claims it held are released by their lease
            self.process.terminate()
            self.process.join(10)
        self._reports.put(None)
        self._relay.join(10)

    def _relay_reports(self) -> None:
        while (report := self._reports.get()) is not None:
            if self.on_report is not None:
                try:
                    self.on_report(report)
                except Exception:
                    log.exception("a rules report was not counted")
