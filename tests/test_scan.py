"""``sorter scan`` on real files, on SQLite and on PostgreSQL: registration, classification, re-scans."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import sqlalchemy as sa
from db_support import (
    copies_of_one_instance,
    copy_dicom,
    pydicom_file,
    query,
    scalar,
    scan,
    small_archive,
    sorter,
)

from sorter.db.session import create_db_engine

pytest_plugins = ["db_fixtures"]


def test_scan_registers_every_file_and_classifies_the_images(db_url, tiny_model, tmp_path):
    files = small_archive(tmp_path / "archive")
    summary = scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)

    assert summary["files"] == len(files) == 9
    assert summary["classified"] == 7
    assert summary["skipped"] == {"non_image": 1}
    assert summary["failed"] == {"not_dicom": 1}
    assert sum(sum(row.values()) for row in summary["confusion"].values()) == 7
    assert set(summary["confusion"]) == {"CT", "MR", "OT"}

    rows = {Path(r.path).name: r for r in query(db_url, "SELECT * FROM instances")}
    assert len(rows) == 9
    assert {r.status for name, r in rows.items() if name.startswith(("ct", "mr", "rgb"))} == {"done"}
    assert rows["rtplan.dcm"].status == "skipped" and rows["rtplan.dcm"].error == "non_image"
    assert rows["notes.txt"].status == "failed" and rows["notes.txt"].error == "not_dicom"
    assert rows["ct0.dcm"].header_label == "CT" and rows["ct0.dcm"].source == "siteA"
    assert rows["mr0.dcm"].source == "siteB"
    # One prediction per classified instance, and each instance points at it.
    assert scalar(db_url, "SELECT count(*) FROM predictions") == 7
    assert (
        scalar(db_url, "SELECT count(*) FROM instances i JOIN predictions p ON p.id = i.prediction_id") == 7
    )
    assert scalar(db_url, "SELECT count(*) FROM files") == 9
    assert scalar(db_url, "SELECT count(*) FROM latest_predictions") == 7
    assert scalar(db_url, "SELECT count(*) FROM series_summary") == 3


def test_second_scan_of_an_unchanged_archive_does_no_work(db_url, tiny_model, tmp_path):
    small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    before = query(db_url, "SELECT id, instance_id, model_id, created_at FROM predictions ORDER BY id")

    again = scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)

    assert again["classified"] == 0 and again["registered"] == 0 and again["resumed"] == 0
    assert again["unchanged"] == 9
    assert (
        query(db_url, "SELECT id, instance_id, model_id, created_at FROM predictions ORDER BY id") == before
    )
    assert scalar(db_url, "SELECT count(*) FROM instances") == 9


def test_an_archive_named_twice_or_with_a_subfolder_is_read_and_counted_once(db_url, tiny_model, tmp_path):
    small_archive(tmp_path / "archive")
    sub = next(p for p in sorted((tmp_path / "archive").iterdir()) if p.is_dir())
    summary = scan(db_url, tiny_model, tmp_path / "archive", sub, tmp_path / "archive", tmp=tmp_path)
    assert summary["files"] == 9 and summary["registered"] == 9, summary


def test_a_changed_file_at_the_same_path_is_read_again(db_url, tiny_model, tmp_path):
    files = small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    target = files["ct1"]
    ds = pydicom.dcmread(target)
    ds.Modality = "MR"  # same SOP Instance UID, new header
    ds.save_as(target, enforce_file_format=False)
    os.utime(target, ns=(1, 1))  # make the change visible whatever the clock resolution

    again = scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)

    assert again["registered"] == 1 and again["classified"] == 1 and again["unchanged"] == 8
    row = query(
        db_url, "SELECT header_modality, header_label, status FROM instances WHERE path = :p", p=str(target)
    )
    assert [tuple(r) for r in row] == [("MR", "MR", "done")]
    assert scalar(db_url, "SELECT count(*) FROM instances") == 9
    assert scalar(db_url, "SELECT count(*) FROM predictions") == 7


def test_copies_of_one_instance_are_one_row_and_a_moved_file_keeps_its_row(db_url, tiny_model, tmp_path):
    archive = tmp_path / "archive"
    original = copy_dicom(pydicom_file("CT_small.dcm"), archive / "a" / "ct.dcm")
    (archive / "b").mkdir()
    shutil.copy(original, archive / "b" / "ct-copy.dcm")

    first = scan(db_url, tiny_model, archive, tmp=tmp_path)
    assert first["duplicates"] == 1 and first["classified"] == 1
    assert scalar(db_url, "SELECT count(*) FROM instances") == 1
    assert scalar(db_url, "SELECT count(*) FROM files") == 2

    moved = archive / "c" / "ct.dcm"
    moved.parent.mkdir()
    original.rename(moved)
    (archive / "b" / "ct-copy.dcm").unlink()
    again = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert again["classified"] == 0
    assert [tuple(r) for r in query(db_url, "SELECT path, status FROM instances")] == [(str(moved), "done")]


def test_an_instance_whose_first_copy_is_cut_short_is_read_from_a_whole_copy(db_url, tiny_model, tmp_path):
    """An interrupted transfer beside a complete one: the instance was registered at the first
    path seen (a/, cut inside its pixel data), failed there as `truncated`, and stayed failed for
    good; the whole copies were duplicates that no scan read again. Now it is read from the next
    copy, and each bad file keeps a failure row of its own that names the copy."""
    archive = tmp_path / "archive"
    paths = copies_of_one_instance(archive, {"a": -1500, "b": -700, "c": None})

    first = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert first["classified"] == 1 and first["failed"] == {"truncated": 2}, first
    assert first["duplicates"] == 2 and first["registered"] == 3, first
    rows = query(db_url, "SELECT path, status, error, sop_instance_uid, detail FROM instances ORDER BY path")
    assert [(r.path, r.status, r.error) for r in rows] == [
        (str(paths["a"]), "failed", "truncated"),
        (str(paths["b"]), "failed", "truncated"),
        (str(paths["c"]), "done", None),
    ]
    uid = rows[2].sop_instance_uid
    assert all(r.sop_instance_uid.startswith("2.25.") for r in rows[:2]), "the bad files' own rows"
    assert all(f"its instance {uid} is read from a copy" in r.detail for r in rows[:2]), rows
    ledger = query(
        db_url, "SELECT f.path, i.path AS at FROM files f JOIN instances i ON i.id = f.instance_id"
    )
    assert sorted((r.path, r.at) for r in ledger) == sorted((str(p), str(p)) for p in paths.values())

    again = scan(db_url, tiny_model, archive, tmp=tmp_path)
    assert again["unchanged"] == 3 and again["registered"] == 0 and again["classified"] == 0, again

    paths["a"].write_bytes(paths["c"].read_bytes())  # the transfer is done again, in full
    os.utime(paths["a"], ns=(1, 1))
    repaired = scan(db_url, tiny_model, archive, tmp=tmp_path)
    assert repaired["duplicates"] == 1 and repaired["classified"] == 0, repaired
    rows = query(db_url, "SELECT path, status FROM instances ORDER BY path")
    assert [(r.path, r.status) for r in rows] == [(str(paths["b"]), "failed"), (str(paths["c"]), "done")]


def test_an_instance_whose_every_copy_is_bad_tries_each_once(db_url, tiny_model, tmp_path):
    archive = tmp_path / "archive"
    paths = copies_of_one_instance(archive, {"a": -1500, "b": -700})

    first = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert first["classified"] == 0 and first["failed"] == {"truncated": 2}, first
    rows = query(db_url, "SELECT path, status, sop_instance_uid FROM instances ORDER BY path")
    assert [(r.path, r.status) for r in rows] == [(str(paths["a"]), "failed"), (str(paths["b"]), "failed")]
    assert rows[0].sop_instance_uid.startswith("2.25.") and not rows[1].sop_instance_uid.startswith("2.25.")
    again = scan(db_url, tiny_model, archive, tmp=tmp_path)
    assert again["unchanged"] == 2 and again["registered"] == 0 and again["failed"] == {}, again


def test_another_image_under_a_reused_uid_is_counted_and_never_read_as_a_copy(
    db_url, tiny_model, tmp_path, caplog
):
    """A device or an anonymiser that reuses SOP Instance UIDs: the second image was a silent
    "duplicate", never classified, and could even stand in for the first when that one failed. It
    is now counted apart (another series), and never read in the first one's place."""
    archive = tmp_path / "archive"
    uid = "1.2.826.0.1.3680043.8.498.1"
    first = copy_dicom(pydicom_file("CT_small.dcm"), archive / "a" / "x.dcm", sop=uid)
    first.write_bytes(first.read_bytes()[:-1500])  # cut inside its pixel data
    other = copy_dicom(pydicom_file("MR_small.dcm"), archive / "b" / "x.dcm", sop=uid)  # another series
    copy = archive / "c" / "x.dcm"
    copy.parent.mkdir()
    shutil.copy(other, copy)  # a true copy of the second image: same series

    summary = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert summary["duplicates"] == 2 and summary["reused_uids"] == 2, summary
    assert summary["classified"] == 0 and summary["failed"] == {"truncated": 1}, summary
    rows = query(db_url, "SELECT path, status, header_modality FROM instances")
    assert [tuple(r) for r in rows] == [(str(first), "failed", "CT")]
    output = sorter("scan", "--model", str(tiny_model), "--no-progress", str(archive), url=db_url).output
    assert "reused UIDs" not in output  # nothing read again: the ledger knows both
    (archive / "d").mkdir()
    shutil.copy(other, archive / "d" / "x.dcm")
    output = sorter("scan", "--model", str(tiny_model), "--no-progress", str(archive), url=db_url).output
    assert "reused UIDs: 1 duplicate from another series" in output, output
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"SOP Instance UID {uid} is another image's too" in m and "/d/x.dcm" in m for m in warned), (
        warned
    )


