"""Ctrl-C and SIGTERM that never land inside a database commit.

Python raises ``KeyboardInterrupt`` between any two bytecodes of the main thread. Raised inside
SQLAlchemy's ``Session.commit`` (seen in CI: between the COMMIT and the transaction's own
bookkeeping), it leaves the session half-closed and the rollback that follows fails with a bare
``AssertionError`` instead of the clean "interrupted" exit. While :func:`handled` is in force, the
signal handler therefore only notes a signal that arrives inside a :func:`deferred` section
(:class:`InterruptSafeSession` wraps commit, rollback and close in one) and raises it as soon as
the section ends: the commit either happened or did not, never half.

Python drops an exception raised while a finaliser or a weakref callback runs ("Exception ignored
in ..."), and a signal handler can run there too; the next commit then raises the signal that
was lost (seen in a test: Ctrl-C during garbage collection, and the scan ran to its end).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same rollback runs, but ending with status 143."""


class _State(threading.local):
    depth = 0
    pending: int | None = None
    #: The last signal received while :func:`handled` was in force, raised or not.
    received: int | None = None


_state = _State()


def _exception(signum: int) -> KeyboardInterrupt:
    return Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, _frame: object) -> None:
    # Handlers run in the main thread, so _state here is the main thread's.
    _state.received = signum
    if _state.depth:
        _state.pending = _state.pending or signum
        return
    raise _exception(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM that arrives inside this block until it ends (main thread only:
    other threads never receive signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
        if not _state.depth and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            raise _exception(signum)


@contextmanager
def handled() -> Iterator[None]:
    """Install the deferring handler for SIGINT and SIGTERM; restore the previous ones after."""
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state.pending = _state.received = None


def raise_if_received() -> None:
    """Raise the signal received earlier whose exception Python dropped; called where the normal
    flow goes on (before a commit), never while an interrupt unwinds."""
    if _state.received is not None and threading.current_thread() is threading.main_thread():
        raise _exception(_state.received)


class InterruptSafeSession(Session):
    """A session whose commit, rollback and close finish before an interrupt is raised."""

    def commit(self) -> None:
        raise_if_received()
        with deferred():
            super().commit()

    def rollback(self) -> None:
        with deferred():
            super().rollback()

    def close(self) -> None:
        with deferred():
            super().close()
