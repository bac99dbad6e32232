"""Paths to real test data shared by the test modules (pydicom's files and ../shared/corpus)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

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
