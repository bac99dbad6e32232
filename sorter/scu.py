"""Sending DIMSE requests over a pynetdicom requestor association without losing the answers.

Shared by every sender this project runs: forwarding (:mod:`sorter.rules.forward`), the
reliability benchmark's clients and the tests' clients of ``sorter listen``.
"""

from __future__ import annotations

import time
from typing import Any


def hold_reactor(assoc: Any, limit_s: float = 5.0) -> None:
    """Stop pynetdicom's reactor thread before a send, for certain.

    Each send pauses the reactor (which serves the peer's requests) by clearing a checkpoint and
    waiting for the flag the reactor sets before it waits on it. The flag is also still set for a
    moment after the reactor has woken; a send that starts then goes ahead while the reactor runs
    one more turn, and if the response arrives in that turn the reactor takes it as an unexpected
    request and drops it ("Received unexpected C-STORE service message", pynetdicom 3.0.4): the
    send waits out the DIMSE timeout and the association is lost. Under load that was an
    occasional 30 s stall and failed forwards. Here the checkpoint is cleared first and the send
    waits until the reactor is blocked on it (its condition has a waiter; CPython's ``Event``);
    the send then finds it paused, and sets it going again when done. Without that attribute,
    or after ``limit_s``, the send goes ahead as before."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    if checkpoint is None or waiters is None:
        return
    checkpoint.clear()
    deadline = time.monotonic() + limit_s
    while not waiters and assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.0001)


def c_store(assoc: Any, dataset: Any) -> Any:
    """``assoc.send_c_store(dataset)`` (a dataset or a file's path) with the reactor held
    (:func:`hold_reactor`); returns its status dataset."""
    hold_reactor(assoc)
    return assoc.send_c_store(dataset)


def c_echo(assoc: Any) -> Any:
    """``assoc.send_c_echo()`` with the reactor held (:func:`hold_reactor`)."""
    hold_reactor(assoc)
    return assoc.send_c_echo()
