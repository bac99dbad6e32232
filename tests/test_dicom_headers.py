"""read_header and non_image_reason on real files: pydicom's test data and ../shared/corpus."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from support import corpus_file, data_file

from sorter.dicom import header_from_dataset, non_image_reason, read_header
from sorter.dicom.headers import HEADER_TAGS
from sorter.dicom.reading import read_dataset
from sorter.domain import InstanceHeader
from sorter.errors import NotDicom, TruncatedFile, UnreadableFile

# pydicom warns about the many non-conformant values in its own test files.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def header(sop_class_uid: str | None, modality: str | None = None) -> InstanceHeader:
    return InstanceHeader(
        path="x.dcm",
        sop_instance_uid="1.2.3",
        study_instance_uid=None,
        series_instance_uid=None,
        sop_class_uid=sop_class_uid,
        modality=modality,
    )


def write_basic_text_sr(path: Path) -> None:
    """A minimal Basic Text SR instance, as a report system would send it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.save_as(path, enforce_file_format=True)


# --- read_header ---------------------------------------------------------------------------


def test_read_header_of_a_plain_mr_file() -> None:
    path = data_file("MR_small.dcm")
    ref = pydicom.dcmread(path, stop_before_pixels=True)
    h = read_header(path)
    assert h.path == path
    assert h.sop_instance_uid == ref.SOPInstanceUID
    assert h.study_instance_uid == ref.StudyInstanceUID
    assert h.series_instance_uid == ref.SeriesInstanceUID
    assert h.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4"
    assert h.modality == "MR"
    assert h.transfer_syntax_uid == ExplicitVRLittleEndian
    assert (h.rows, h.columns, h.number_of_frames) == (64, 64, 1)


def test_read_header_accepts_path_objects_and_reports_frames() -> None:
    h = read_header(Path(data_file("emri_small.dcm")))
    assert h.number_of_frames == 10
    assert h.modality == "MR"


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
        ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
        ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ],
)
def test_read_header_reports_the_transfer_syntax(name: str, syntax: str) -> None:
    assert read_header(data_file(name)).transfer_syntax_uid == syntax


def test_header_read_never_touches_patient_attributes() -> None:
    assert not any(tag.startswith("Patient") for tag in HEADER_TAGS)
    path = data_file("CT_small.dcm")
    assert "PatientName" in pydicom.dcmread(path, stop_before_pixels=True)
    ds = read_dataset(path, specific_tags=HEADER_TAGS)
    assert "PatientName" not in ds
    assert "PatientID" not in ds
    assert "PixelData" not in ds


def test_read_header_of_a_file_without_meta_guesses_the_syntax() -> None:
    # pydicom-data's OT-PAL-8-face.dcm: ACR-NEMA style, no preamble, no file meta.
    h = read_header(data_file("OT-PAL-8-face.dcm"))
    assert h.transfer_syntax_uid == ImplicitVRLittleEndian
    assert h.sop_class_uid == "1.2.840.10008.5.1.4.1.1.7"
    assert h.modality == "OT"
    assert (h.rows, h.columns) == (480, 640)


def test_read_header_of_a_big_endian_file_without_meta() -> None:
    h = read_header(data_file("ExplVR_BigEndNoMeta.dcm"))
    assert h.transfer_syntax_uid == ExplicitVRBigEndian
    assert h.modality == "RTPLAN"


@pytest.mark.corpus
def test_read_header_of_acr_nema_corpus_file() -> None:
    path = corpus_file("CT/barre_ct_lomb/CT_Implicit_Little_Headless_Retired.dcm")
    h = read_header(path)
    assert h.modality == "CT"
    assert h.transfer_syntax_uid == ImplicitVRLittleEndian
    assert (h.rows, h.columns) == (512, 512)
    assert h.institution_name is not None


def test_header_from_dataset_without_file_meta() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.Modality = "CT"
    ds.NumberOfFrames = "0"
    ds.StationName = "  "
    h = header_from_dataset(ds, Path("incoming/1.2.3.4.dcm"))
    assert h.path == os.path.join("incoming", "1.2.3.4.dcm")
    assert h.transfer_syntax_uid == ImplicitVRLittleEndian
    assert h.number_of_frames == 1
    assert h.station_name is None
    assert h.rows is None


