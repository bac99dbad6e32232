"""``sorter classify`` on real files: the JSON contract, status objects and exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from sorter.cli import main
from sorter.domain import ALL_LABELS, Verdict
from sorter.model.artefact import DEFAULT_MODEL_PATH, save_artefact
from sorter.model.network import build_network
from sorter.model.spec import ModelSpec, PreprocessParams

FIELDS = {
    "path",
    "sop_instance_uid",
    "header_modality",
    "header_label",
    "label",
    "confidence",
    "top2",
    "verdict",
    "class_allows",
    "radionuclide",
    "nuclide_allows",
    "nuclide_confirms",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained artefact: enough to check the output contract, not the accuracy."""
    spec = ModelSpec(arch="mobilenet_v3_small", labels=ALL_LABELS, preprocess=PreprocessParams(input_size=32))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_artefact(build_network(spec), spec, path)
    return path


@pytest.fixture()
def archive(tmp_path) -> Path:
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "emri_small.dcm"):
        shutil.copy(get_testdata_file(name), tmp_path / name)
    nested = tmp_path / "nested"
    nested.mkdir()
    shutil.copy(get_testdata_file("rtplan.dcm"), nested / "rtplan.dcm")
    (nested / "notes.txt").write_text("not an image")
    return tmp_path


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_json_contract_on_a_folder(tiny_model, archive):
    result = CliRunner().invoke(main, ["classify", "--json", "--model", str(tiny_model), str(archive)])
    assert result.exit_code == 0, result.output
    records = _lines(result.stdout)
    assert len(records) == 7
    images = [r for r in records if "status" not in r]
    assert len(images) == 5
    for record in images:
        assert set(record) == FIELDS
        assert record["verdict"] in {v.value for v in Verdict}
        assert len(record["top2"]) == 2 and record["top2"][0][0] == record["label"]
        assert record["top2"][0][1] >= record["top2"][1][1]
        assert 0 <= record["confidence"] <= 1
    ct = next(r for r in images if r["path"].endswith("CT_small.dcm"))
    assert ct["header_modality"] == "CT" and ct["header_label"] == "CT"
    assert ct["sop_instance_uid"]
    by_name = {Path(r["path"]).name: r for r in records if "status" in r}
    assert by_name["rtplan.dcm"]["status"] == "skipped" and by_name["rtplan.dcm"]["reason"] == "non_image"
    assert by_name["notes.txt"]["status"] == "failed" and by_name["notes.txt"]["reason"] == "not_dicom"


def test_a_folder_named_twice_or_with_a_file_inside_is_classified_once(tiny_model, archive):
    args = [str(archive), f"{archive}{os.sep}", str(archive / "CT_small.dcm")]
    result = CliRunner().invoke(main, ["classify", "--json", "--model", str(tiny_model), *args])
    assert result.exit_code == 0, result.output
    paths = [r["path"] for r in _lines(result.stdout)]
    assert len(paths) == 7 and len(set(paths)) == 7
    assert all(p.startswith(str(archive)) for p in paths)  # under the name first given


def test_table_output(tiny_model, archive):
    result = CliRunner().invoke(main, ["classify", "--model", str(tiny_model), str(archive / "CT_small.dcm")])
    assert result.exit_code == 0, result.output
    assert "CT_small.dcm" in result.stdout and "verdict" in result.stdout


