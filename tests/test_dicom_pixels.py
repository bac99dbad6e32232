"""load_image / decode_dataset on real files: every transfer syntax, colour model and error."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from support import CORPUS, data_file

from sorter.dicom import DecodedImage, decode_dataset, load_image, read_header
from sorter.dicom.pixels import select_frames
from sorter.errors import (
    DecodeError,
    NonImageObject,
    NoPixelData,
    NotDicom,
    TruncatedFile,
    UnreadableFile,
    UnsupportedTransferSyntax,
)
from sorter.imageops import rgb_to_grey

# pydicom warns about the many non-conformant values in its own test files.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MPEG2_MAIN_PROFILE = "1.2.840.10008.1.2.4.100"


def load(name: str, frames: int = 1) -> DecodedImage:
    return load_image(data_file(name), frames=frames)


def assert_valid(image: DecodedImage) -> None:
    assert image.frames.dtype == np.float32
    assert image.frames.ndim == 3
    assert np.isfinite(image.frames).all()
    assert 0.0 <= image.colourfulness <= 1.0


# --- every transfer syntax -------------------------------------------------------------------

TRANSFER_SYNTAX_FILES = [
    ("MR_small.dcm", ExplicitVRLittleEndian),
    ("MR_small_implicit.dcm", ImplicitVRLittleEndian),
    ("MR_small_bigendian.dcm", ExplicitVRBigEndian),
    ("SC_rgb_expb.dcm", ExplicitVRBigEndian),
    ("image_dfl.dcm", DeflatedExplicitVRLittleEndian),
    ("SC_rgb_jpeg_dcmtk.dcm", JPEGBaseline8Bit),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", JPEGBaseline8Bit),
    ("JPGExtended.dcm", JPEGExtended12Bit),
    # libjpeg rejects this codestream and pydicom's GDCM plugin refuses 12-bit
    # JPEG: decoded by GDCM called directly (sorter.dicom.gdcm_frame).
    ("JPEG-lossy.dcm", JPEGExtended12Bit),
    ("JPEG-LL.dcm", JPEGLosslessSV1),
    ("SC_rgb_jpeg_gdcm.dcm", JPEGLosslessSV1),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", JPEGLosslessSV1),
    ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("emri_small_jpeg_ls_lossless.dcm", JPEGLSLossless),
    ("JPEGLSNearLossless_16.dcm", JPEGLSNearLossless),
    ("SC_rgb_jls_lossy_line.dcm", JPEGLSNearLossless),
    ("MR_small_jp2klossless.dcm", JPEG2000Lossless),
    ("US1_J2KR.dcm", JPEG2000Lossless),
    ("emri_small_jpeg_2k_lossless.dcm", JPEG2000Lossless),
    ("JPEG2000.dcm", JPEG2000),
    ("US1_J2KI.dcm", JPEG2000),
    ("MR_small_RLE.dcm", RLELossless),
    ("SC_rgb_rle.dcm", RLELossless),
    ("emri_small_RLE.dcm", RLELossless),
]


@pytest.mark.parametrize(("name", "syntax"), TRANSFER_SYNTAX_FILES)
def test_every_transfer_syntax_decodes(name: str, syntax: str) -> None:
    h = read_header(data_file(name))
    assert h.transfer_syntax_uid == syntax
    image = load(name)
    assert_valid(image)
    assert image.frames.shape == (1, h.rows, h.columns)
    assert image.n_frames_total == h.number_of_frames
    assert image.frames.max() > image.frames.min()


@pytest.mark.parametrize(
    "compressed",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_lossless_encodings_of_mr_small_decode_identically(compressed: str) -> None:
    np.testing.assert_array_equal(load(compressed).frames, load("MR_small.dcm").frames)


@pytest.mark.parametrize(
    "other",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_lossless_multiframe_encodings_decode_identically(other: str) -> None:
    reference = load("emri_small.dcm", frames=10)
    assert reference.frames.shape == (10, 64, 64)
    np.testing.assert_array_equal(load(other, frames=10).frames, reference.frames)


@pytest.mark.parametrize(
    ("lossless", "uncompressed"),
    [
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
        ("SC_rgb_gdcm_KY.dcm", "SC_rgb.dcm"),
        ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
    ],
)
def test_lossless_colour_and_palette_encodings_decode_identically(lossless: str, uncompressed: str) -> None:
    a, b = load(lossless), load(uncompressed)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.colourfulness == pytest.approx(b.colourfulness)


def test_lossy_jpeg_extended_is_close_to_the_other_encoding() -> None:
    np.testing.assert_allclose(load("JPEG-lossy.dcm").frames, load("JPGExtended.dcm").frames, atol=1)


# --- greyscale: Modality LUT and MONOCHROME1 -----------------------------------------------


def test_rescale_slope_and_intercept_are_applied() -> None:
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = load("CT_small.dcm")
    np.testing.assert_allclose(image.frames[0], expected)
    assert image.frames.min() < 0  # Hounsfield units: air is negative
    assert image.photometric == "MONOCHROME2"
    assert image.colourfulness == 0.0


def test_modality_lut_sequence_is_applied() -> None:
    ds = pydicom.dcmread(data_file("mlut_18.dcm"))
    assert "ModalityLUTSequence" in ds
    np.testing.assert_array_equal(load("mlut_18.dcm").frames[0], apply_modality_lut(ds.pixel_array, ds))


def test_rescale_from_functional_groups_of_enhanced_ct() -> None:
    ds = pydicom.dcmread(data_file("eCT_Supplemental.dcm"))
    item = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = ds.pixel_array[1] * float(item.RescaleSlope) + float(item.RescaleIntercept)
    image = load("eCT_Supplemental.dcm")  # 2 frames: the middle one is index 1
    np.testing.assert_allclose(image.frames[0], expected)


@pytest.mark.parametrize("name", ["6154", "RG1_UNCR.dcm"])
def test_monochrome1_is_inverted_after_the_lut(tmp_path: Path, name: str) -> None:
    ds = pydicom.dcmread(data_file(name))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    mono2_path = tmp_path / "mono2.dcm"
    ds.save_as(mono2_path)

    mono1 = load_image(data_file(name))
    mono2 = load_image(mono2_path)
    assert mono1.photometric == "MONOCHROME1"
    assert mono2.photometric == "MONOCHROME2"
    lo, hi = mono2.frames.min(), mono2.frames.max()
    np.testing.assert_allclose(mono1.frames, hi + lo - mono2.frames, rtol=1e-6)
    assert (mono1.frames.min(), mono1.frames.max()) == (lo, hi)


# --- colour: palette, RGB, YBR ---------------------------------------------------------------


def test_rgb_is_converted_with_bt601_and_measured() -> None:
    ds = pydicom.dcmread(data_file("SC_rgb.dcm"))
    image = load("SC_rgb.dcm")
    np.testing.assert_allclose(image.frames[0], rgb_to_grey(ds.pixel_array), rtol=1e-6)
    assert image.photometric == "RGB"
    assert image.colourfulness > 0.5


@pytest.mark.parametrize("name", ["SC_rgb_16bit.dcm", "SC_rgb_32bit.dcm", "SC_rgb_expb_16bit.dcm"])
def test_deep_rgb_lands_on_the_8_bit_scale(name: str) -> None:
    np.testing.assert_allclose(load(name).frames, load("SC_rgb.dcm").frames, atol=1e-3)


@pytest.mark.parametrize(
    ("name", "photometric", "tolerance"),
    [
        ("SC_ybr_full_uncompressed.dcm", "YBR_FULL", 2.0),
        ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422", 2.0),
        ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL", 2.0),  # JPEG baseline, lossy
        ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "YBR_FULL_422", 2.0),
        ("US1_J2KR.dcm", "YBR_RCT", 0.0),
    ],
)
def test_ybr_is_converted_to_rgb_exactly_once(name: str, photometric: str, tolerance: float) -> None:
    # A missed or doubled YCbCr -> RGB conversion shifts grey by tens of levels.
    reference = "US1_UNCR.dcm" if name.startswith("US1") else "SC_rgb.dcm"
    image = load(name)
    assert image.photometric == photometric
    np.testing.assert_allclose(image.frames, load(reference).frames, atol=tolerance)
    assert image.colourfulness == pytest.approx(load(reference).colourfulness, abs=0.02)


def test_palette_with_8_bit_indices_and_16_bit_entries_is_applied() -> None:
    ds = pydicom.dcmread(data_file("OBXXXX1A.dcm"))
    assert ds.BitsAllocated == 8
    assert ds.RedPaletteColorLookupTableDescriptor[2] == 16
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64) * 255.0 / 65535.0
    image = load("OBXXXX1A.dcm")
    assert image.photometric == "PALETTE COLOR"
    np.testing.assert_allclose(image.frames[0], rgb_to_grey(rgb), rtol=1e-5, atol=1e-3)
    assert image.colourfulness > 0.05


def test_palette_with_8_bit_values_in_16_bit_entries(tmp_path: Path) -> None:
    # Some writers fill 16-bit tables with 0-255 values; they must not come out 256 times too dark.
    ds = pydicom.dcmread(data_file("OBXXXX1A.dcm"))
    for colour in ("Red", "Green", "Blue"):
        keyword = f"{colour}PaletteColorLookupTableData"
        table = np.frombuffer(getattr(ds, keyword), dtype="<u2") // 256
        setattr(ds, keyword, table.astype("<u2").tobytes())
    path = tmp_path / "palette8in16.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(load_image(path).frames, load("OBXXXX1A.dcm").frames, atol=1.0)


@pytest.mark.parametrize("name", ["gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm"])
def test_sixteen_bit_segmented_palette_lands_on_the_8_bit_scale(name: str) -> None:
    ds = pydicom.dcmread(data_file(name))
    assert "SegmentedRedPaletteColorLookupTableData" in ds
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64) * 255.0 / 65535.0
    image = load(name)
    np.testing.assert_allclose(image.frames[0], rgb_to_grey(rgb), rtol=1e-5, atol=1e-3)
    assert image.frames.min() >= 0.0
    assert image.frames.max() <= 255.0
    assert image.colourfulness > 0.05


def test_palette_file_without_file_meta() -> None:
    image = load("OT-PAL-8-face.dcm")  # no preamble, no file meta: implicit VR guessed
    assert_valid(image)
    assert image.frames.shape == (1, 480, 640)
    assert image.colourfulness > 0.3


# --- frame selection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_total", "k", "expected"),
    [
        (1, 1, [0]),
        (10, 1, [5]),
        (10, 3, [1, 5, 8]),
        (10, 10, list(range(10))),
        (3, 8, [0, 1, 2]),
        (2, 1, [1]),
    ],
)
def test_select_frames(n_total: int, k: int, expected: list[int]) -> None:
    assert select_frames(n_total, k) == expected


def test_middle_frame_and_evenly_spaced_frames() -> None:
    all_frames = pydicom.dcmread(data_file("emri_small.dcm")).pixel_array
    middle = load("emri_small.dcm")
    assert middle.n_frames_total == 10
    np.testing.assert_array_equal(middle.frames[0], all_frames[5])
    three = load("emri_small.dcm", frames=3)
    np.testing.assert_array_equal(three.frames, all_frames[[1, 5, 8]])
    assert load("emri_small.dcm", frames=50).frames.shape == (10, 64, 64)


def test_colour_multiframe_frames() -> None:
    all_frames = pydicom.dcmread(data_file("SC_rgb_2frame.dcm")).pixel_array
    image = load("SC_rgb_2frame.dcm", frames=2)
    assert image.frames.shape == (2, 100, 100)
    np.testing.assert_allclose(image.frames, rgb_to_grey(all_frames), rtol=1e-6)


def test_large_multiframe_decodes_only_the_frames_asked_for() -> None:
    path = data_file("color3d_jpeg_baseline.dcm")  # 120 JPEG frames
    one = load_image(path)
    many = load_image(path, frames=40)
    assert one.frames.shape == (1, 480, 640)
    assert many.frames.shape == (40, 480, 640)
    assert one.n_frames_total == many.n_frames_total == 120
    middle = pixel_array(path, index=60, decoding_plugin="pylibjpeg")
    np.testing.assert_allclose(one.frames[0], rgb_to_grey(middle), atol=1e-3)
    # How fast this is belongs to tests/bench, not here (no timings asserted in tests).


def test_frames_must_be_positive() -> None:
    with pytest.raises(ValueError):
        load("MR_small.dcm", frames=0)


# --- decode_dataset: data sets already in memory -------------------------------------------


def test_decode_dataset_matches_load_image_and_leaves_the_dataset_alone() -> None:
    path = data_file("MR_small_RLE.dcm")
    ds = pydicom.dcmread(path)
    before = {elem.tag: elem.value for elem in ds if elem.tag != 0x7FE00010}
    image = decode_dataset(ds, "received/1.dcm")
    np.testing.assert_array_equal(image.frames, load_image(path).frames)
    assert {elem.tag: elem.value for elem in ds if elem.tag != 0x7FE00010} == before


def _synthetic(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    """An in-memory single-frame data set, without file meta, as a listener might hold it."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_constant_zero_image_gives_finite_zeros(photometric: str) -> None:
    image = decode_dataset(_synthetic(np.zeros((16, 16), np.uint16), photometric), "zero.dcm")
    assert np.isfinite(image.frames).all()
    assert not image.frames.any()


