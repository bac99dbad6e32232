"""The in-process executor and the pipeline pieces it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from db_support import copy_dicom, pydicom_file, query
from decode_faults import crashing_decode, panicking_decode, report_torch

from sorter.db.session import open_database
from sorter.decode import Decoder, Prepared, decode_one
from sorter.domain import Outcome
from sorter.jobs.local import LocalExecutor
from sorter.model.classifier import Classifier
from sorter.pipeline import register_model
from sorter.scan import Scan
from sorter.summary import RunSummary

pytest_plugins = ["db_fixtures"]


def _scan(
    url: str,
    model: Path | Classifier,
    archive: Path,
    decode: Decoder,
    batch_size: int,
    model_in_workers: bool = True,
) -> RunSummary:
    """Scan ``archive`` through a LocalExecutor with two decode processes running ``decode``."""
    engine, sessions = open_database(url)
    classifier = model if isinstance(model, Classifier) else Classifier.load(model)
    with sessions() as session:
        model_id = register_model(session, classifier)
        session.commit()
    summary = RunSummary()
    executor = LocalExecutor(
        sessions,
        classifier,
        model_id,
        workers=2,
        batch_size=batch_size,
        on_batch=summary.add_outcomes,
        decode=decode,
        model_in_workers=model_in_workers,
    )
    with executor:
        Scan(sessions, executor, summary).run([str(archive)])
    summary.add_stages(
        executor.stage_seconds, executor.images_here, f"{classifier.runner.name} on {classifier.device}"
    )
    engine.dispose()
    return summary


def test_a_file_that_kills_its_decoder_fails_alone_and_the_rest_is_classified(
    sqlite_url, tiny_model, tmp_path
):
    archive = tmp_path / "archive"
    for i in range(7):
        copy_dicom(pydicom_file("CT_small.dcm"), archive / f"ct{i}.dcm")
    copy_dicom(pydicom_file("MR_small.dcm"), archive / "boom.dcm")
    torch.set_num_threads(1)  # as the scan command does next to decode processes
    summary = _scan(sqlite_url, tiny_model, archive, crashing_decode, batch_size=3)

    assert summary.classified == 7
    assert summary.failed == {"decode_error": 1}
    rows = {
        Path(r.path).name: (r.status, r.error, r.detail)
        for r in query(sqlite_url, "SELECT path, status, error, detail FROM instances")
    }
    assert rows["boom.dcm"] == (
        "failed",
        "decode_error",
        "decoder crashed: the decode process died on this file twice",
    )
    assert {v for k, v in rows.items() if k != "boom.dcm"} == {("done", None, None)}


def test_a_decoder_panic_fails_its_file_alone_and_the_rest_of_its_batch_is_classified(
    sqlite_url, tiny_model, tmp_path
):
    """A Rust codec's panic is a BaseException that cannot be pickled: it must not cross the pool."""
    archive = tmp_path / "archive"
    for i in range(7):
        copy_dicom(pydicom_file("CT_small.dcm"), archive / f"ct{i}.dcm")
    copy_dicom(pydicom_file("MR_small_RLE.dcm"), archive / "panic.dcm")
    torch.set_num_threads(1)
    summary = _scan(sqlite_url, tiny_model, archive, panicking_decode, batch_size=8)

    assert summary.classified == 7
    assert summary.failed == {"decode_error": 1}
    rows = {
        Path(r.path).name: (r.status, r.error, r.detail)
        for r in query(sqlite_url, "SELECT path, status, error, detail FROM instances")
    }
    assert rows.pop("panic.dcm") == (
        "failed",
        "decode_error",
        "FakePanic: index out of bounds: the len is 8192 but the index is 8192",
    )
    assert set(rows.values()) == {("done", None, None)}


def test_decode_one_turns_bad_files_into_outcomes(tiny_model, tmp_path):
    from sorter.db.queries import Claimed

    params = Classifier.load(tiny_model).spec.preprocess
    text = tmp_path / "x.dcm"
    text.write_text("hello")
    good = decode_one(Claimed(1, pydicom_file("CT_small.dcm"), None), params)
    bad = decode_one(Claimed(2, str(text), None), params)
    gone = decode_one(Claimed(3, str(tmp_path / "missing.dcm"), None), params)
    assert isinstance(good, Prepared) and good.images.shape == (1, 1, 32, 32)
    assert isinstance(bad, Outcome) and (bad.status.value, bad.error) == ("failed", "not_dicom")
    assert isinstance(gone, Outcome) and gone.error == "unreadable"


def test_decode_processes_never_import_torch(sqlite_url, tiny_model, tmp_path):
    """Torch in a decode process costs seconds at start and a GiB of memory per process."""
    archive = tmp_path / "archive"
    for i in range(4):
        copy_dicom(pydicom_file("CT_small.dcm"), archive / f"ct{i}.dcm")
    _scan(sqlite_url, tiny_model, archive, report_torch, batch_size=4)
    details = {r.detail for r in query(sqlite_url, "SELECT detail FROM instances")}
    assert details == {"False"}, "a decode process imported torch"


class _CountingRunner:
    """The classifier's runner, counting the images this process ran the model on."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.images = runner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def __call__(self, images: Any, features: Any, headers: Any = None) -> Any:
        self.images += len(images)
        return self.runner(images, features, headers)


def test_the_model_in_the_decode_processes_predicts_what_it_predicts_here(tiny_model, tmp_path):
    archive = tmp_path / "archive"
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "JPEG2000.dcm"] * 3):
        copy_dicom(pydicom_file(name), archive / f"{i:02d}-{name}")
    columns = "i.path, p.label, p.verdict, " + ", ".join(f"p.p_{label}" for label in ("ct", "mr", "xr", "us"))
    sql = f"SELECT {columns} FROM predictions p JOIN instances i ON i.id = p.instance_id ORDER BY i.path"
    results = {}
    for in_workers in (True, False):
        url = f"sqlite:///{tmp_path / f'in-workers-{in_workers}.db'}"
        classifier = Classifier.load(tiny_model, device="cpu")  # ONNX Runtime runs on the CPU only
        assert classifier.runner.name == "onnxruntime"
        counting = classifier.runner = _CountingRunner(classifier.runner)
        summary = _scan(url, classifier, archive, decode_one, batch_size=5, model_in_workers=in_workers)
        assert summary.classified == 12
        # In the decode processes the model ran there: none of it here.
        assert counting.images == (0 if in_workers else 12)
        # ... and the summary says so, with the time each stage took in this process.
        assert summary.model_images_here == counting.images
        assert set(summary.stage_s) == {"decode_wait", "model", "write"}
        assert all(0 <= s < summary.elapsed_s for s in summary.stage_s.values())
        line = summary.stage_line()
        assert line is not None and "onnxruntime on cpu" in line
        assert ("in the decode processes" in line) == in_workers
        results[in_workers] = [tuple(row) for row in query(url, sql)]
    here, there = results[False], results[True]
    assert [r[:3] for r in there] == [r[:3] for r in here]
    assert np.allclose([r[3:] for r in there], [r[3:] for r in here], rtol=0, atol=1e-6)