def test_exit_code_is_nonzero_only_when_nothing_was_readable(tiny_model, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    result = CliRunner().invoke(main, ["classify", "--json", "--model", str(tiny_model), str(bad)])
    assert result.exit_code == 1
    assert _lines(result.stdout)[0]["status"] == "failed"


def test_a_damaged_frame_is_one_line_not_tracebacks(tiny_model, tmp_path):
    """pydicom logs each decoder that fails on a frame with its traceback, and OpenJPEG writes to
    stderr from C; the user sees the reason, with what the decoder said."""
    import subprocess
    import sys

    from pydicom import dcmread
    from pydicom.encaps import encapsulate, get_frame

    ds = dcmread(get_testdata_file("RG1_J2KR.dcm"))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([frame[: len(frame) // 50]])
    damaged = tmp_path / "damaged.dcm"
    ds.save_as(damaged)
    command = [sys.executable, "-m", "sorter", "classify", "--json", "--model", str(tiny_model), str(damaged)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    [record] = _lines(result.stdout)
    assert record["reason"] == "decode_error"
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr
    # OpenJPEG's own complaint, written from C, goes with the file rather than between the rows.
    assert "Tile part length" not in result.stderr, result.stderr
    assert "(the decoder said: Tile part length size inconsistent with stream length)" in record["detail"]


def test_a_fifo_or_a_device_is_skipped_not_read(tiny_model, archive):
    """A FIFO in the folder blocked ``sorter classify`` for ever at the first read (``sorter
    scan``'s walk already skipped it); a device named on the command line too."""
    import subprocess
    import sys

    os.mkfifo(archive / "nested" / "pipe.dcm")
    command = [sys.executable, "-m", "sorter", "classify", "--json", "--model", str(tiny_model)]
    result = subprocess.run([*command, str(archive), os.devnull], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = {Path(r["path"]).name: r for r in _lines(result.stdout)}
    assert len(records) == 9
    for name in ("pipe.dcm", Path(os.devnull).name):
        assert records[name]["status"] == "skipped" and records[name]["reason"] == "not_regular_file"
    assert records["pipe.dcm"]["detail"].startswith("p")  # its mode, as ls shows it
    assert records["CT_small.dcm"]["verdict"] in {v.value for v in Verdict}


def test_classify_walks_linked_folders_as_scan_does(tiny_model, archive, tmp_path_factory, monkeypatch):
    """``sorter classify`` skipped a linked folder (an archive's year on another disk) without a
    word, and called a broken link ``unreadable``; it walks as ``sorter scan`` does now, and shows
    paths as given."""
    elsewhere = tmp_path_factory.mktemp("disk2") / "2024"
    elsewhere.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), elsewhere / "ct.dcm")
    (archive / "2024").symlink_to(elsewhere)
    (archive / "nested" / "gone.dcm").symlink_to(archive / "nowhere.dcm")
    (archive / "nested" / "loop").symlink_to(archive)
    monkeypatch.chdir(archive.parent)
    result = CliRunner().invoke(main, ["classify", "--json", "--model", str(tiny_model), f"{archive.name}/"])
    assert result.exit_code == 0, result.output
    records = {r["path"]: r for r in _lines(result.stdout)}
    assert records[f"{archive.name}/2024/ct.dcm"]["label"] in {label.value for label in ALL_LABELS}
    assert records[f"{archive.name}/nested/gone.dcm"]["reason"] == "broken_symlink"
    assert records[f"{archive.name}/nested/loop"]["reason"] == "symlink_loop"
    assert len(records) == 10  # the seven of the folder, the linked file, the broken link, the loop


@pytest.mark.parametrize("content", [b"junk", b"", b"PK\x03\x04 a zip cut short"])
def test_mismatched_model_gives_a_clear_error(tmp_path, archive, content):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    result = CliRunner().invoke(main, ["classify", "--model", str(junk), str(archive)])
    assert result.exit_code != 0
    assert "not a readable dicom-sorter model: not a PyTorch file" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # no torch internals


@pytest.mark.skipif(not DEFAULT_MODEL_PATH.exists(), reason="no bundled model in this checkout")
def test_bundled_model_reads_clear_cases(corpus):
    files = [corpus / "CT/nema_wg04_ct2/CT2_J2KR.dcm", corpus / "MR/nema_wg04_mr1/MR1_J2KR.dcm"]
    files = [f for f in files if f.exists()]
    if len(files) < 2:
        pytest.skip("corpus files for this check are missing")
    result = CliRunner().invoke(main, ["classify", "--json", *map(str, files)])
    assert result.exit_code == 0, result.output
    labels = [r["label"] for r in _lines(result.stdout)]
    assert labels == ["CT", "MR"]
