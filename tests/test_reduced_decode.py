"""Reduced-resolution decoding (sorter.dicom.reduced) against the full decode.

Every compressed DICOM file in pydicom's test data (pydicom and pydicom-data) and in
../shared/corpus is decoded both ways; the bundled model must give the same label, and the
network's input must stay within a tolerance of the full decode's. Files the reduced path must
refuse (15-bit JPEG 2000 Pillow cannot read, a codestream whose sign disagrees with the header,
RGB JPEG without a colour transform, 12-bit JPEG) must come back exactly as the full decode gives
them.
"""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import get_frame
from support import CORPUS, corpus_file, data_file

from sorter.dicom import reduced
from sorter.dicom.pixels import load_image
from sorter.model.preprocess import fit_square, prepare_image, preprocess_frame
from sorter.model.spec import PreprocessParams

#: Mean absolute difference of the network input (values in [0, 1]) allowed between decodes, per
#: file and as the median over the files that reduce; measured over the 128 files: at most 0.0231
#: (NEMA MR4, 512 x 512 MR decoded at 128 x 128), median 0.0046. Resized without accounting for
#: where JPEG 2000 low-pass samples sit (cosited_box), MR4 reached 0.065 and the median over the
#: 70 JPEG 2000 files 0.014.
MEAN_TOLERANCE, MEDIAN_TOLERANCE = 0.03, 0.006


def _compressed(paths: list[str]) -> list[str]:
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            try:
                tsyntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            except Exception:  # fuzzed and deliberately broken test files
                continue
            if tsyntax.is_compressed:
                found.append(path)
    return found


def _is_dct(path: str) -> bool:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID in reduced.DCT_SYNTAXES


def _pydicom_files() -> list[str]:
    import data_store

    roots = [Path(pydicom.__file__).parent / "data" / "test_files", Path(data_store.__file__).parent / "data"]
    return _compressed(sorted(str(p) for root in roots for p in root.glob("*.dcm")))


def _corpus_files() -> list[str]:
    return _compressed(sorted(glob.glob(os.fspath(CORPUS / "*" / "*" / "*.dcm"))))


@pytest.fixture(scope="module")
def classifier():  # type: ignore[no-untyped-def]
    from sorter.model.classifier import Classifier

    return Classifier.load(None, device="cpu", threads=1)


def _compare(paths: list[str], classifier) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    """(files decoded in reduced form, problems) over ``paths``."""
    params = classifier.spec.preprocess
    problems: list[str] = []
    reduced_count = 0
    differences: list[float] = []
    for path in paths:
        name = Path(path).name
        try:
            full = load_image(path)
        except Exception:  # a test file no decoder reads: the reduced path is not asked either
            continue
        small = load_image(path, min_side=params.input_size)
        assert small.shape == full.shape == full.frames.shape[1:], name
        if small.stored_shape is not None:
            reduced_count += 1
            assert max(small.frames.shape[1:]) >= reduced.OVERSAMPLE * params.input_size, name
        elif not _is_dct(path):  # small DCT JPEG: libjpeg-turbo at full size, within an IDCT's rounding
            np.testing.assert_array_equal(small.frames, full.frames, err_msg=name)
        x_full, f_full = prepare_image(full.frames, full.colourfulness, params, full.shape)
        x_small, f_small = prepare_image(
            small.frames, small.colourfulness, params, small.shape, small.grid_step
        )
        mean = float(np.abs(x_full - x_small).mean())
        if small.stored_shape is not None:
            differences.append(mean)
        if mean > MEAN_TOLERANCE:
            problems.append(f"{name}: mean input difference {mean:.4f}")
        # Colourfulness from a frame a quarter the size: at most 0.032 apart (US1_J2KI).
        np.testing.assert_allclose(f_full, f_small, atol=0.04, err_msg=name)
        p_full = classifier.predict_arrays(x_full, f_full)[0]
        p_small = classifier.predict_arrays(x_small, f_small)[0]
        if p_full.argmax() != p_small.argmax():
            problems.append(f"{name}: label {p_full.argmax()} -> {p_small.argmax()}")
    if differences and float(np.median(differences)) > MEDIAN_TOLERANCE:
        problems.append(f"median input difference {float(np.median(differences)):.4f}")
    return reduced_count, problems


