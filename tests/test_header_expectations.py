"""What the header says the pixels look like, beyond the Modality table: a CT localizer (scout,
topogram, surview) is a projection radiograph, so XR; a secondary capture filed under its study's
CT, MR, PT or NM (a dose report page, a 3D rendering, a processing screen) makes no claim
(``no_header``).

Before, every CT study's scout and dose page came back `disagree`: the bundled model read 18 of
18 radiographs stamped as CT localizers as XR and called all 18 headers wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from db_support import copy_dicom, pydicom_file, query, scan
from pydicom.multival import MultiValue
from pydicom.uid import SecondaryCaptureImageStorage

from sorter.cli import main
from sorter.dicom import lean
from sorter.dicom.headers import header_from_dataset, read_header
from sorter.dicom.reading import read_dataset
from sorter.domain import Label
from sorter.taxonomy import expected_label, is_localizer

pytest_plugins = ["db_fixtures"]

LOCALIZER = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


@pytest.mark.parametrize(
    ("modality", "localizer", "sop_class", "label"),
    [
        ("CT", True, None, Label.XR),
        ("ct", True, "1.2.840.10008.5.1.4.1.1.2", Label.XR),
        ("CT", False, None, Label.CT),
        ("MR", True, None, Label.MR),  # an MR localizer is an MR image
        ("CT", False, SecondaryCaptureImageStorage, None),
        ("MR", False, "1.2.840.10008.5.1.4.1.1.7.4", None),
        ("NM", False, SecondaryCaptureImageStorage, None),  # a processing screen, most often
        ("CR", False, SecondaryCaptureImageStorage, Label.XR),  # a digitised film keeps its claim
        ("US", False, SecondaryCaptureImageStorage, Label.US),
        ("OT", False, SecondaryCaptureImageStorage, Label.OT),  # a capture that says so stays OT
        ("SC", False, SecondaryCaptureImageStorage, Label.OT),
        (None, True, None, None),
    ],
)
def test_expected_label(modality, localizer, sop_class, label):
    assert expected_label(modality, localizer=localizer, sop_class_uid=sop_class) == label


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (MultiValue(str, LOCALIZER), True),
        ("ORIGINAL\\PRIMARY\\LOCALIZER", True),
        (" localizer ", True),
        (MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"]), False),
        ("DERIVED", False),
        (None, False),
    ],
)
def test_is_localizer(value, expected):
    assert is_localizer(value) is expected


def _stamped(source: str, dest: Path, *, image_type=None, sop_class=None, modality="CT") -> Path:
    path = copy_dicom(source, dest, modality=modality)
    ds = pydicom.dcmread(path)
    if image_type is not None:
        ds.ImageType = image_type
    if sop_class is not None:
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(path, enforce_file_format=False)
    return path


def test_both_header_readers_see_a_localizer(tmp_path):
    path = _stamped(pydicom_file("CT_small.dcm"), tmp_path / "scout.dcm", image_type=LOCALIZER)
    plain = _stamped(pydicom_file("CT_small.dcm"), tmp_path / "axial.dcm", image_type=["ORIGINAL", "PRIMARY"])
    lean_header = lean.read_header(str(path))  # the common case, without pydicom
    assert lean_header is not None and lean_header.localizer
    assert read_header(path).localizer and not read_header(plain).localizer
    assert header_from_dataset(read_dataset(path), path).localizer  # pydicom's, as the listener reads
    assert not header_from_dataset(read_dataset(plain), plain).localizer


def test_a_scan_stores_what_the_header_says_the_pixels_look_like(db_url, tiny_model, tmp_path):
    archive = tmp_path / "archive"
    scout = _stamped(pydicom_file("CT_small.dcm"), archive / "ct" / "scout.dcm", image_type=LOCALIZER)
    axial = _stamped(
        pydicom_file("CT_small.dcm"), archive / "ct" / "axial.dcm", image_type=["ORIGINAL", "PRIMARY"]
    )
    dose = _stamped(
        pydicom_file("CT_small.dcm"), archive / "ct" / "dose.dcm", sop_class=SecondaryCaptureImageStorage
    )

    summary = scan(db_url, tiny_model, archive, tmp=tmp_path)

    assert summary["classified"] == 3, summary
    rows = {r.path: r for r in query(db_url, "SELECT path, header_modality, header_label FROM instances")}
    assert (rows[str(scout)].header_modality, rows[str(scout)].header_label) == ("CT", "XR")
    assert (rows[str(axial)].header_modality, rows[str(axial)].header_label) == ("CT", "CT")
    assert (rows[str(dose)].header_modality, rows[str(dose)].header_label) == ("CT", None)
    verdict = query(db_url, "SELECT verdict FROM latest_predictions WHERE path = :p", p=str(dose))[0].verdict
    assert verdict == "no_header"


def test_the_bundled_model_agrees_with_a_ct_localizer_that_looks_like_an_x_ray(corpus, tmp_path):
    radiographs = sorted((corpus / "XR").glob("*/*.dcm"))
    scouts = []
    for i, source in enumerate(radiographs):
        ds = pydicom.dcmread(source)
        if "PixelData" not in ds or ds.SOPClassUID in (SecondaryCaptureImageStorage,):
            continue
        scouts.append(_stamped(str(source), tmp_path / f"scout{i}.dcm", image_type=LOCALIZER))
    assert len(scouts) >= 10
    result = CliRunner().invoke(main, ["classify", "--json", *map(str, scouts)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["header_label"] for r in records} == {"XR"}
    verdicts = [r["verdict"] for r in records]
    assert verdicts.count("disagree") == 0 and verdicts.count("agree") >= len(verdicts) - 2, verdicts


def test_a_manifest_from_an_archive_labels_a_ct_localizer_xr_and_leaves_a_ct_capture_out(tmp_path):
    from train.manifest import build_manifest

    archive = tmp_path / "archive"
    _stamped(pydicom_file("CT_small.dcm"), archive / "site" / "scout.dcm", image_type=LOCALIZER)
    _stamped(pydicom_file("CT_small.dcm"), archive / "site" / "axial.dcm")
    _stamped(
        pydicom_file("CT_small.dcm"), archive / "site" / "dose.dcm", sop_class=SecondaryCaptureImageStorage
    )
    summary = build_manifest(archive, tmp_path / "m.csv", progress=False)
    rows = {
        Path(r.split(",")[0]).name: r.split(",")[1] for r in (tmp_path / "m.csv").read_text().splitlines()[1:]
    }
    assert rows == {"scout.dcm": "XR", "axial.dcm": "CT"}
    assert summary.skipped.get("secondary_capture") == 1, summary
    shutil.rmtree(archive)