def test_constant_image_with_rescale_stays_finite() -> None:
    ds = _synthetic(np.full((8, 12), 7, np.int16), "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1)
    image = decode_dataset(ds, "constant.dcm")
    assert image.frames.shape == (1, 8, 12)
    np.testing.assert_array_equal(image.frames, 13.0)


def test_float_pixel_data_with_nan_and_inf_becomes_finite() -> None:
    values = np.array([[1.5, np.nan], [np.inf, -2.0]], dtype=np.float32)
    ds = _synthetic(values.view(np.uint32), "MONOCHROME2")
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.FloatPixelData = values.tobytes()
    image = decode_dataset(ds, "float.dcm")
    np.testing.assert_array_equal(image.frames[0], [[1.5, 0.0], [0.0, -2.0]])


# --- ACR-NEMA and the corpus ----------------------------------------------------------------


def _corpus_dicom_paths() -> list[Path]:
    manifest = CORPUS / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="") as f:
        return [CORPUS / row["path"] for row in csv.DictReader(f) if row["format"] == "dcm"]


@pytest.mark.corpus
def test_acr_nema_file_without_samples_per_pixel_decodes() -> None:
    path = CORPUS / "CT" / "barre_ct_lomb" / "CT_Implicit_Little_Headless_Retired.dcm"
    if not path.is_file():
        pytest.skip(f"corpus not found at {CORPUS}")
    ds = pydicom.dcmread(path, force=True)
    assert "SamplesPerPixel" not in ds and "PhotometricInterpretation" not in ds
    image = load_image(path)
    assert_valid(image)
    assert image.frames.shape == (1, 512, 512)
    assert image.photometric == "MONOCHROME2"
    assert image.frames.min() < -500  # rescale intercept -1024 applied: air in HU