def test_pydicom_compressed_files_keep_their_label_and_input(classifier) -> None:  # type: ignore[no-untyped-def]
    files = _pydicom_files()
    assert len(files) > 40, "pydicom-data is missing"
    count, problems = _compare(files, classifier)
    assert not problems
    assert count >= 10, f"only {count} files took the reduced path"


def test_corpus_compressed_files_keep_their_label_and_input(corpus: Path, classifier) -> None:  # type: ignore[no-untyped-def]
    files = _corpus_files()
    assert len(files) > 40
    count, problems = _compare(files, classifier)
    assert not problems
    assert count >= 30, f"only {count} files took the reduced path"


@pytest.mark.parametrize(
    ("name", "reduced_shape"),
    [
        ("RG3_J2KR.dcm", (440, 440)),  # MONOCHROME1, 10-bit, 1760 x 1760: 2 levels dropped
        ("RG1_J2KR.dcm", (978, 921)),  # MONOCHROME1, 15-bit: Pillow refuses 2 levels, reads 1
        ("MR2_J2KR.dcm", (256, 256)),
        ("693_J2KR.dcm", (256, 256)),  # CT, signed, 14-bit codestream, Bits Stored 16
        ("US1_J2KR.dcm", (240, 320)),  # YBR_RCT colour
        ("color3d_jpeg_baseline.dcm", (240, 320)),  # JPEG baseline, YBR_FULL_422, 120 frames
    ],
)
def test_reduced_frames_are_the_full_frame_made_smaller(name: str, reduced_shape: tuple[int, int]) -> None:
    """Modality LUT, MONOCHROME1, sign and colour are applied at the reduced resolution as in full.

    Asked for 256 px, one level shallower than a scan for the bundled 128 px model decodes: a box
    average stays a fair reference there. At the scan's own level the wavelet's sharper low-pass
    rings past a box average's range; what that does to the network's input and label is what
    ``_compare`` checks.
    """
    path = data_file(name)
    full = load_image(path)
    small = load_image(path, min_side=256)
    assert small.frames.shape[1:] == reduced_shape
    assert small.shape == full.shape == full.frames.shape[1:]
    assert small.photometric == full.photometric
    # The reduced frame is the full frame averaged down: same picture, same physical units.
    box = Image.fromarray(full.frames[0], mode="F").resize(reduced_shape[::-1], Image.Resampling.BOX)
    expected = np.asarray(box)
    # > 0.95, not 1: the wavelet low-pass is centred on even samples, a box between them (US1: 0.954)
    assert np.corrcoef(expected.ravel(), small.frames[0].ravel())[0, 1] > 0.95
    span = float(np.ptp(expected))
    for q in (1, 50, 99):
        assert abs(np.percentile(expected, q) - np.percentile(small.frames[0], q)) <= 0.02 * span, q
    assert small.colourfulness == pytest.approx(full.colourfulness, abs=0.02)


@pytest.mark.parametrize(
    "name",
    [
        "J2K_pixelrep_mismatch.dcm",  # the codestream says unsigned, the header signed
        "SC_rgb_jpeg.dcm",  # RGB JPEG without a colour transform
        "JPEG-lossy.dcm",  # 12-bit JPEG extended
        "JPEG-LL.dcm",  # JPEG lossless: no resolution to drop
        "MR_small_jp2klossless.dcm",  # 64 x 64: nothing to drop
    ],
)
def test_what_the_reduced_path_refuses_is_decoded_in_full(name: str) -> None:
    path = data_file(name)
    full = load_image(path)
    small = load_image(path, min_side=128)
    assert small.stored_shape is None
    np.testing.assert_array_equal(small.frames, full.frames)


