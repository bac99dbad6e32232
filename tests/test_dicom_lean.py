"""The lean reader equals the pydicom path wherever it answers, and declines the rest.

Every comparison reads the same file both ways: :mod:`sorter.dicom.lean`
(``read_header``, ``load_frames``) against ``read_dataset`` + pydicom
(``header_from_dataset``, ``decode_dataset``). Values must be equal bit for
bit, and the lean reader must actually take the common case (else a fast path
that always declines would pass).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data.data_manager import get_external_sources
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from support import data_file

from sorter.dicom import lean
from sorter.dicom.headers import HEADER_TAGS, header_from_dataset
from sorter.dicom.pixels import decode_dataset, select_frames
from sorter.dicom.reading import read_dataset
from sorter.errors import InputError, TruncatedFile

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def pydicom_header(path: Path) -> object:
    try:
        return header_from_dataset(read_dataset(path, specific_tags=HEADER_TAGS), path)
    except InputError as exc:
        return type(exc)


def pydicom_frames(path: Path, frames: int) -> tuple[np.ndarray, int, str] | type:
    try:
        image = decode_dataset(read_dataset(path), str(path), frames)
    except InputError as exc:
        return type(exc)
    return image.frames, image.n_frames_total, image.photometric


def compare(path: Path, frames: int = 1) -> tuple[bool, bool]:
    """Assert both readers agree on ``path``; return whether lean took the header and the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = lean.read_header(str(path))
        if header is not None:
            assert header == pydicom_header(path), path
        image = lean.load_frames(str(path), lambda n: select_frames(n, frames))
        if image is not None:
            expected = pydicom_frames(path, frames)
            assert not isinstance(expected, type), f"{path}: pydicom says {expected}, lean decoded it"
            values, n_total, photometric = expected
            assert (image.n_frames_total, image.photometric) == (n_total, photometric), path
            assert image.frames.dtype == values.dtype == np.float32, path
            np.testing.assert_array_equal(image.frames, values, err_msg=str(path))
    return header is not None, image is not None


def pydicom_files() -> list[Path]:
    """pydicom's own test files and pydicom-data's, from disk (``get_testdata_files`` would download)."""
    folders = [Path(pydicom.__file__).parent / "data" / "test_files"]
    folders += [Path(source.data_path) for source in get_external_sources().values()]
    return sorted(p for folder in folders for p in folder.rglob("*.dcm"))


def test_pydicom_test_files_agree() -> None:
    files = pydicom_files()
    taken = [compare(p) for p in files]
    headers, pixels = sum(h for h, _ in taken), sum(p for _, p in taken)
    # Most of pydicom's files are compressed, big endian or odd on purpose; the plain ones are taken.
    assert pixels >= 15 and headers >= pixels, (headers, pixels, len(files))


def test_multiframe_frames_agree() -> None:
    for frames in (1, 3, 100):
        assert compare(data_file("emri_small.dcm"), frames) == (True, True)


def test_corpus_dicom_files_agree(corpus: Path) -> None:
    files = sorted(corpus.rglob("*.dcm"))
    taken = [compare(p) for p in files]
    pixels = sum(p for _, p in taken)
    ct = [p for p, (_, took) in zip(files, taken, strict=True) if took and p.parts[-3] == "CT"]
    assert pixels >= len(files) // 3 and len(ct) >= 50, (pixels, len(ct), len(files))


