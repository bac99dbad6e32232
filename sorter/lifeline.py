"""Helper processes that end when the process that started them is gone.

A decode process or the rules sender waits on a queue or an event that only its parent feeds. A
parent killed outright (kill -9, the OOM killer) cannot tell them to stop, and they would wait for
ever, holding the parent's standard output and error: a caller that reads those pipes to their end
(``Popen.communicate``, asyncio's ``communicate``) would hang with them.

Whether the parent is gone cannot be asked with ``os.kill(pid, 0)``: that succeeds on a zombie, and
a process stays a zombie until whoever started it reaps it, which that same caller does only after
the pipes close (found killing ``sorter scan`` with kill -9 under such a caller: its pipes stayed
open until the caller gave up; a one-off hang of a listener test looked the same). On Linux a
pidfd (``pidfd_open``, Linux 5.3) becomes readable the moment the process exits, before it is
reaped, and costs no polling; elsewhere the process is polled, a zombie counting as gone where
``/proc`` tells.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable


def _exit() -> None:
    os._exit(0)


def is_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited: no such process, another user's (the pid was reused), or a
    zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")".
            return stat.read().rpartition(b")")[2].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _wait_for_exit(pid: int, poll_s: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # not Linux, a kernel before 5.3, or a sandbox refusing it
        while not is_gone(pid):
            time.sleep(poll_s)
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def watch_parent(pid: int, on_gone: Callable[[], None] = _exit, poll_s: float = 1.0) -> threading.Thread:
    """Call ``on_gone`` (default: end this process at once, status 0) in a daemon thread once
    process ``pid`` has exited.

    Parameters
    ----------
    pid
        The parent's pid, as the parent gave it (``os.getppid()`` in a forkserver's child is the
        forkserver, not the process that asked for it).
    on_gone
        What to do then; it runs in the watching thread.
    poll_s
        Seconds between looks where no pidfd can be had.
    """

    def watch() -> None:
        _wait_for_exit(pid, poll_s)
        on_gone()

    thread = threading.Thread(target=watch, daemon=True, name="parent-watch")
    thread.start()
    return thread
