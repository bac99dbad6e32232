"""Paths to real test data shared by the test modules (pydicom's files and ../shared/corpus)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"


def data_file(name: str) -> str:
    """Path of one of pydicom's bundled test files (pydicom-data provides the large ones)."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing (is pydicom-data installed?)"
    return str(path)


def corpus_file(relative: str) -> Path:
    """A file under ../shared/corpus; the test skips with a message when it is absent."""
    path = CORPUS / relative
    if not path.is_file():
        pytest.skip(f"corpus file {relative} not found under {CORPUS}")
    return path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listen_env(
    ae_title: str, port: int, spool: Path, database_url: str, model: Path, allow_ae: str
) -> dict[str, str]:
    """The environment of a ``python -m sorter listen`` configured as in production, by variables alone."""
    return {
        **os.environ,
        "SORTER_AE_TITLE": ae_title,
        "SORTER_PORT": str(port),
        "SORTER_BIND": "127.0.0.1",
        "SORTER_SPOOL": str(spool),
        "SORTER_ALLOW_AE": allow_ae,
        "SORTER_MIN_FREE_MB": "1",
        "SORTER_DATABASE_URL": database_url,
        "SORTER_MODEL": str(model),
        "SORTER_WORKERS": "1",
        "SORTER_DEVICE": "cpu",
    }


def start_listen(env: dict[str, str], stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
    """``python -m sorter listen`` configured by ``env``, in a session of its own (so that
    :func:`stop_process_group` ends whatever it started), with no standard input."""
    return subprocess.Popen(
        [sys.executable, "-m", "sorter", "listen"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], timeout: float, log: Path | None = None
) -> None:
    """Wait until something accepts on 127.0.0.1:``port``; fail when ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
        if process.poll() is not None:
            pytest.fail(f"process exited ({process.returncode}) before listening on {port}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listened on {port} after {timeout:.0f} s:\n{tail}")
        time.sleep(0.2)


def stop_process_group(process: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """SIGTERM ``process`` (a clean stop), then SIGKILL the group it leads (``start_new_session=True``).

    The group is killed even when its leader has already exited, so that no child
    it forked outlives the test holding a pipe or a port.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process's umask set to ``mask`` inside the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