def _image(tmp_path: Path, name: str, *, implicit: bool = False, **attributes: object) -> Path:
    """A small 16-bit greyscale Part 10 file with ``attributes`` set on top."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.InstitutionName = "CT", "Lean Hospital"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 6, 4, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelData = np.arange(-12, 12, dtype="<i2").tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("implicit", [False, True])
def test_common_case_is_taken_and_equal(tmp_path: Path, implicit: bool) -> None:
    assert compare(_image(tmp_path, "plain.dcm", implicit=implicit)) == (True, True)


@pytest.mark.parametrize("signed", [0, 1])
def test_unused_high_bits_are_cleared_like_pydicom(tmp_path: Path, signed: int) -> None:
    raw = np.array([0xF001, 0x0FFF, 0x1800, 0x8000] * 6, dtype="<u2").tobytes()  # junk above bit 12
    path = _image(tmp_path, "bits.dcm", BitsStored=12, HighBit=11, PixelRepresentation=signed, PixelData=raw)
    assert compare(path) == (True, True)


def test_monochrome1_and_float_rescale(tmp_path: Path) -> None:
    path = _image(
        tmp_path,
        "mono1.dcm",
        PhotometricInterpretation="MONOCHROME1",
        RescaleSlope="0.37",
        RescaleIntercept="2.5",
    )
    assert compare(path) == (True, True)


def test_undefined_length_sequences_are_walked(tmp_path: Path) -> None:
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "T-D0050", "Tissue"
    nested = Dataset()
    nested.AnatomicRegionSequence = Sequence([inner])
    for implicit in (False, True):
        ds = pydicom.dcmread(_image(tmp_path, "seq.dcm", implicit=implicit))
        ds.ReferencedImageSequence = Sequence([nested, Dataset()])
        path = tmp_path / f"seq-{implicit}.dcm"
        # pydicom writes undefined lengths when asked to: every sequence and item below
        for element in (ds["ReferencedImageSequence"], nested["AnatomicRegionSequence"]):
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
        ds.save_as(path, implicit_vr=implicit, little_endian=True)
        assert path.read_bytes().count(b"\xfe\xff\xdd\xe0") == 2  # two sequence delimiters
        assert compare(path) == (True, True), implicit


def test_declines_what_pydicom_must_interpret(tmp_path: Path) -> None:
    cases = {  # name: attributes, lean takes the header, lean takes the pixels
        "latin1.dcm": ({"InstitutionName": "Hôpital", "SpecificCharacterSet": "ISO_IR 100"}, False, True),
        "multivalue.dcm": ({"InstitutionName": ["A", "B"]}, False, True),
        "rgb.dcm": (
            {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0},
            True,
            False,
        ),
        "frames0.dcm": ({"NumberOfFrames": "0"}, True, False),
        "two-slopes.dcm": ({"RescaleSlope": ["1", "2"]}, True, False),
    }
    for name, (attributes, header, pixels) in cases.items():
        assert compare(_image(tmp_path, name, **attributes)) == (header, pixels), name


def test_truncated_pixel_data_is_left_to_pydicom(tmp_path: Path) -> None:
    path = _image(tmp_path, "cut.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert lean.load_frames(str(path), lambda n: [0]) is None
    assert pydicom_frames(path, 1) is TruncatedFile
    assert lean.read_header(str(path)) == pydicom_header(path)  # the header is whole


def test_cut_element_after_the_pixel_data_is_left_to_pydicom(tmp_path: Path) -> None:
    path = _image(tmp_path, "trailer.dcm")
    # (FFFC,FFFC) Data Set Trailing Padding, OB, claiming 100 bytes of which 4 are there
    path.write_bytes(
        path.read_bytes() + b"\xfc\xff\xfc\xffOB\x00\x00" + (100).to_bytes(4, "little") + b"\0" * 4
    )
    assert lean.load_frames(str(path), lambda n: [0]) is None


def test_not_dicom_and_missing_files_are_left_to_pydicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM " * 100)
    assert lean.read_header(str(text)) is None
    assert lean.load_frames(str(text), lambda n: [0]) is None
    assert lean.read_header(str(tmp_path / "missing.dcm")) is None


def test_header_larger_than_the_first_read_is_left_to_pydicom(tmp_path: Path) -> None:
    path = _image(tmp_path, "big-header.dcm", ImageComments="x" * (lean.HEADER_BYTES + 10))
    assert lean.read_header(str(path)) is None
    assert compare(path) == (False, True)
