"""Shared fixtures: where the corpus lives, and skip messages when it does not.

The session also adopts every process the tests start, however deep (Linux
child subreaper), and kills what is still running when the run ends: a
listener, worker or decode process that outlived its test would keep CI's
output pipe open and hold the whole run until its time limit.

Exported model graphs go to a cache folder of the run's own (every command
and process the tests start inherits ``SORTER_CACHE_DIR``), not to the
user's cache, and are removed at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from support import CORPUS

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The labelled corpus beside the repo; tests that need it skip cleanly without it."""
    if not (CORPUS / "manifest.csv").is_file():
        pytest.skip(f"corpus not found at {CORPUS} (tests that need ../shared/corpus are skipped)")
    return CORPUS


_CACHE_DIR = tempfile.mkdtemp(prefix="sorter-test-cache-")


def pytest_configure(config: pytest.Config) -> None:
    """Give the run its own graph cache; become the subreaper of every process the tests start
    (Linux only; elsewhere a no-op)."""
    os.environ["SORTER_CACHE_DIR"] = _CACHE_DIR
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children() -> dict[int, tuple[str, str]]:
    """Our direct children: pid -> (state, command line)."""
    found: dict[int, tuple[str, str]] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # The command name in parentheses may hold spaces: the fields after it are fixed.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me:
            found[int(entry.name)] = (state, cmdline.strip())
    return found


def pytest_unconfigure(config: pytest.Config) -> None:
    """Kill and reap whatever the tests left running, and say which processes they were; remove the cache."""
    try:
        _kill_leftovers()
    finally:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def _kill_leftovers() -> None:
    if not Path("/proc/self/stat").exists():
        return
    # multiprocessing's forkserver and resource tracker end by themselves when
    # their creator (this process, or a killed child) is gone.
    children = {pid: v for pid, v in _children().items() if "from multiprocessing." not in v[1]}
    leftovers = {pid: cmd for pid, (state, cmd) in children.items() if state != "Z"}
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if leftovers:
        listing = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in sorted(leftovers.items()))
        print(f"\nkilled {len(leftovers)} process(es) the tests left running:\n{listing}", file=sys.stderr)