# --- typed errors ----------------------------------------------------------------------------


def test_text_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("This is not a DICOM file.\n" * 20)
    with pytest.raises(NotDicom, match=re.escape("notes.txt")):
        read_header(path)


def test_png_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    Image.new("L", (32, 32), color=128).save(path)
    with pytest.raises(NotDicom, match=re.escape("image.png")):
        read_header(path)


def test_what_a_non_dicom_file_is_is_named_where_its_first_bytes_say(tmp_path: Path) -> None:
    """Every one read "no DICM prefix and no data set at the start of the file": a PACS's study
    export as a ZIP deserves "unpack it" in `sorter failures`, a PNG beside the DICOM "not DICOM"."""
    import gzip
    import struct
    import zipfile

    Image.new("L", (32, 32), color=128).save(tmp_path / "image.png")
    Image.new("L", (32, 32), color=128).save(tmp_path / "image.jpg")
    with zipfile.ZipFile(tmp_path / "study.zip", "w") as archive:
        archive.write(data_file("CT_small.dcm"), "CT_small.dcm")
    (tmp_path / "series.gz").write_bytes(gzip.compress(Path(data_file("CT_small.dcm")).read_bytes()))
    (tmp_path / "volume.nii").write_bytes(struct.pack("<i", 348) + b"\0" * 344 + b"n+1\0" + b"\0" * 100)
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.7\n" + b"\0" * 200)
    (tmp_path / "notes.txt").write_text("This is not a DICOM file.\n" * 20)
    expected = {
        "image.png": "a PNG image, not DICOM",
        "image.jpg": "a JPEG image, not DICOM",
        "study.zip": "a ZIP archive, not DICOM: if it holds DICOM, unpack it and scan the folder",
        "series.gz": "a gzip-compressed file, not DICOM: if it holds DICOM, unpack it and scan that",
        "volume.nii": "a NIfTI volume, not DICOM",
        "report.pdf": "a PDF document, not DICOM",
        "notes.txt": "no DICM prefix and no data set at the start of the file",
    }
    for name, detail in expected.items():
        with pytest.raises(NotDicom) as refused:
            read_header(tmp_path / name)
        assert refused.value.detail == detail, name


def test_empty_file_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(NotDicom, match="empty"):
        read_header(path)


@pytest.mark.parametrize("name", ["zipMR.gz", "crayons.icc", "rtplan.dump", "README.txt"])
def test_other_pydicom_data_files_are_not_dicom(name: str) -> None:
    with pytest.raises(NotDicom):
        read_header(data_file(name))


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "gone.dcm"
    shutil.copy(data_file("MR_small.dcm"), path)
    path.unlink()
    with pytest.raises(UnreadableFile, match=re.escape("gone.dcm")) as info:
        read_header(path)
    assert info.value.path == str(path)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(UnreadableFile):
        read_header(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.dcm"
    shutil.copy(data_file("MR_small.dcm"), path)
    path.chmod(0)
    with pytest.raises(UnreadableFile, match=re.escape("secret.dcm")):
        read_header(path)


@pytest.mark.parametrize("cut", [301, 605, 905])  # not at element boundaries
def test_header_cut_short_is_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(Path(data_file("MR_small.dcm")).read_bytes()[:cut])
    with pytest.raises(TruncatedFile, match=re.escape("cut.dcm")):
        read_header(path)


def test_pydicoms_truncated_rt_plan_is_truncated() -> None:
    with pytest.raises(TruncatedFile):
        read_header(data_file("rtplan_truncated.dcm"))


def test_file_cut_inside_the_preamble_is_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "stub.dcm"
    path.write_bytes(Path(data_file("MR_small.dcm")).read_bytes()[:100])
    with pytest.raises(NotDicom, match=re.escape("stub.dcm")):
        read_header(path)


# --- non_image_reason ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("reportsi.dcm", "non_image: SR"),
        ("test-SR.dcm", "non_image: SR"),
        ("DICOMDIR", "non_image: DICOMDIR"),
        ("DICOMDIR-implicit", "non_image: DICOMDIR"),
        ("DICOMDIR-bigEnd", "non_image: DICOMDIR"),
        ("rtplan.dcm", "non_image: RT"),
        ("rtstruct.dcm", "non_image: RT"),
        ("rtdose.dcm", "non_image: RT"),
        ("ExplVR_LitEndNoMeta.dcm", "non_image: RT"),
        ("waveform_ecg.dcm", "non_image: waveform"),
        ("liver.dcm", "non_image: SEG"),
    ],
)
def test_non_image_objects_from_pydicom(name: str, reason: str) -> None:
    assert non_image_reason(read_header(data_file(name))) == reason


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "CT_small.dcm",
        "SC_rgb.dcm",
        "US1_J2KR.dcm",
        "emri_small.dcm",
        "OBXXXX1A.dcm",
        "RG1_UNCR.dcm",
        "OT-PAL-8-face.dcm",
    ],
)
def test_image_objects_have_no_reason(name: str) -> None:
    assert non_image_reason(read_header(data_file(name))) is None


