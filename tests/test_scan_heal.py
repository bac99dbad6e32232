"""Failures that heal (issue 13): a file that failed for a reason the user can fix is read again,
header first, once it is fixed; `sorter failures` lists what failed; `--fail-on` gives an exit code.

Permissions are real: as root (CI) the scans run without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
(dropped from the bounding set before exec), the capabilities that let root read any file.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from db_support import copy_dicom, pydicom_file

from sorter.db.queries import LedgerEntry
from sorter.registrar import RETRYABLE, unchanged
from sorter.walk import Entry

#: linux/prctl.h and linux/capability.h
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2

pytest_plugins = ["db_fixtures"]


@pytest.fixture()
def place(tiny_model: Path, tmp_path: Path) -> Path:
    """Archive, database, cache and model of one test."""
    shutil.copy(tiny_model, tmp_path / "model.pt")
    return tmp_path


def _as_scanner() -> None:  # pragma: no cover - runs in the child, before exec
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _sorter(place: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    env |= {
        "HOME": str(place),
        "XDG_CACHE_HOME": str(place / "cache"),
        "SORTER_DATABASE_URL": f"sqlite:///{place / 'sorter.db'}",
        "SORTER_MODEL": str(place / "model.pt"),
        "SORTER_WORKERS": "1",
        "SORTER_DEVICE": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", "sorter", *args],
        env=env,
        cwd=place,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_as_scanner,
    )


def _summary(place: Path, *args: str, expect: int = 0) -> dict[str, Any]:
    out = place / "summary.json"
    result = _sorter(place, "scan", "--no-progress", "--json-summary", str(out), *args)
    assert result.returncode == expect, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def _row(place: Path, path: Path) -> tuple[Any, ...]:
    with sqlite3.connect(place / "sorter.db") as connection:
        row = connection.execute(
            "SELECT status, error, series_instance_uid, header_label FROM instances WHERE path = ?",
            (str(path),),
        ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture()
def archive(place: Path) -> dict[str, Path]:
    files = {}
    for name in ("ok", "locked"):
        files[name] = copy_dicom(pydicom_file("CT_small.dcm"), place / "archive" / "site" / f"{name}.dcm")
    files["locked"].chmod(0o000)
    return files


def _skip_unless_permissions_bite(place: Path, archive: dict[str, Path]) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", f"open({str(archive['locked'])!r}, 'rb')"],
        capture_output=True,
        preexec_fn=_as_scanner,
    )
    if probe.returncode == 0:
        pytest.skip("this process reads a file of mode 000 even without CAP_DAC_OVERRIDE")


def test_a_permission_failure_heals_after_chmod_and_is_read_header_first(place, archive):
    _skip_unless_permissions_bite(place, archive)
    first = _summary(place, "--fail-on", "failed", str(place / "archive"), expect=3)
    assert first["classified"] == 1 and first["failed"] == {"permission_denied": 1}, first
    assert _row(place, archive["locked"])[:3] == ("failed", "permission_denied", None)

    listed = _sorter(place, "failures", "--format", "csv")
    assert listed.returncode == 0, listed.stderr
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert [(r["reason"], r["path"]) for r in rows] == [("permission_denied", str(archive["locked"]))]
    assert _sorter(place, "failures", "--reason", "not_dicom", "--format", "csv").stdout.count("\n") == 1

    again = _summary(place, str(place / "archive"))  # nothing changed: the ledger skips both
    assert again["unchanged"] == 2 and again["registered"] == 0, again

    archive["locked"].chmod(0o644)  # the fix: mode and ctime change, size and mtime do not
    healed = _summary(place, "--fail-on", "failed", str(place / "archive"))
    assert healed["registered"] == 1 and healed["classified"] == 1 and healed["unchanged"] == 1, healed
    status, error, series, header = _row(place, archive["locked"])
    assert (status, error, header) == ("done", None, "CT") and series, "the retry must read the header"
    assert _sorter(place, "failures", "--format", "csv").stdout.count("\n") == 1  # the header line only


def test_reclassify_include_failed_reads_the_header_again(place, archive):
    _skip_unless_permissions_bite(place, archive)
    _summary(place, str(place / "archive"))
    archive["locked"].chmod(0o644)
    result = _sorter(place, "reclassify", "--include-failed", "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    status, error, series, header = _row(place, archive["locked"])
    assert (status, error, header) == ("done", None, "CT") and series, "no_header: the header was not read"


@pytest.mark.parametrize(
    ("verdicts", "failed", "fail_on", "status"),
    [
        ({"agree": 3}, {}, ("failed", "discrepancy"), None),
        ({"disagree": 1}, {}, ("failed",), None),
        ({"disagree": 1}, {}, ("discrepancy",), 4),
        ({"disagree": 1}, {"decode_error": 2}, ("failed", "discrepancy"), 3),
        ({}, {"decode_error": 2}, (), None),
    ],
)
def test_fail_on_statuses(verdicts, failed, fail_on, status):
    import click

    from sorter.commands.scan import exit_for_outcome
    from sorter.summary import RunSummary

    summary = RunSummary()
    summary.verdicts.update(verdicts)
    summary.failed.update(failed)
    if status is None:
        exit_for_outcome(summary, fail_on)
        return
    with pytest.raises(click.exceptions.Exit) as raised:
        exit_for_outcome(summary, fail_on)
    assert raised.value.exit_code == status


def _entry(**kw: Any) -> Entry:
    return Entry("/a/b.dcm", **{"size": 10, "mtime_ns": 5, "ctime_ns": 7, "mode": 0o100644, **kw})


def _ledger(**kw: Any) -> LedgerEntry:
    base: dict[str, Any] = {"size": 10, "mtime_ns": 5, "instance_id": 1, "ctime_ns": 7, "mode": 0o100644}
    return LedgerEntry(**{**base, "status": "done", "error": None, **kw})


@pytest.mark.parametrize(
    ("ledger", "entry", "retry", "expected"),
    [
        (_ledger(), _entry(), False, True),
        (_ledger(), _entry(ctime_ns=8), False, True),  # a done file whose inode changed: kept
        (_ledger(), _entry(mtime_ns=6), False, False),
        (_ledger(instance_id=None), _entry(), False, False),
        (_ledger(status="failed", error="permission_denied"), _entry(), False, True),
        (_ledger(status="failed", error="permission_denied"), _entry(), True, False),
        (_ledger(status="failed", error="permission_denied"), _entry(mode=0o100600), False, False),
        (_ledger(status="failed", error="decode_error"), _entry(ctime_ns=9), False, False),
        (_ledger(status="failed", error="not_dicom"), _entry(ctime_ns=9), True, True),  # content only
        (_ledger(status="failed", error="unreadable", ctime_ns=None, mode=None), _entry(), False, False),
    ],
)
def test_which_ledger_entries_still_hold(ledger, entry, retry, expected):
    assert unchanged(ledger, entry, retry) is expected


def test_retryable_reasons_are_ones_a_user_can_fix():
    assert {"permission_denied", "vanished", "unreadable", "decode_error"} <= RETRYABLE
    assert not {"not_dicom", "truncated", "no_pixel_data", "non_image"} & RETRYABLE