@pytest.mark.corpus
def test_every_corpus_dicom_file_decodes() -> None:
    paths = _corpus_dicom_paths()
    if not paths:
        pytest.skip(f"corpus manifest not found at {CORPUS / 'manifest.csv'}")
    failures = []
    for path in paths:
        try:
            image = load_image(path, frames=3)
        except Exception as exc:  # collect them all, report at once
            failures.append(f"{path.relative_to(CORPUS)}: {exc!r}")
            continue
        if image.frames.dtype != np.float32 or not np.isfinite(image.frames).all():
            failures.append(f"{path.relative_to(CORPUS)}: not finite float32")
    assert not failures, "\n".join(failures)


# --- typed errors ---------------------------------------------------------------------------------


def test_truncated_pixel_data_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    data = Path(data_file("MR_small.dcm")).read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TruncatedFile, match=re.escape("cut.dcm")) as info:
        load_image(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
)
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_copies_are_truncated_or_not_dicom(tmp_path: Path, name: str, fraction: float) -> None:
    data = Path(data_file(name)).read_bytes()
    path = tmp_path / "partial.dcm"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises((TruncatedFile, NotDicom), match=re.escape("partial.dcm")):
        load_image(path)


@pytest.mark.parametrize("name", ["emri_small_jpeg_2k_lossless_too_short.dcm", "MR_truncated.dcm"])
def test_pydicoms_truncated_files_are_truncated(name: str) -> None:
    with pytest.raises(TruncatedFile):
        load(name)