def test_minimal_basic_text_sr_is_non_image(tmp_path: Path) -> None:
    path = tmp_path / "report.dcm"
    write_basic_text_sr(path)
    h = read_header(path)
    assert h.modality == "SR"
    assert non_image_reason(h) == "non_image: SR"


@pytest.mark.parametrize(
    ("sop_class", "reason"),
    [
        ("1.2.840.10008.5.1.4.1.1.88.59", "non_image: KO"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "non_image: PR"),
        ("1.2.840.10008.5.1.4.1.1.66.4", "non_image: SEG"),
        ("1.2.840.10008.5.1.4.1.1.104.1", "non_image: encapsulated document"),
        ("1.2.840.10008.5.1.4.1.1.104.2", "non_image: encapsulated document"),
        ("1.2.840.10008.5.1.4.1.1.66", "non_image: raw data"),
        ("1.2.840.10008.5.1.4.1.1.66.1", "non_image: REG"),
        ("1.2.840.10008.5.1.4.1.1.66.2", "non_image: FID"),
        ("1.2.840.10008.5.1.4.1.1.9.1.2", "non_image: waveform"),
        ("1.2.840.10008.5.1.4.1.1.88.67", "non_image: SR"),  # X-Ray Radiation Dose SR
        ("1.2.840.10008.5.1.4.1.1.481.9", "non_image: RT"),  # RT Ion Beams Treatment Record
        ("1.2.840.10008.5.1.4.1.1.481.13", "non_image: RT"),  # C-Arm Photon-Electron Radiation
        ("1.2.840.10008.1.3.10", "non_image: DICOMDIR"),
        ("1.2.840.10008.5.1.4.1.1.481.1", None),  # RT Image Storage
        ("1.2.840.10008.5.1.4.1.1.481.23", None),  # Enhanced RT Image Storage
        ("1.2.840.10008.5.1.4.1.1.7", None),  # Secondary Capture
        ("1.2.840.10008.5.1.4.1.1.6.2", None),  # Enhanced US Volume (no "Image" in the name)
        ("1.2.840.10008.5.1.4.1.1.30", None),  # Parametric Map
    ],
)
def test_non_image_reason_by_sop_class(sop_class: str, reason: str | None) -> None:
    assert non_image_reason(header(sop_class)) == reason


@pytest.mark.parametrize(
    ("sop_class", "modality", "reason"),
    [
        ("1.2.3.4.5.6.7", "SR", "non_image: SR"),  # private SOP class: the Modality decides
        (None, "ecg", "non_image: ECG"),
        (None, "RTSTRUCT", "non_image: RTSTRUCT"),
        ("1.2.3.4.5.6.7", "CT", None),
        (None, None, None),
        ("1.2.840.10008.5.1.4.1.1.2", "SR", None),  # a known image class wins over Modality
    ],
)
def test_non_image_reason_falls_back_to_modality(
    sop_class: str | None, modality: str | None, reason: str | None
) -> None:
    assert non_image_reason(header(sop_class, modality)) == reason
