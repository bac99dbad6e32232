"""Every kind of bad input is recorded with its reason, and none stops the scan.

Real files and real file-system objects (symlink loops, a FIFO, a dangling
link); permission errors and a file vanishing mid-scan are produced at the
OS boundary by wrapping the calls that meet them, since tests may run as root.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from db_support import copy_dicom, pydicom_file, query, scan

import sorter.registrar
from sorter.errors import UnreadableFile

pytest_plugins = ["db_fixtures"]


def _corrupt_tail(path: Path, length: int = 500) -> None:
    data = bytearray(path.read_bytes())
    data[-length - 20 : -20] = b"\xff" * length
    path.write_bytes(bytes(data))


@pytest.fixture()
def bad_archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    good = copy_dicom(pydicom_file("CT_small.dcm"), root / "ok" / "good.dcm")
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("a text file\n")
    (root / "junk" / "empty.dcm").write_bytes(b"")
    cut_header = copy_dicom(pydicom_file("CT_small.dcm"), root / "cut" / "cut-header.dcm")
    cut_header.write_bytes(cut_header.read_bytes()[:300])
    cut_pixels = copy_dicom(pydicom_file("CT_small.dcm"), root / "cut" / "cut-pixels.dcm")
    cut_pixels.write_bytes(cut_pixels.read_bytes()[:-4000])
    corrupt = copy_dicom(pydicom_file("JPEG-lossy.dcm"), root / "cut" / "corrupt-jpeg.dcm")
    _corrupt_tail(corrupt)
    dicomdir = root / "media"
    dicomdir.mkdir()
    shutil.copy(pydicom_file("dicomdirtests/DICOMDIR"), dicomdir / "DICOMDIR")
    # An MR image object whose pixel data was stripped (pydicom's DICOMDIR test set).
    stripped = Path(pydicom_file("dicomdirtests/DICOMDIR")).parent / "TINY_ALPHA/PT000000/ST000000/SE000000"
    copy_dicom(stripped / "IM000000", dicomdir / "IM000000")
    for name in ("rtplan.dcm", "reportsi.dcm"):
        shutil.copy(pydicom_file(name), root / "ok" / name)
    links = root / "links"
    links.mkdir()
    (links / "loop").symlink_to("..")
    (links / "self").symlink_to("self")
    (links / "dangling").symlink_to(root / "nowhere.dcm")
    (links / "ok-again").symlink_to(root / "ok")
    (links / "good-link.dcm").symlink_to(good)
    os.mkfifo(links / "fifo")
    copy_dicom(pydicom_file("MR_small.dcm"), root / "locked" / "inside.dcm")
    copy_dicom(pydicom_file("MR_small.dcm"), root / "perm" / "secret.dcm")
    copy_dicom(pydicom_file("MR_small.dcm"), root / "perm" / "gone.dcm")
    return root


@pytest.fixture()
def hostile_os(monkeypatch: pytest.MonkeyPatch, bad_archive: Path) -> None:
    """Permission denied on one folder and one file, and a file deleted between listing and reading."""
    real_scandir, real_read_header = os.scandir, sorter.registrar.read_header

    def scandir(path):  # type: ignore[no-untyped-def]
        if Path(path) == bad_archive / "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    def read_header(path):  # type: ignore[no-untyped-def]
        path = Path(path)
        if path.name == "secret.dcm":
            cause = PermissionError(errno.EACCES, "Permission denied", str(path))
            raise UnreadableFile(str(path), "Permission denied") from cause
        if path.name == "gone.dcm":
            path.unlink()
        return real_read_header(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(sorter.registrar, "read_header", read_header)


def test_every_bad_input_is_recorded_with_its_reason(db_url, tiny_model, bad_archive, hostile_os, tmp_path):
    summary = scan(db_url, tiny_model, bad_archive, tmp=tmp_path)

    assert summary["failed"] == {
        "not_dicom": 2,  # text, empty file
        "truncated": 2,  # header cut; pixel data cut (found at decode)
        "decode_error": 1,
        "no_pixel_data": 1,
        "permission_denied": 2,  # a folder and a file
        "vanished": 1,
        "broken_symlink": 1,
    }
    assert summary["skipped"] == {
        "non_image": 3,  # RT plan, SR, DICOMDIR
        "symlink_loop": 2,  # a link to its own parent, a link to itself
        "symlink_duplicate": 1,  # a second way into a folder already walked
        "not_regular_file": 1,  # the FIFO
    }
    assert summary["classified"] == 1 and summary["duplicates"] == 1  # good.dcm, and the link to it

    by_name = {
        Path(r.path).name: (r.status, r.error)
        for r in query(db_url, "SELECT path, status, error FROM instances")
    }
    assert by_name["loop"] == ("skipped", "symlink_loop")
    assert by_name["self"] == ("skipped", "symlink_loop")
    assert by_name["fifo"] == ("skipped", "not_regular_file")
    assert by_name["DICOMDIR"] == ("skipped", "non_image")
    assert by_name["locked"] == ("failed", "permission_denied")
    assert by_name["secret.dcm"] == ("failed", "permission_denied")
    assert by_name["gone.dcm"] == ("failed", "vanished")
    assert by_name["cut-pixels.dcm"] == ("failed", "truncated")
    assert by_name["corrupt-jpeg.dcm"] == ("failed", "decode_error")
    # The file and the link to it are one instance, under whichever path was seen first.
    assert {by_name.get("good.dcm"), by_name.get("good-link.dcm")} == {("done", None), None}
    # Every instance ended in a terminal status.
    assert query(db_url, "SELECT count(*) FROM instances WHERE status = 'pending'")[0][0] == 0


def test_a_rescan_of_bad_input_changes_nothing(db_url, tiny_model, bad_archive, tmp_path):
    first = scan(db_url, tiny_model, bad_archive, tmp=tmp_path)
    rows = query(db_url, "SELECT id, sop_instance_uid, status, error FROM instances ORDER BY id")

    again = scan(db_url, tiny_model, bad_archive, tmp=tmp_path)

    assert again["classified"] == 0
    assert again["unchanged"] + again["registered"] == first["files"]
    assert query(db_url, "SELECT id, sop_instance_uid, status, error FROM instances ORDER BY id") == rows


def test_what_a_c_decoder_prints_goes_into_the_reason(sqlite_url, tiny_model, tmp_path):
    """OpenJPEG writes a damaged codestream's complaint straight to stderr, from C, once per library
    that tries the frame; a scan keeps it out of its output and records it with the file."""
    import subprocess
    import sys

    from pydicom import dcmread
    from pydicom.encaps import encapsulate, get_frame

    ds = dcmread(pydicom_file("RG1_J2KR.dcm"))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 50]])
    (tmp_path / "archive").mkdir()
    ds.save_as(tmp_path / "archive" / "damaged.dcm")
    command = [
        sys.executable,
        "-m",
        "sorter",
        "scan",
        "--database-url",
        sqlite_url,
        "--model",
        str(tiny_model),
    ]
    result = subprocess.run(
        [*command, str(tmp_path / "archive")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "failed: decode_error 1" in result.stdout + result.stderr
    assert "Tile part length" not in result.stderr, result.stderr
    [(error, detail)] = query(sqlite_url, "SELECT error, detail FROM instances")
    assert error == "decode_error"
    assert "(the decoder said: Tile part length size inconsistent with stream length)" in detail
