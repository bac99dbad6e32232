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
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from sorter.rules.forward import ForwardAction
from sorter.rules.notify import NotifyAction
from sorter.rules.spec import RuleSet

log = logging.getLogger(__name__)

#: Seconds between looks for due work when no batch wakes a sender.
POLL_S = 5.0


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
            if isinstance(action, ForwardAction | NotifyAction)
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

    def _run(self, rule: str, action: ForwardAction | NotifyAction, wake: threading.Event) -> None:
        from sorter.rules.engine import RulesReport, deliver_action

        while not self._stop.is_set():
            wake.wait(self.poll_s)
            wake.clear()
            if self._stop.is_set():
                return
            report = RulesReport()
            try:
                with self.sessions() as session:
                    deliver_action(session, rule, action, report)
            except Exception:  # the database away, say: the next look tries again
                log.exception("rule %s: could not send what is due to %s", rule, action.to)
                continue
            if self.on_report is not None and (report.done or report.failed or report.dead):
                self.on_report(report)