def test_a_file_completed_after_a_failed_scan_loses_its_failure(db_url, tiny_model, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    whole = Path(pydicom_file("CT_small.dcm")).read_bytes()
    target = archive / "late.dcm"
    target.write_bytes(whole[:200])  # half-written: the header is cut
    first = scan(db_url, tiny_model, archive, tmp=tmp_path)
    assert first["failed"] == {"truncated": 1}

    target.write_bytes(whole)
    os.utime(target, ns=(1, 1))
    again = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert again["classified"] == 1 and again["failed"] == {}
    assert [tuple(r) for r in query(db_url, "SELECT status, error FROM instances")] == [("done", None)]


def test_thousands_of_files_named_on_the_command_line(sqlite_url, tiny_model, tmp_path, monkeypatch):
    """`find ... | xargs sorter scan`: past about a thousand files the closing resume built one
    OR of every path and SQLite stopped at "Expression tree is too large (maximum depth 1000)",
    exit 1, after every file was registered. The paths now go in groups, and every group is
    resumed (a run cut short left instances pending under several of them)."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(1200):
        (notes / f"n{i}.txt").write_text("not DICOM")
    named = sorted(str(p) for p in notes.iterdir())
    summary = scan(sqlite_url, tiny_model, *map(Path, named), tmp=tmp_path)
    assert summary["failed"] == {"not_dicom": 1200}, summary

    files = small_archive(tmp_path / "archive")
    images = [files[name] for name in ("ct0", "ct1", "ct2", "mr0", "mr1", "mr2")]
    scan(sqlite_url, tiny_model, *images, tmp=tmp_path)
    engine = create_db_engine(sqlite_url)
    with engine.begin() as connection:  # as a run killed before these were classified leaves them
        connection.execute(sa.text("UPDATE instances SET status = 'pending', prediction_id = NULL"
                                   " WHERE path LIKE '%archive%'"))  # fmt: skip
    engine.dispose()
    monkeypatch.setattr("sorter.db.queries.GROUP_SIZE", 2)  # three groups of two files
    again = scan(sqlite_url, tiny_model, *images, tmp=tmp_path)
    assert again["resumed"] == 6 and again["classified"] == 6, again
