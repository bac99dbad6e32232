"""``sorter status`` on a SQLite database after a scan of real files, a broken one among them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from db_support import copy_dicom, pydicom_file, scalar, scan, small_archive, sorter

from sorter.db.session import open_database
from sorter.status import pipeline_status

pytest_plugins = ["db_fixtures"]


def _scanned(url, model, tmp_path):
    root = tmp_path / "archive"
    small_archive(root)
    cut = copy_dicom(pydicom_file("CT_small.dcm"), root / "siteA" / "cut.dcm")
    cut.write_bytes(cut.read_bytes()[:-4000])  # header intact, pixel data cut short
    scan(url, model, root, tmp=tmp_path)


def test_status_json_counts_what_the_scan_did(sqlite_url, tiny_model, tmp_path):
    _scanned(sqlite_url, tiny_model, tmp_path)

    data = json.loads(sorter("status", "--format", "json", url=sqlite_url).stdout)

    assert data["instances"] == {"total": 10, "done": 7, "failed": 2, "skipped": 1}
    assert data["pending"] == {"n": 0, "oldest_registered_at": None, "oldest_age_s": None}
    assert {row["reason"]: row["n"] for row in data["failed"]} == {"not_dicom": 1, "truncated": 1}
    assert data["classified"]["last_hour"] == data["classified"]["last_day"] == 7
    latest = datetime.fromisoformat(data["classified"]["latest_prediction_at"])
    assert abs((datetime.now(UTC) - latest).total_seconds()) < 300
    assert data["discrepancies"] == scalar(sqlite_url, "SELECT count(*) FROM discrepancies")
    [model] = data["models"]
    assert model["predictions"] == 7 and model["arch"] == "mobilenet_v3_small" and len(model["sha256"]) == 12


def test_status_table_lists_every_metric(sqlite_url, tiny_model, tmp_path):
    _scanned(sqlite_url, tiny_model, tmp_path)

    lines = sorter("status", url=sqlite_url).stdout.splitlines()

    table = dict(line.split(maxsplit=1) for line in lines[1:])
    assert lines[0].split() == ["metric", "value"]
    assert table["instances.total"] == "10" and table["instances.done"] == "7"
    assert table["pending"] == "0" and table["pending.oldest_age_s"] == "-"
    assert table["failed.truncated"] == "1" and table["failed.not_dicom"] == "1"
    assert table["classified.last_hour"] == "7"
    [sha] = {key.split(".")[1] for key in table if key.startswith("model.")}
    assert table[f"model.{sha}.arch"] == "mobilenet_v3_small" and table[f"model.{sha}.predictions"] == "7"


def test_pending_backlog_and_its_age(sqlite_url, tiny_model, tmp_path):
    _scanned(sqlite_url, tiny_model, tmp_path)
    engine, sessions = open_database(sqlite_url)
    with sessions() as session:
        session.execute(
            sa.text(
                "UPDATE instances SET status = 'pending', registered_at = '2026-01-01 00:00:00' "
                "WHERE status = 'done' AND id IN (SELECT id FROM instances WHERE status = 'done' LIMIT 2)"
            )
        )
        session.commit()
        status = pipeline_status(session, now=datetime(2026, 1, 1, 2, 0, tzinfo=UTC))
    engine.dispose()

    assert status["pending"]["n"] == 2
    assert status["pending"]["oldest_registered_at"] == datetime(2026, 1, 1, tzinfo=UTC)
    assert status["pending"]["oldest_age_s"] == timedelta(hours=2).total_seconds()
    assert status["instances"]["pending"] == 2 and status["instances"]["done"] == 5


def test_status_counts_instances_classified_not_predictions(db_url, tiny_model, tiny_model_b, tmp_path):
    """A second model's predictions (`sorter reclassify`, `sorter adapt`'s out-of-fold ones) are
    rows for instances already classified: 7 instances read as 14 classified in the last hour."""
    _scanned(db_url, tiny_model, tmp_path)
    sorter("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress", url=db_url)

    data = json.loads(sorter("status", "--format", "json", url=db_url).stdout)

    assert data["classified"]["last_hour"] == data["classified"]["last_day"] == 7
    assert [model["predictions"] for model in data["models"]] == [7, 7]
