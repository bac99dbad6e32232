"""The in-process executor and the pipeline pieces it runs."""

from __future__ import annotations

from pathlib import Path

import torch
from db_support import copy_dicom, pydicom_file, query
from decode_faults import crashing_decode, report_torch

from sorter.db.session import open_database
from sorter.jobs.local import LocalExecutor
from sorter.model.classifier import Classifier
from sorter.pipeline import Decoder, Outcome, Prepared, decode_one, register_model
from sorter.scan import Scan
from sorter.summary import RunSummary

pytest_plugins = ["db_fixtures"]


def _scan(url: str, model: Path, archive: Path, decode: Decoder, batch_size: int) -> RunSummary:
    """Scan ``archive`` through a LocalExecutor with two decode processes running ``decode``."""
    engine, sessions = open_database(url)
    classifier = Classifier.load(model)
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
    )
    with executor:
        Scan(sessions, executor, summary).run([str(archive)])
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
    assert summary.failed == {"decoder_crash": 1}
    rows = {
        Path(r.path).name: (r.status, r.error)
        for r in query(sqlite_url, "SELECT path, status, error FROM instances")
    }
    assert rows["boom.dcm"] == ("failed", "decoder_crash")
    assert {v for k, v in rows.items() if k != "boom.dcm"} == {("done", None)}


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
