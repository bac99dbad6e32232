"""Blank images (every pixel one value) are `skipped`/`blank`, never classified.

A black padding frame, a failed reconstruction or a map that is all NaN says nothing about what
made it, yet the network answered: the bundled model read an all-zero MR frame as CT at 0.92 (zero
stored, air after the rescale intercept) and called the header wrong, a false discrepancy.
"""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from db_support import copy_dicom, pydicom_file, query, scan, sorter

from sorter.cli import main
from sorter.dicom.pixels import DecodedImage
from sorter.errors import BlankImage
from sorter.imageops import blank_frames

pytest_plugins = ["db_fixtures"]


def _blank_copy(source: str, dest, value: float = 0, **kw) -> str:
    path = copy_dicom(source, dest, **kw)
    ds = pydicom.dcmread(path)
    ds.PixelData = np.full(ds.pixel_array.shape, value, dtype=ds.pixel_array.dtype).tobytes()
    ds.save_as(path, enforce_file_format=False)
    return str(path)


def test_blank_frames_are_flagged_and_dropped_and_an_all_blank_image_is_refused():
    frames = np.stack([np.zeros((4, 4)), np.arange(16.0).reshape(4, 4), np.full((4, 4), 7.0)]).astype(
        np.float32
    )
    assert blank_frames(frames).tolist() == [True, False, True]
    kept = DecodedImage(frames, 0.0, 3, "MONOCHROME2").without_blank_frames("x.dcm")
    assert kept.frames.shape == (1, 4, 4) and kept.frames[0, 0, 1] == 1.0
    one_pixel_differs = np.zeros((1, 4, 4), np.float32)
    one_pixel_differs[0, 3, 3] = 1.0
    image = DecodedImage(one_pixel_differs, 0.0, 1, "MONOCHROME2")
    assert image.without_blank_frames("x.dcm") is image
    with pytest.raises(BlankImage, match=r"the frame read holds one value \(-1024\)"):
        DecodedImage(np.full((1, 4, 4), -1024, np.float32), 0.0, 1, "MONOCHROME2").without_blank_frames("x")
    with pytest.raises(BlankImage, match="each of the 2 frames read"):
        DecodedImage(frames[[0, 2]], 0.0, 2, "MONOCHROME2").without_blank_frames("x.dcm")


def test_the_bundled_model_no_longer_calls_a_blank_mr_frame_ct(tmp_path):
    blank = _blank_copy(pydicom_file("MR_small.dcm"), tmp_path / "blank-mr.dcm")
    result = CliRunner().invoke(main, ["classify", "--json", blank, pydicom_file("MR_small.dcm")])
    assert result.exit_code == 0, result.output
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert (records[blank]["status"], records[blank]["reason"]) == ("skipped", "blank"), records[blank]
    assert records[pydicom_file("MR_small.dcm")]["label"] == "MR"


def test_a_scan_skips_blank_images_and_a_reclassification_drops_their_old_verdict(
    db_url, tiny_model, tiny_model_b, tmp_path
):
    archive = tmp_path / "archive"
    blank = _blank_copy(pydicom_file("MR_small.dcm"), archive / "s" / "blank.dcm")
    later = copy_dicom(pydicom_file("CT_small.dcm"), archive / "s" / "later.dcm")
    copy_dicom(pydicom_file("CT_small.dcm"), archive / "s" / "ct.dcm")

    summary = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert summary["classified"] == 2 and summary["skipped"] == {"blank": 1}, summary
    rows = {r.path: r for r in query(db_url, "SELECT path, status, error, prediction_id FROM instances")}
    assert (rows[blank].status, rows[blank].error, rows[blank].prediction_id) == ("skipped", "blank", None)

    # A database classified before blank images were skipped: the file went blank under a done
    # instance. Reclassifying drops its prediction from every view instead of keeping it.
    _blank_copy(str(later), later, value=-2000, sop=pydicom.dcmread(later).SOPInstanceUID)
    sorter("reclassify", "--model", str(tiny_model_b), "--no-progress", url=db_url)
    row = query(db_url, "SELECT status, error, prediction_id FROM instances WHERE path = :p", p=str(later))[0]
    assert (row.status, row.error, row.prediction_id) == ("skipped", "blank", None)
    shown = query(db_url, "SELECT path FROM latest_predictions")
    assert [r.path for r in shown] == [str(archive / "s" / "ct.dcm")]