def test_text_and_empty_files_are_not_dicom(tmp_path: Path) -> None:
    text = tmp_path / "readme.txt"
    text.write_text("hello\n" * 100)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(NotDicom, match=path.name):
            load_image(path)


def test_deleted_file_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "deleted.dcm"
    shutil.copy(data_file("CT_small.dcm"), path)
    path.unlink()
    with pytest.raises(UnreadableFile, match=re.escape("deleted.dcm")):
        load_image(path)


def test_image_without_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    with pytest.raises(NoPixelData, match=re.escape("nopixels.dcm")):
        load_image(path)


@pytest.mark.parametrize("name", ["reportsi.dcm", "DICOMDIR", "rtplan.dcm", "waveform_ecg.dcm"])
def test_non_image_objects_without_pixels(name: str) -> None:
    with pytest.raises(NonImageObject, match="non_image"):
        load(name)


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("JPEG2000.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2_MAIN_PROFILE
    path = tmp_path / "mpeg2.dcm"
    ds.save_as(path)
    with pytest.raises(UnsupportedTransferSyntax, match=re.escape("mpeg2.dcm")) as info:
        load_image(path)
    assert isinstance(info.value.__cause__, NotImplementedError)


@pytest.mark.parametrize(
    "name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm"]
)
def test_corrupt_compressed_pixel_data_is_a_decode_error(tmp_path: Path, name: str) -> None:
    ds = pydicom.dcmread(data_file(name))
    ds.PixelData = encapsulate([bytes(range(256))])
    path = tmp_path / "garbage.dcm"
    ds.save_as(path)
    with pytest.raises(DecodeError, match=re.escape("garbage.dcm")) as info:
        load_image(path)
    assert info.value.__cause__ is not None


def test_unsupported_pixel_layout_is_a_decode_error() -> None:
    ds = _synthetic(np.zeros((4, 8), np.uint8), "MONOCHROME2")
    ds.Columns = 4
    ds.SamplesPerPixel = 2  # no photometric interpretation has two samples
    with pytest.raises(DecodeError, match=re.escape("odd.dcm")) as info:
        decode_dataset(ds, "odd.dcm")
    assert info.value.__cause__ is not None


def test_decode_dataset_without_pixels_names_the_path() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(NoPixelData, match=re.escape("spool/x.dcm")):
        decode_dataset(ds, "spool/x.dcm")
