"""Shared fixtures and helpers for the database, scan and report tests.

Imported by ``test_db_*``, ``test_scan*`` and ``test_reports*`` (fixtures are
re-exported from each module with ``from support_db import ...``).

PostgreSQL: one throwaway database per test session, created through an
autocommit connection to ``test`` on 127.0.0.1:5432 and dropped at the end;
tests truncate it before use. Tests skip with a clear message when the server
is unreachable, unless ``SORTER_TEST_REQUIRE_POSTGRES=1`` (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pydicom
import sqlalchemy as sa
import torch
from click.testing import CliRunner, Result
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from sorter.cli import main
from sorter.db.session import create_db_engine
from sorter.domain import ALL_LABELS
from sorter.model.artefact import save_artefact
from sorter.model.network import build_network
from sorter.model.spec import ModelSpec, PreprocessParams

ADMIN_URL = os.environ.get("SORTER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = (
    "predictions",
    "files",
    "instances",
    "models",
    "reviews",
    "series_state",
    "adaptations",
    "label_issues",
)


def make_tiny_model(path: Path, seed: int) -> Path:
    """An untrained 32-pixel artefact: fast, good for mechanics, says nothing about accuracy."""
    torch.manual_seed(seed)
    spec = ModelSpec(arch="mobilenet_v3_small", labels=ALL_LABELS, preprocess=PreprocessParams(input_size=32))
    save_artefact(build_network(spec), spec, path)
    return path


def make_confirming_model(path: Path, seed: int) -> Path:
    """An untrained 32-pixel ensemble whose partner is sure of CT whatever it sees, and confirms a
    header at 0.9: a CT header skips the main network, any other gets the full average."""
    from dataclasses import replace

    from sorter.domain import Thresholds
    from sorter.model.spec import PartnerSpec

    torch.manual_seed(seed)
    labels = [label.value for label in ALL_LABELS]
    spec = ModelSpec(
        arch="mobilenet_v3_small",
        labels=ALL_LABELS,
        preprocess=PreprocessParams(input_size=32),
        temperature=1.2,
        thresholds=Thresholds(agree_at=dict.fromkeys(labels, 0.6), disagree_at=dict.fromkeys(labels, 0.05)),
    )
    spec = replace(
        spec, partner=PartnerSpec("mobilenet_v3_small", 1.5, 1.1, 0.4, confirm=dict.fromkeys(labels, 0.9))
    )
    network = build_network(spec)
    with torch.no_grad():
        network.partner.head.bias[labels.index("CT")] += 12.0
    save_artefact(network, spec, path)
    return path


def truncate(url: str) -> None:
    """Empty every table of a migrated PostgreSQL database."""
    engine = create_db_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


def query(url: str, sql: str, **params: Any) -> list[Any]:
    """Rows of one SQL statement (test assertions read the database directly, never migrating it)."""
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def execute(url: str, sql: str, **params: Any) -> None:
    """Run one SQL statement that writes, committed (a test's deliberate edit of stored rows)."""
    engine = create_db_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(sql), params)
    finally:
        engine.dispose()


def scalar(url: str, sql: str, **params: Any) -> Any:
    """The single value of one SQL statement."""
    return query(url, sql, **params)[0][0]


def copy_dicom(
    source: str | Path,
    dest: Path,
    *,
    series: str | None = None,
    study: str | None = None,
    modality: str | None = None,
    sop: str | None = None,
    station: str | None = None,
    sop_class: str | None = None,
) -> Path:
    """Copy a real DICOM file under new UIDs (and optionally another header Modality, Station
    Name or SOP class)."""
    ds = pydicom.dcmread(source)
    uid = sop or generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesInstanceUID = series or generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    if modality is not None:
        ds.Modality = modality
    if station is not None:
        ds.StationName = station
    if sop_class is not None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=False)
    return dest


def pydicom_file(name: str) -> str:
    """Path of one of pydicom's test files."""
    path = get_testdata_file(name)
    assert path is not None, name
    return str(path)


def copies_of_one_instance(archive: Path, names: dict[str, int | None]) -> dict[str, Path]:
    """One instance at several paths: ``name -> bytes kept`` (``None``: the whole file). A cut
    inside the pixel data leaves a header that reads: the file fails only when it is decoded."""
    whole = Path(copy_dicom(pydicom_file("CT_small.dcm"), archive / ".whole.dcm")).read_bytes()
    (archive / ".whole.dcm").unlink()
    paths = {}
    for name, keep in names.items():
        paths[name] = archive / name / "ct.dcm"
        paths[name].parent.mkdir(parents=True)
        paths[name].write_bytes(whole if keep is None else whole[:keep])
    return paths


