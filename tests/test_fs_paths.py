"""File names that are not valid UTF-8 (``caf\\xe9.dcm`` from an old Latin-1 share), end to end.

Stored losslessly on SQLite and PostgreSQL, shown readably, classified like
any other file, skipped by the ledger on a re-scan, resumed under their root,
and picked up by the watcher.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from db_support import copy_dicom, pydicom_file, query, scan, sorter
from test_watch import wait_for, watching

from sorter.cli import main
from sorter.fspath import ESCAPED, decode_path, display_path, encode_path, readable, stored_prefixes

pytest_plugins = ["db_fixtures"]


def latin1(path: Path, name: bytes) -> Path:
    """``path / name`` for a name given as raw bytes (as ``os.listdir`` would return it)."""
    return path / os.fsdecode(name)


@pytest.mark.parametrize(
    "raw",
    [b"/a/caf\xe9.dcm", b"/a/100%/x\xff\xfe", b"/plain/path.dcm", b"file:///looks/escaped", b"/%E9/\xe9"],
)
def test_encode_path_round_trips_and_stays_utf8(raw):
    path = os.fsdecode(raw)
    stored = encode_path(path)
    stored.encode("utf-8")  # valid text for every database column
    assert decode_path(stored) == path
    assert os.fsencode(decode_path(stored)) == raw
    assert stored == path or stored.startswith(ESCAPED)
    assert any(stored.startswith(prefix) for prefix in stored_prefixes(path[: len(path) // 2]))


def test_random_byte_names_round_trip_without_collisions():
    rng = random.Random(7)
    alphabet = [*b"/%abc:.", 0xE9, 0xFF, 0xC3, 0xA9, 0x80]
    names = {bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))) for _ in range(5000)}
    stored = {encode_path(os.fsdecode(name)) for name in names}
    assert len(stored) == len(names)  # one to one
    assert {os.fsencode(decode_path(s)) for s in stored} == names


def test_display_and_readable_show_the_bytes():
    assert display_path(os.fsdecode(b"/a/caf\xe9.dcm")) == "/a/caf\\xe9.dcm"
    assert readable("cannot open " + os.fsdecode(b"/x/\xe9")) == "cannot open /x/\\xe9"
    assert readable("\ud800 stray") == "\\ud800 stray"


@pytest.fixture()
def latin_archive(tmp_path: Path) -> Path:
    root = latin1(tmp_path, b"archive-\xe9")  # the scan root itself is not UTF-8
    copy_dicom(pydicom_file("CT_small.dcm"), latin1(root, b"caf\xe9.dcm"))
    copy_dicom(pydicom_file("MR_small.dcm"), latin1(root, b"s\xe9rie") / "x.dcm")
    copy_dicom(pydicom_file("CT_small.dcm"), root / "utf8-été.dcm")
    latin1(root, b"junk\xff.dcm").write_bytes(b"not dicom at all")
    return root


def test_scan_stores_classifies_and_skips_them_on_a_rescan(db_url, tiny_model, tmp_path, latin_archive):
    summary = scan(db_url, tiny_model, latin_archive, tmp=tmp_path)
    assert (summary["files"], summary["classified"]) == (4, 3), summary
    rows = {
        r.path: (r.status, r.error, r.source)
        for r in query(db_url, "SELECT path, status, error, source FROM instances")
    }
    root = encode_path(str(latin_archive))
    assert rows == {
        f"{root}/caf%E9.dcm": ("done", None, "archive-\\xe9"),
        f"{root}/s%E9rie/x.dcm": ("done", None, "s\\xe9rie"),
        f"{root}/utf8-été.dcm": ("done", None, "archive-\\xe9"),
        f"{root}/junk%FF.dcm": ("failed", "not_dicom", "archive-\\xe9"),
    }
    stored = {r.path for r in query(db_url, "SELECT path FROM files")}
    assert {os.fsencode(decode_path(p)) for p in stored} == {
        os.fsencode(str(p)) for p in latin_archive.rglob("*") if p.is_file()
    }

    again = scan(db_url, tiny_model, latin_archive, tmp=tmp_path)  # the ledger finds every file
    assert (again["unchanged"], again["registered"]) == (4, 0), again

    # Work cut short under a root that is not UTF-8 is resumed by the next run.
    from sorter.db.session import create_db_engine

    engine = create_db_engine(db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE instances SET status = 'pending' WHERE error IS NULL")
    engine.dispose()
    resumed = scan(db_url, tiny_model, latin_archive, tmp=tmp_path)
    assert (resumed["resumed"], resumed["classified"]) == (3, 3), resumed


def test_reports_and_classify_print_them_readably(sqlite_url, tiny_model, tmp_path, latin_archive):
    scan(sqlite_url, tiny_model, latin_archive, tmp=tmp_path)
    labels = {r.label.lower() for r in query(sqlite_url, "SELECT label FROM predictions")}
    found = "".join(
        sorter("find", "--label", label, "--format", fmt, url=sqlite_url).output
        for label in labels
        for fmt in ("table", "json", "csv")
    )
    found += sorter("report", url=sqlite_url).output
    assert "\udce9" not in found and "\\udce9" not in found
    assert "%E9" in found  # the stored form names the bytes
    table = classify("--model", str(tiny_model), str(latin1(latin_archive, b"caf\xe9.dcm")))
    assert "caf\\xe9.dcm" in table


def test_classify_json_keeps_the_exact_name(tiny_model, latin_archive):
    path = latin1(latin_archive, b"caf\xe9.dcm")
    output = classify("--json", "--model", str(tiny_model), str(path))
    [record] = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert os.fsencode(record["path"]) == os.fsencode(str(path))  # lossless for a program that opens it


def classify(*args: str) -> str:
    """``sorter classify ARGS`` in-process; its standard output."""
    result = CliRunner().invoke(main, ["classify", *args])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result.output


def test_the_watcher_classifies_them(sqlite_url, tiny_model, tmp_path):
    from sorter.db.session import open_database

    engine, _ = open_database(sqlite_url)
    engine.dispose()
    drop = latin1(tmp_path, b"drop-\xe9")
    drop.mkdir()
    with watching(sqlite_url, tiny_model, drop):
        copy_dicom(pydicom_file("CT_small.dcm"), latin1(drop, b"caf\xe9.dcm"))
        wait_for(
            lambda: query(sqlite_url, "SELECT status FROM instances WHERE status != 'pending'"),
            what="the file classified",
        )
    [(path, status)] = [tuple(r) for r in query(sqlite_url, "SELECT path, status FROM instances")]
    assert (decode_path(path), status) == (str(latin1(drop, b"caf\xe9.dcm")), "done")
