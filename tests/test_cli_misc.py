"""Smaller things a user trips over (issue 13): variables in --help, the documented Python API,
summaries in plain English, an export that says what it is short of."""

from __future__ import annotations

import csv
import io
import logging
import re
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from db_support import query, scan, small_archive, sorter
from pydicom.data import get_testdata_file
from support import umask

from sorter.cli import main
from sorter.domain import ALL_LABELS
from sorter.logs import configure_logging, json_logs

pytest_plugins = ["db_fixtures"]
ALL_LABEL_VALUES = {label.value for label in ALL_LABELS}


def test_help_names_each_option_s_environment_variable():
    for command in (["scan"], ["listen"], ["worker"], ["watch"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0
        assert "env var: SORTER_DATABASE_URL" in " ".join(result.output.split()), command


def test_the_documented_python_api(tiny_model, tmp_path):
    from sorter import Classifier, classify_paths

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    records = list(classify_paths([tmp_path], Classifier.load(tiny_model, device="cpu")))
    by_name = {Path(r["path"]).name: r for r in records}
    assert sorted(by_name) == ["ct.dcm", "notes.txt"]
    assert by_name["ct.dcm"]["header_label"] == "CT" and by_name["ct.dcm"]["label"] in ALL_LABEL_VALUES
    assert by_name["notes.txt"]["status"] in {"failed", "skipped"} and "label" not in by_name["notes.txt"]


def test_the_python_api_takes_one_path_and_refuses_a_zero_batch(tiny_model, tmp_path, monkeypatch):
    """``classify_paths("/archive/study1", ...)`` iterated the string: "/", "a", "r" ... (the
    root first: the whole disk); one path, str or Path, is one path now."""
    from sorter import Classifier, classify_paths

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    classifier = Classifier.load(tiny_model, device="cpu")
    monkeypatch.chdir(tmp_path)
    for one in ("ct.dcm", tmp_path, str(tmp_path)):  # a regression fails at the first, never walks /
        names = sorted(Path(r["path"]).name for r in classify_paths(one, classifier))
        assert names == (["ct.dcm"] if one == "ct.dcm" else ["ct.dcm", "notes.txt"]), one
    with pytest.raises(ValueError, match="batch_size and frames must be at least 1"):
        next(classify_paths([tmp_path], classifier, batch_size=0))


@pytest.mark.parametrize("name", ["CT_small.dcm", "SC_rgb.dcm"])
def test_predict_images_takes_arrays_the_caller_decoded(name):
    """The README offers ``predict_images`` for "images you decoded yourself"; an array was an
    AttributeError ('numpy.ndarray' object has no attribute 'frames')."""
    import numpy as np
    from pydicom import dcmread

    from sorter import Classifier
    from sorter.dicom.pixels import DecodedImage, load_image

    path = get_testdata_file(name)
    ds = dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)  # (H, W) grey or (H, W, 3) RGB
    if "RescaleSlope" in ds:
        pixels = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # Hounsfield units
    classifier = Classifier.load(device="cpu")
    [mine] = classifier.predict_images([pixels])
    [decoded] = classifier.predict_images([load_image(path)])
    assert mine.label == decoded.label
    assert mine.probabilities == pytest.approx(decoded.probabilities, abs=1e-5)
    for bad, words in ((np.zeros((0, 4)), "not (0, 4)"), (np.array([["a"]]), "must hold numbers")):
        with pytest.raises(ValueError, match=re.escape(words)):
            DecodedImage.from_array(bad)
    # One image or one header where a list belongs: said so, not a row of pixels "not (H, W)", an
    # ONNX Runtime GatherElements error or a NumPy broadcast error.
    with pytest.raises(TypeError, match=re.escape("pass [image] for one")):
        classifier.predict_images(pixels)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("pass [header] for one")):
        classifier.predict_images([pixels], "CT")
    with pytest.raises(ValueError, match="2 images but 1 headers"):
        classifier.predict_images([pixels, pixels], ["CT"])