def test_codestream_header_is_read() -> None:
    ds = pydicom.dcmread(data_file("693_J2KR.dcm"))
    info = reduced.parse_codestream(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert (info.width, info.height) == (512, 512)
    assert info.precisions == (14,) and info.signed == (True,)
    assert info.levels == 5 and not info.mct
    ds = pydicom.dcmread(data_file("US1_J2KR.dcm"))
    info = reduced.parse_codestream(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert info.precisions == (8, 8, 8) and info.mct
    with pytest.raises(ValueError, match="not a raw JPEG 2000 codestream"):
        reduced.parse_codestream(b"\x00\x00\x00\x0cjP  \r\n\x87\n")
    with pytest.raises(ValueError, match="no SIZ or COD"):
        reduced.parse_codestream(b"\xff\x4f\xff\x90\x00\x0a")


def test_a_level_pillow_refuses_gives_way_to_a_shallower_one() -> None:
    """NEMA RG1: Pillow's tile decoder fails 2 or more levels down, reads it 1 level down."""
    ds = pydicom.dcmread(data_file("RG1_J2KR.dcm"))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    image, level = reduced.open_j2k(frame, 3)
    assert level == 1 and image.size == (921, 978)
    with pytest.raises(OSError):
        reduced.open_j2k(frame[: len(frame) // 50], 3)  # every level fails: the caller decodes in full


@pytest.mark.parametrize(
    ("side", "min_side", "limit", "expected"),
    [
        (512, 256, 5, 1),
        (512, 128, 5, 2),
        (4664, 256, 5, 4),
        (4664, 256, 3, 3),  # the codestream has only 3 levels
        (255, 256, 5, 0),
        (257, 128, 5, 1),  # ceil(257 / 2) = 129
    ],
)
def test_reduction_keeps_the_side_asked_for(side: int, min_side: int, limit: int, expected: int) -> None:
    assert reduced.reduction(side, min_side, limit) == expected


def test_a_damaged_codestream_falls_back_to_the_full_decode_and_its_error(tmp_path: Path) -> None:
    """Bad input in the reduced path never crashes: the full decode runs and gives its verdict."""
    from sorter.errors import DecodeError

    ds = pydicom.dcmread(data_file("MR2_J2KR.dcm"))
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    frame[len(frame) // 3 :] = bytes(len(frame) - len(frame) // 3)  # zeros over two thirds of it
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([bytes(frame)])
    path = tmp_path / "damaged.dcm"
    ds.save_as(path)
    try:
        full = load_image(path)
    except DecodeError as exc:
        with pytest.raises(DecodeError) as caught:
            load_image(path, min_side=128)
        assert caught.value.reason == exc.reason
        return
    small = load_image(path, min_side=128)  # a decoder that tolerates the damage: a picture either way
    assert small.shape == full.shape


def test_size_features_describe_the_stored_image() -> None:
    params = PreprocessParams(input_size=32, features=("matrix", "aspect"))
    frame = np.ones((110, 134), np.float32)
    _, as_decoded = preprocess_frame(frame, 0.0, params)
    _, as_stored = preprocess_frame(frame, 0.0, params, shape=(1760, 2140))
    assert as_stored[0] > as_decoded[0]  # log2 of 2140 px, not of 134
    assert as_stored[1] == pytest.approx(1760 / 2140, abs=1e-6)


def test_corpus_mammogram_is_decoded_small(corpus: Path) -> None:
    path = corpus_file("MG/nema_wg04_mg1/MG1_J2KI.dcm")
    image = load_image(path, min_side=128)
    assert image.stored_shape == (4664, 3064)
    assert image.frames.shape[1:] == (146, 96)
    assert image.grid_step == 32  # 5 levels down: sample k is stored pixel 32 k


def test_only_jpeg2000_frames_are_cosited() -> None:
    """A wavelet low-pass band samples stored pixels; DCT scaling and full decodes give block means."""
    assert load_image(data_file("MR2_J2KR.dcm"), min_side=128).grid_step == 8  # 1 024 px, 3 levels
    dct = load_image(data_file("color3d_jpeg_baseline.dcm"), min_side=128)  # 1/2 by DCT scaling
    assert dct.stored_shape is not None and dct.grid_step == 1
    assert load_image(data_file("MR2_J2KR.dcm")).grid_step == 1


@pytest.mark.parametrize(
    ("stored", "step", "letterbox"),
    [((512, 384), 4, True), ((511, 509), 2, True), ((300, 1000), 8, True), ((512, 384), 4, False)],
)
@pytest.mark.parametrize("axis", [0, 1])
def test_cosited_samples_resize_onto_the_stored_grid(
    stored: tuple[int, int], step: int, letterbox: bool, axis: int
) -> None:
    """Every ``step``-th pixel of a ramp, resized as cosited samples, gives the ramp's own resize.

    On a linear ramp of one unit per stored pixel an antialiasing filter returns the position of
    its centre, so the error is in stored pixels. Resized as if they were block means, the
    samples land up to ``(step - 1) / 2`` stored pixels off.
    """
    plane = np.mgrid[0 : stored[0], 0 : stored[1]][axis].astype(np.float32) + 100.0
    samples = plane[::step, ::step]  # what a JPEG 2000 decode step x smaller holds, on a ramp
    params = PreprocessParams(input_size=64, letterbox=letterbox)
    expected = fit_square(plane, 64, params)
    got = fit_square(samples, 64, params, stored, step)
    naive = fit_square(samples, 64, params)
    content = _content(stored, 64, letterbox, margin=4)
    assert np.abs(got[content] - expected[content]).max() < 0.2  # measured: at most 0.17 (step 8)
    assert np.abs(naive[content] - expected[content]).max() > 0.4  # measured: 0.43 to 3.7


def _content(stored: tuple[int, int], size: int, letterbox: bool, margin: int) -> tuple[slice, slice]:
    """The input pixels whose filters see only the stored image, not its padding or edges."""
    side = max(stored)
    spans = []
    for n in stored:
        top = (side - n) // 2 * size / side if letterbox else 0.0
        extent = n * size / side if letterbox else size
        spans.append(slice(int(np.ceil(top)) + margin, int(top + extent) - margin))
    return spans[0], spans[1]


def test_scans_decode_reduced_unless_told_otherwise() -> None:
    """Every classifying run takes :func:`decoder_for`; ``SORTER_FULL_DECODE=1`` turns it to full."""
    from sorter.config import Settings
    from sorter.decode import Prepared, decode_one, decode_one_full, decoder_for
    from sorter.domain import Claimed

    assert decoder_for(Settings.from_env({}).full_decode) is decode_one
    assert decoder_for(Settings.from_env({"SORTER_FULL_DECODE": "1"}).full_decode) is decode_one_full
    item = Claimed(1, data_file("RG3_J2KR.dcm"), None)
    params = PreprocessParams(channels=("scaled", "hu"))
    small, full = decode_one(item, params), decode_one_full(item, params)
    assert isinstance(small, Prepared) and isinstance(full, Prepared)
    assert small.images.shape == full.images.shape == (1, 2, 128, 128)
    assert float(np.abs(small.images - full.images).mean()) < MEAN_TOLERANCE
    assert not np.array_equal(small.images, full.images)  # the two paths really differ


def test_classify_command_full_decode_flag(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from sorter.cli import main

    path = data_file("RG3_J2KR.dcm")
    runs = [CliRunner().invoke(main, ["classify", "--json", *flag, path]) for flag in ([], ["--full-decode"])]
    assert all(run.exit_code == 0 for run in runs), [run.output for run in runs]
    small, full = (json.loads(run.output.splitlines()[-1]) for run in runs)
    assert small["label"] == full["label"]
    assert small["confidence"] == pytest.approx(full["confidence"], abs=0.05)


@pytest.mark.parametrize(
    ("name", "turbo"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", True),  # YBR_FULL, 100 x 100
        ("examples_ybr_color.dcm", True),  # YBR_FULL_422, 320 x 240
        ("SC_jpeg_no_color_transform_2.dcm", False),  # RGB without a transform: pydicom's decode
    ],
)
def test_small_dct_jpeg_goes_through_libjpeg_turbo_within_rounding(
    name: str, turbo: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too small to scale, a DCT JPEG is still decoded by libjpeg-turbo: the same picture as
    pydicom's libjpeg gives, within the rounding of two IDCT implementations."""
    used: list[bool] = []
    dct = reduced._dct

    def spy(*args: object) -> object:
        result = dct(*args)  # type: ignore[arg-type]
        used.append(result is not None)
        return result

    monkeypatch.setattr(reduced, "_dct", spy)
    path = data_file(name)
    full, small = load_image(path), load_image(path, min_side=256)  # 320 x 240 at most: no scaling
    assert used == [turbo]
    assert small.stored_shape is None and small.frames.shape == full.frames.shape
    difference = np.abs(small.frames - full.frames)
    assert float(difference.mean()) < 0.5 and float(difference.max()) <= 4.0
