"""Interrupt a real ``sorter scan`` process (kill -9, Ctrl-C), run it again: nothing lost, nothing twice."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from db_support import copy_dicom, pydicom_file, query, scalar, scan
from pydicom.uid import generate_uid

from sorter.db.session import create_db_engine

pytest_plugins = ["db_fixtures"]

#: Enough that a scan (at several hundred files/s) is still running when the signal lands.
FILES = 1000


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CT and MR slices under new UIDs, in series of 20, plus a file that is not DICOM."""
    root = tmp_path_factory.mktemp("big") / "archive"
    for i in range(FILES):
        name = "CT_small.dcm" if i % 2 else "MR_small.dcm"
        if i % 20 == 0:
            series = generate_uid()
        copy_dicom(pydicom_file(name), root / f"s{i // 20:02d}" / f"{i:04d}.dcm", series=series)
    (root / "readme.txt").write_text("not DICOM\n")
    return root


def _start(url: str, model: Path, archive: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "sorter",
        "scan",
        "--model",
        str(model),
        "--workers",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        "--database-url",
        url,
        str(archive),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _interrupt_when_predictions_exist(process: subprocess.Popen[bytes], url: str, sig: int) -> None:
    engine = create_db_engine(url)  # one connection, polled; never migrates
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                out = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(
                    f"the scan ended (exit {process.returncode}) before it could be interrupted:\n{out}"
                )
            try:
                with engine.connect() as connection:
                    done = connection.execute(sa.text("SELECT count(*) FROM predictions")).scalar_one()
            except sa.exc.DBAPIError:  # the scan has not created the schema yet
                done = 0
            if done >= 6:
                process.send_signal(sig)
                process.wait(timeout=60)
                return
            time.sleep(0.02)
    finally:
        engine.dispose()
    process.kill()
    pytest.fail("no prediction was committed within 120 s")


def _assert_complete_and_exactly_once(url: str) -> None:
    assert scalar(url, "SELECT count(*) FROM instances") == FILES + 1
    assert scalar(url, "SELECT count(*) FROM files") == FILES + 1
    statuses = dict(query(url, "SELECT status, count(*) FROM instances GROUP BY status"))
    assert statuses == {"done": FILES, "failed": 1}
    assert scalar(url, "SELECT count(*) FROM predictions") == FILES
    assert scalar(url, "SELECT count(DISTINCT instance_id) FROM predictions") == FILES
    assert scalar(url, "SELECT count(*) FROM instances WHERE status = 'done' AND prediction_id IS NULL") == 0


def test_kill_9_mid_scan_then_rerun_finishes_everything_exactly_once(
    db_url, tiny_model, big_archive, tmp_path
):
    process = _start(db_url, tiny_model, big_archive)
    _interrupt_when_predictions_exist(process, db_url, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL

    # What was committed is consistent: done means a prediction, and nothing is half-written.
    done_before = scalar(db_url, "SELECT count(*) FROM instances WHERE status = 'done'")
    assert 0 < done_before < FILES, "the kill did not land mid-scan"
    assert scalar(db_url, "SELECT count(*) FROM predictions") == done_before
    kept = query(db_url, "SELECT id, instance_id, created_at FROM predictions ORDER BY id")

    summary = scan(db_url, tiny_model, big_archive, tmp=tmp_path)

    assert summary["classified"] == FILES - done_before
    _assert_complete_and_exactly_once(db_url)
    ids = {row.id for row in kept}
    assert (
        query(
            db_url,
            "SELECT id, instance_id, created_at FROM predictions WHERE id <= :m ORDER BY id",
            m=max(ids),
        )
        == kept
    )
    assert scan(db_url, tiny_model, big_archive, tmp=tmp_path)["classified"] == 0


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_rolls_back_cleanly_and_the_next_run_resumes(
    sqlite_url, tiny_model, big_archive, tmp_path, signum, status
):
    process = _start(sqlite_url, tiny_model, big_archive)
    _interrupt_when_predictions_exist(process, sqlite_url, signum)
    output = process.stdout.read().decode() if process.stdout else ""
    assert process.returncode == status, output  # 128 + the signal
    assert "run the same command again to resume" in output

    summary = scan(sqlite_url, tiny_model, big_archive, tmp=tmp_path)

    assert summary["classified"] > 0
    _assert_complete_and_exactly_once(sqlite_url)
