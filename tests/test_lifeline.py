"""Helper processes end with the process that started them, even before it is reaped.

A caller that reads a killed ``sorter`` command's output to its end (``Popen.communicate``) reaps it
only after the pipes close; decode processes and the rules sender that waited for the parent's pid
to vanish kept them open for ever (found as a test that hung after ``sorter listen`` exited 143).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from support import free_port, listen_env, start_listen, stop_process_group, wait_for, wait_for_port

from sorter import lifeline

pytest_plugins = ["db_fixtures"]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0].decode()


def _zombie() -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["true"])
    wait_for(lambda: _state(child.pid) == "Z", 10, "the child to exit")
    return child


def test_a_zombie_is_gone_though_signal_0_still_reaches_it():
    child = _zombie()
    try:
        os.kill(child.pid, 0)  # what the earlier check relied on: no error for a zombie
        assert lifeline.is_gone(child.pid)
        assert not lifeline.is_gone(os.getpid())
    finally:
        child.wait()
    assert lifeline.is_gone(child.pid)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_the_watch_fires_when_the_process_exits_not_when_it_is_reaped(pidfd, monkeypatch):
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open here")
    child = subprocess.Popen(["sleep", "0.5"])
    fired = threading.Event()
    try:
        lifeline.watch_parent(child.pid, on_gone=fired.set, poll_s=0.05)
        assert not fired.wait(0.2), "fired while the process was running"
        assert fired.wait(10), "never fired"
        assert _state(child.pid) == "Z"  # not reaped yet
    finally:
        child.wait()


def test_the_watch_fires_at_once_for_a_process_already_gone():
    child = subprocess.Popen(["true"])
    child.wait()
    fired = threading.Event()
    lifeline.watch_parent(child.pid, on_gone=fired.set)
    assert fired.wait(5)


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (``start_new_session``), zombies aside."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rpartition(b")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != b"Z":  # fields: state ppid pgrp session
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sorter_listen_killed_outright_leaves_no_process_holding_its_output(tmp_path, sqlite_url, tiny_model):
    rules = tmp_path / "rules.toml"  # a forward rule: the senders run in a process of their own
    rules.write_text(f'mode = "all"\n[[rule]]\nname = "pacs"\n[rule.forward]\nae_title = "PACS"\n'
                     f'host = "127.0.0.1"\nport = {free_port()}\n')  # fmt: skip
    port = free_port()
    env = listen_env("SORTER", port, tmp_path / "spool", sqlite_url, tiny_model, "")
    env["SORTER_RULES"] = str(rules)
    process = start_listen(env, subprocess.PIPE, subprocess.PIPE)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(process.communicate()), daemon=True)
    try:
        wait_for_port(port, process, 90)

        def started() -> list[str] | None:
            # Both kinds, not a count of processes: a fresh child shows its parent's command line
            # until it execs, so four processes could still lack the forkserver's name (a CI flake).
            helpers = [_cmdline(p) for p in _session_pids(process.pid) if p != process.pid]
            kinds = [any(kind in c for c in helpers) for kind in ("forkserver", "spawn_main")]
            return helpers if all(kinds) else None

        helpers = wait_for(started, 30, "the decode processes and the rules sender")
        assert any("forkserver" in c for c in helpers) and any("spawn_main" in c for c in helpers), helpers
        os.kill(process.pid, signal.SIGKILL)
        wait_for(lambda: _state(process.pid) == "Z", 10, "the listener to die")
        reader.start()  # communicate() reaps only once both pipes have closed
        start = time.monotonic()
        reader.join(30)
        assert not reader.is_alive(), (
            f"its output still open {time.monotonic() - start:.0f} s after kill -9, held by: "
            + "; ".join(_cmdline(p)[:120] for p in _session_pids(process.pid))
        )
        assert process.returncode == -signal.SIGKILL
        wait_for(lambda: not _session_pids(process.pid), 30, "every helper process to end")
    finally:
        stop_process_group(process, timeout=1)