def small_archive(root: Path) -> dict[str, Path]:
    """A small real archive: a CT series, an MR series, a colour image, an RT plan and a text file."""
    ct_series, mr_series, study = generate_uid(), generate_uid(), generate_uid()
    files: dict[str, Path] = {}
    for i in range(3):
        files[f"ct{i}"] = copy_dicom(
            pydicom_file("CT_small.dcm"), root / "siteA" / f"ct{i}.dcm", series=ct_series, study=study
        )
        files[f"mr{i}"] = copy_dicom(
            pydicom_file("MR_small.dcm"), root / "siteB" / f"mr{i}.dcm", series=mr_series, study=study
        )
    files["rgb"] = copy_dicom(pydicom_file("SC_rgb_rle.dcm"), root / "siteB" / "rgb.dcm")
    files["rtplan"] = root / "siteA" / "rtplan.dcm"
    shutil.copy(pydicom_file("rtplan.dcm"), files["rtplan"])
    files["notes"] = root / "siteA" / "notes.txt"
    files["notes"].write_text("not an image\n")
    return files


def sorter(*args: str, url: str, expect: int = 0) -> Result:
    """Run ``sorter ARGS --database-url URL`` in-process and check its exit code."""
    result = CliRunner().invoke(main, [*args, "--database-url", url])
    assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    return result