def test_predict_images_leaves_blank_frames_out_as_a_scan_does():
    """A blank array got a label with a confidence (the bundled model: MR at 0.48); the scan skips it."""
    import numpy as np
    from pydicom import dcmread

    from sorter import Classifier

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    classifier = Classifier.load(device="cpu")
    for blank, words in (
        (np.zeros((64, 64)), "images[1] is blank: the frame read holds one value (0)"),
        (np.full((3, 8, 8), -1024.0), "images[1] is blank: each of the 3 frames"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            classifier.predict_images([hu, blank])
    # A multi-frame image with a blank frame is judged by its other frames alone.
    with_blank = np.stack([hu, np.full_like(hu, -1024.0)])
    [alone], [mixed] = classifier.predict_images([hu]), classifier.predict_images([with_blank])
    assert mixed.probabilities == pytest.approx(alone.probabilities, abs=1e-6)


def test_predict_images_reads_headers_as_a_scan_does(corpus):
    """A header given as the Modality text: 'ct' and 'DX' were silently read as no header, so
    the bundled model's partner never confirmed them (as it does 'CT' on this slice)."""
    from sorter import Classifier
    from sorter.dicom.pixels import load_image
    from sorter.domain import Label

    image = load_image(corpus / "CT" / "nema_wg04_ct1" / "CT1_J2KR.dcm")
    classifier = Classifier.load(device="cpu")

    def predict(header: object) -> dict:
        return classifier.predict_images([image], [header])[0].probabilities

    confirmed, unheaded = predict(Label.CT), predict(None)
    assert confirmed != unheaded  # the partner confirms the CT header alone on this slice
    assert predict("CT") == predict("ct") == predict(" ct ") == confirmed
    assert predict("DX") == predict(Label.XR) and predict("SR") == unheaded


def test_summaries_count_in_english(tiny_model, sqlite_url, tmp_path):
    archive = tmp_path / "a"
    archive.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), archive / "ct.dcm")
    result = sorter("scan", "--model", str(tiny_model), "--workers", "1", str(archive), url=sqlite_url)
    assert "\n1 file in " in result.output and "0 duplicates" in result.output
    assert " s (" in result.output or " s:" in result.output  # no "2.4 s :"


def test_export_says_which_labels_fall_short(db_url, tiny_model, tmp_path):
    small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    out = tmp_path / "m.csv"
    result = sorter(
        "export", "--balanced", "--per-label", "500", "--label-from", "header", "--out", str(out), url=db_url
    )
    assert "short of --per-label 500: CT 3, MR 3" in result.output, result.output
    assert "lower --per-label" in result.output


def test_an_exported_manifest_is_readable_as_any_new_file_is(sqlite_url, tiny_model, tmp_path):
    """The training team reads it: it used to be written 0600 whatever the umask (mkstemp's mode)."""
    small_archive(tmp_path / "archive")
    scan(sqlite_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    out = tmp_path / "m.csv"
    with umask(0o022):
        sorter("export", "--label-from", "header", "--out", str(out), url=sqlite_url)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    result = sorter("export", "--label-from", "reviewed", "--out", str(out), url=sqlite_url)
    assert "wrote no rows to" in result.output and "--label-from reviewed" in result.output, result.output


def test_export_to_standard_output(sqlite_url, tiny_model, tmp_path, monkeypatch):
    """``--out -`` wrote a file named "-"; now the manifest goes to stdout, paths relative to here."""
    small_archive(tmp_path / "archive")
    scan(sqlite_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    monkeypatch.chdir(tmp_path)
    result = sorter("export", "--label-from", "header", "--out", "-", url=sqlite_url)
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows and all((tmp_path / row["path"]).is_file() for row in rows), result.stdout
    assert f"wrote {len(rows)} rows to standard output" in result.stderr, result.stderr
    assert not (tmp_path / "-").exists()


def test_json_logs_are_detected_so_the_worker_can_quiet_celery_s_banner():
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        root.handlers = []
        configure_logging(logging.INFO, "json")
        assert json_logs()
        root.handlers = []
        configure_logging(logging.INFO, "text")
        assert not json_logs()
    finally:
        root.handlers = saved


def test_a_json_logging_worker_prints_json_only(tmp_path):
    """No Celery banner, no bare warnings: a log shipper parses every line."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from support import stop_process_group

    env = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    out = tmp_path / "worker.log"
    with out.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sorter",
                "--log-format",
                "json",
                "worker",
                "--broker-url",
                "redis://127.0.0.1:6379/11",
                "--database-url",
                f"sqlite:///{tmp_path / 'w.db'}",
                "--device",
                "cpu",
                "--sweep-interval",
                "0",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while b" ready." not in out.read_bytes() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        stop_process_group(process)
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    assert any("ready" in line for line in lines), lines[-5:]
    for line in lines:
        assert line.startswith("{") and isinstance(json.loads(line), dict), line


@pytest.mark.parametrize(
    "args", [["-h"], ["scan", "-h"], ["db", "upgrade", "-h"], ["rules", "check", "-h"], ["--version"]]
)
def test_both_tools_take_dash_h_and_version(args):
    """`sorter -h` was "No such option: -h"; `sorter-train --version` did not exist."""
    from train.cli import main as train_main

    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and ("Usage: " in result.output or "version 0." in result.output), (
        result.output
    )
    trained = CliRunner().invoke(train_main, ["loso", "-h"] if args != ["--version"] else args)
    assert trained.exit_code == 0 and (
        "Usage: " in trained.output or "sorter-train, version" in trained.output
    )


def test_a_blank_source_is_the_default_not_none(tiny_model, sqlite_url, tmp_path):
    """`--source "  "` (or SORTER_SOURCE set to spaces in an environment file) recorded no source
    at all; it now means the option was left out: the first folder under PATH."""
    archive = tmp_path / "a"
    (archive / "site").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), archive / "site" / "ct.dcm")
    sorter(
        "scan", "--model", str(tiny_model), "--workers", "1", "--source", "   ", str(archive), url=sqlite_url
    )
    assert [r.source for r in query(sqlite_url, "SELECT source FROM instances")] == ["site"]