def scan(url: str, model: Path, *paths: Path, tmp: Path, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``sorter scan`` with one decode worker; returns its JSON summary."""
    summary = tmp / f"summary-{uuid.uuid4().hex[:8]}.json"
    sorter(
        "scan",
        "--model",
        str(model),
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--no-progress",
        "--json-summary",
        str(summary),
        *extra,
        *map(str, paths),
        url=url,
    )
    data: dict[str, Any] = json.loads(summary.read_text())
    return data


#: The ``models`` row of :func:`synthetic_results`: a model that can say CT, MR and XR only.
SYNTHETIC_MODEL = {
    "sha256": "f" * 64,
    "arch": "resnet18",
    "labels": "CT,MR,XR",
    "min_confidence": 0.8,
    "min_margin": 0.2,
}


def synthetic_results(url: str) -> dict[str, str]:
    """Instances and predictions written through the real write path, with chosen probabilities.

    Series (header label -> what the probabilities say): ``mr_as_ct`` MR -> CT
    (confident), ``ct_ok`` CT -> CT, ``ct_unsure`` CT -> half CT half MR,
    ``no_header`` none -> CT, ``mg_unknown`` MG -> CT with a model that has no MG.
    Studies: ``study_bad`` holds ``mr_as_ct`` and ``ct_ok``; ``study_good`` holds ``ct_ok2``.
    Returns the UIDs by name.
    """
    from sorter.domain import Label, Verdict

    uids = {
        name: generate_uid()
        for name in (
            "mr_as_ct",
            "ct_ok",
            "ct_unsure",
            "no_header",
            "mg_unknown",
            "ct_ok2",
            "study_bad",
            "study_good",
        )
    }
    labels = (Label.CT, Label.MR, Label.XR)  # the model cannot say MG
    plan = [  # series, study, modality, source, station, p(CT), p(MR), verdict of each instance
        ("mr_as_ct", "study_bad", "MR", "siteA", "MR1", 0.96, 0.03, Verdict.DISAGREE),
        ("ct_ok", "study_bad", "CT", "siteA", "CT1", 0.97, 0.02, Verdict.AGREE),
        ("ct_unsure", "study_good", "CT", "siteB", "CT2", 0.50, 0.49, Verdict.UNCERTAIN),
        ("no_header", "study_good", None, "siteB", None, 0.90, 0.05, Verdict.NO_HEADER),
        ("mg_unknown", "study_good", "MG", "siteB", None, 0.90, 0.05, Verdict.UNSUPPORTED),
        ("ct_ok2", "study_good", "CT", "siteB", "CT2", 0.99, 0.01, Verdict.AGREE),
    ]
    rows = []
    for series, study, modality, source, station, p_ct, p_mr, verdict in plan:
        for i in range(3):
            path = f"/archive/{source}/{series}/{i}.dcm"
            header = result_header(path, uids[study], uids[series], modality, station)
            p_xr = round(1 - p_ct - p_mr, 6)
            probs = dict(zip(labels, (p_ct, p_mr, p_xr), strict=True))
            header_label = Label(modality) if modality in ("CT", "MR", "MG") else None
            rows.append((header, source, header_label, probs, verdict))
    write_results(url, SYNTHETIC_MODEL, rows)
    return uids


def result_header(
    path: str,
    study: str,
    series: str,
    modality: str | None,
    station: str | None = None,
    sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
) -> Any:
    """The ``InstanceHeader`` of one instance for :func:`write_results`, under a new SOP Instance UID."""
    from sorter.domain import InstanceHeader

    return InstanceHeader(
        path=path,
        sop_instance_uid=generate_uid(),
        study_instance_uid=study,
        series_instance_uid=series,
        sop_class_uid=sop_class,
        modality=modality,
        station_name=station,
    )


def top2_prediction(probs: dict[Any, float]) -> Any:
    """The ``Prediction`` a network with these probabilities makes: its best two labels and all."""
    from sorter.domain import Prediction

    first, second = sorted(probs, key=probs.__getitem__, reverse=True)[:2]
    return Prediction(first, probs[first], second, probs[second], probs)


def write_results(
    url: str,
    model: dict[str, Any],
    rows: list[tuple[Any, str | None, Any, dict[Any, float], Any]],
    thresholds: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Register and classify instances through the real write path, with chosen probabilities.

    ``rows``: ``(InstanceHeader, source, header label or None, {Label: probability}, Verdict)``;
    ``model`` is its ``models`` row, ``thresholds`` its header test (label -> agree_at, disagree_at).
    """
    from sorter.db.queries import model_id_for
    from sorter.db.session import open_database
    from sorter.domain import Status
    from sorter.ingest import from_header, register
    from sorter.pipeline import Outcome, write_outcomes

    engine, sessions = open_database(url)
    with sessions() as session:
        model_id = model_id_for(session, model, thresholds)
        outcomes = []
        for header, source, header_label, probs, verdict in rows:
            [registered] = register(session, [from_header(header, source=source)])
            prediction = top2_prediction(probs)
            outcomes.append(Outcome(registered.instance_id, Status.DONE, header_label, prediction, verdict))
        write_outcomes(session, model_id, outcomes)
        session.commit()
    engine.dispose()


def tree_rules(path: Path, root: Path, name: str = "tree") -> Path:
    """A rules file at ``path`` with one rule, ``name``, that copies every classified instance to
    ``root/{label}/{SOPInstanceUID}.dcm``."""
    path.write_text(
        f'mode = "all"\n[[rule]]\nname = "{name}"\n'
        f'[rule.file]\nto = "{root}/{{label}}/{{SOPInstanceUID}}.dcm"\n'
    )
    return path


def every_verdict_results(url: str) -> None:
    """:func:`synthetic_results`, then one study for each study verdict (agree, disagree over
    uncertain, no_header, unsupported), a series without a study and an instance without a
    series, two instances each, from the same model."""
    from sorter.domain import Label, Verdict

    synthetic_results(url)  # studies that disagree (one bad series) and are uncertain
    plan = [  # study, series, modality, p(CT), p(MR), verdict
        ("mixed", "m1", "CT", 0.50, 0.49, Verdict.UNCERTAIN),  # uncertain first, disagree wins
        ("mixed", "m2", "MR", 0.96, 0.03, Verdict.DISAGREE),
        ("agree", "a1", "CT", 0.97, 0.02, Verdict.AGREE),
        ("agree", "a2", "MR", 0.02, 0.97, Verdict.AGREE),
        ("nohead", "n1", None, 0.90, 0.05, Verdict.NO_HEADER),
        ("unsup", "u1", "MG", 0.90, 0.05, Verdict.UNSUPPORTED),
        (None, "orphan", "CT", 0.97, 0.02, Verdict.AGREE),
        ("loose", None, "MR", 0.96, 0.03, Verdict.DISAGREE),
    ]
    uids: dict[str | None, str | None] = {None: None}
    rows = []
    for study, series, modality, p_ct, p_mr, verdict in plan:
        for key in (study, series):
            uids.setdefault(key, generate_uid())
        for n in range(2):
            header = result_header(f"/archive/x/{series}/{n}.dcm", uids[study], uids[series], modality)
            probs = {Label.CT: p_ct, Label.MR: p_mr, Label.XR: round(1 - p_ct - p_mr, 6)}
            label = Label(modality) if modality else None
            rows.append((header, "siteX", label, probs, verdict))
    write_results(url, SYNTHETIC_MODEL, rows)  # the same model: one models row
