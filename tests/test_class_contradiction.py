"""A header at odds with itself: the SOP class says one acquisition, the Modality another.

Routers, anonymisers and hand edits rewrite (0008,0060) and leave the SOP Class UID as the device
wrote it. When the pixels lean the class's way but fall short of refuting the Modality on their
own, the two together refute it (``disagree``, not ``uncertain``).

Before, the bundled model read pydicom's MR_small relabelled DX as MR at 0.91 and a CT relabelled
NM as CT at 0.93, and called both headers `uncertain`: they never reached `discrepancies`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from db_support import copy_dicom, pydicom_file, query, scan, sorter
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)
from verdict_support import prediction_of

from sorter.cli import main
from sorter.compare import compare
from sorter.db.session import create_db_engine
from sorter.domain import ALL_LABELS, Label, Verdict, Witnesses
from sorter.model.artefact import DEFAULT_MODEL_PATH
from sorter.model.spec import Thresholds
from sorter.taxonomy import class_contradiction, class_labels

pytest_plugins = ["db_fixtures"]


@pytest.mark.parametrize(
    ("modality", "sop_class", "expected"),
    [
        ("MR", CTImageStorage, {Label.CT}),
        ("NM", CTImageStorage, {Label.CT}),
        ("DX", MRImageStorage, {Label.MR}),
        ("CT", CTImageStorage, None),
        ("ct ", CTImageStorage + "\0", None),  # padded values as some writers leave them
        ("CT", "1.2.840.10008.5.1.4.1.1.2.1", None),  # Enhanced CT
        ("MG", ComputedRadiographyImageStorage, None),  # CR cassettes hold mammograms
        ("US", ComputedRadiographyImageStorage, {Label.XR, Label.MG}),
        ("DX", DigitalMammographyXRayImageStorageForPresentation, {Label.MG}),
        ("XC", UltrasoundImageStorage, {Label.US}),
        ("MR", SecondaryCaptureImageStorage, None),  # a capture claims nothing
        ("MR", "1.2.840.10008.5.1.4.1.1.13.1.1", None),  # X-Ray 3D angiographic: no claim
        ("MR", "1.3.12.2.1107.5.9.1", None),  # a private class
        ("MR", None, None),
        (None, CTImageStorage, None),
        ("SR", CTImageStorage, None),  # outside the taxonomy
    ],
)
def test_class_contradiction(modality, sop_class, expected):
    assert class_contradiction(modality, sop_class) == (None if expected is None else frozenset(expected))


def test_every_class_in_the_table_is_a_standard_image_storage_class():
    from pydicom.uid import UID

    from sorter.taxonomy import _CLASS_LABELS

    names = {uid: UID(uid).name for uid in _CLASS_LABELS}
    assert all("Storage" in name for name in names.values()), names  # no typo, no unknown UID
    assert len(_CLASS_LABELS) == 42


def test_every_label_has_a_class_that_claims_it():
    claimed = {label for uid in _STANDARD_CLASSES for label in class_labels(uid) or ()}
    assert claimed == set(ALL_LABELS)


_STANDARD_CLASSES = [
    CTImageStorage,
    MRImageStorage,
    "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.20",
    UltrasoundImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ComputedRadiographyImageStorage,
    "1.2.840.10008.5.1.4.1.1.77.1.4",
]


THRESHOLDS = Thresholds(agree_at={"NM": 0.4, "MR": 0.5}, disagree_at={"NM": 0.01, "MR": 0.01})


@pytest.mark.parametrize(
    ("header", "prediction", "contradicted_by", "verdict"),
    [
        # uncertain on the pixels; the class names the pixels' top label: refuted
        (Label.NM, prediction_of(CT=0.93, NM=0.05, PT=0.02), {Label.CT}, Verdict.DISAGREE),
        (Label.NM, prediction_of(CT=0.93, NM=0.05, PT=0.02), None, Verdict.UNCERTAIN),
        # the class names another label than the pixels' top one: no second witness
        (Label.NM, prediction_of(PT=0.6, NM=0.3, CT=0.1), {Label.CT}, Verdict.UNCERTAIN),
        # the pixels confirm the Modality: the class does not overrule them
        (Label.NM, prediction_of(NM=0.7, CT=0.3), {Label.CT}, Verdict.AGREE),
        # refuted on the pixels alone, with or without the class
        (Label.MR, prediction_of(CT=0.995, MR=0.005), {Label.CT}, Verdict.DISAGREE),
    ],
)
def test_a_self_contradicting_header_is_refuted_when_the_pixels_lean_the_class_way(
    header, prediction, contradicted_by, verdict
):
    supported = set(ALL_LABELS)
    assert (
        compare(header, prediction, supported, THRESHOLDS, Witnesses(contradicted_by=contradicted_by))
        is verdict
    )


def test_without_the_header_test_the_class_turns_a_low_confidence_call_too():
    weak = prediction_of(CT=0.6, MR=0.4)  # below min_confidence 0.8: uncertain on the pixels
    assert compare(Label.MR, weak, set(ALL_LABELS)) is Verdict.UNCERTAIN
    assert (
        compare(Label.MR, weak, set(ALL_LABELS), witnesses=Witnesses(contradicted_by=frozenset({Label.CT})))
        is Verdict.DISAGREE
    )


def _relabelled(tmp_path, name: str, modality: str, folder: str = "archive"):
    return copy_dicom(
        pydicom_file(name), tmp_path / folder / f"{name[:-4]}-as-{modality}.dcm", modality=modality
    )


def test_the_bundled_model_refutes_relabelled_copies_it_only_doubted(tmp_path):
    mr_as_dx = _relabelled(tmp_path, "MR_small.dcm", "DX")
    ct_as_nm = _relabelled(tmp_path, "693_J2KI.dcm", "NM")
    right = _relabelled(tmp_path, "MR_small.dcm", "MR")
    result = CliRunner().invoke(main, ["classify", "--json", str(mr_as_dx), str(ct_as_nm), str(right)])
    assert result.exit_code == 0, result.output
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert (records[str(mr_as_dx)]["label"], records[str(mr_as_dx)]["verdict"]) == ("MR", "disagree")
    assert (records[str(ct_as_nm)]["label"], records[str(ct_as_nm)]["verdict"]) == ("CT", "disagree")
    assert records[str(mr_as_dx)]["class_allows"] == ["MR"]
    assert records[str(right)]["verdict"] == "agree" and records[str(right)]["class_allows"] is None


def test_a_scan_flags_the_relabelled_series(db_url, tmp_path):
    series = "1.2.826.0.1.3680043.8.498.4242"
    paths = [
        copy_dicom(
            pydicom_file("MR_small.dcm"), tmp_path / "archive" / f"{n}.dcm", series=series, modality="DX"
        )
        for n in range(3)
    ]
    summary = scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == 3, summary
    verdicts = {r.path: r.verdict for r in query(db_url, "SELECT path, verdict FROM latest_predictions")}
    assert verdicts == dict.fromkeys(map(str, paths), "disagree")
    rows = query(
        db_url,
        "SELECT header_label, label, verdict FROM series_summary WHERE series_instance_uid = :s",
        s=series,
    )
    assert [tuple(r) for r in rows] == [("XR", "MR", "disagree")]

    copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "archive" / "right.dcm")  # no contradiction
    scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    report = json.loads(sorter("report", "--format", "json", url=db_url).stdout)
    assert report["class_contradictions"] == [
        {
            "sop_class": "MR Image Storage",
            "sop_class_uid": MRImageStorage,
            "header_modality": "DX",
            "class_allows": "MR",
            "n": 3,
            "disagree": 3,
            "uncertain": 0,
            "agree": 0,
        }
    ]


def test_right_headers_in_another_class_stay_agreed(corpus):
    """Ultrasound frames a device stored as CR objects (five in the corpus): the class contradicts
    a right Modality, and the pixels, sure of US, keep it."""
    stored_as_cr = []
    for path in sorted((corpus / "US").glob("*/*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.SOPClassUID == ComputedRadiographyImageStorage and ds.Modality == "US":
            stored_as_cr.append(str(path))
    assert len(stored_as_cr) >= 3
    result = CliRunner().invoke(main, ["classify", "--json", *stored_as_cr])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["class_allows"] == ["MG", "XR"] for r in records} == {True}
    assert [r["verdict"] for r in records] == ["agree"] * len(stored_as_cr)


def test_the_review_page_header_says_the_class_contradicts_the_modality(tmp_path):
    from sorter.dicom.headers import describe_series

    assert describe_series(_relabelled(tmp_path, "CT_small.dcm", "NM"))["SOPClassUID"] == (
        "CT Image Storage (allows CT, not the Modality)"
    )
    assert describe_series(_relabelled(tmp_path, "CT_small.dcm", "CT"))["SOPClassUID"] == "CT Image Storage"


def test_a_database_from_before_gets_the_new_verdicts_by_reclassifying_what_it_predicted_before(
    db_url, tmp_path
):
    """Upgrading changes nothing stored: the model's predictions stand until `reclassify
    --predicted-before` (the day of the upgrade) makes them again, resumably."""
    relabelled = _relabelled(tmp_path, "MR_small.dcm", "DX")
    right = _relabelled(tmp_path, "CT_small.dcm", "CT")
    scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    engine = create_db_engine(db_url)
    try:
        with engine.begin() as connection:  # as a release before the rule stored them, a day ago
            connection.execute(
                sa.text("UPDATE predictions SET verdict = 'uncertain', created_at = :t"),
                {"t": datetime.now(UTC) - timedelta(days=1)},
            )
    finally:
        engine.dispose()
    model = ("--model", str(DEFAULT_MODEL_PATH), "--no-progress")

    unchanged = sorter("reclassify", *model, url=db_url)
    assert "nothing classified again" in unchanged.stderr and "--predicted-before DATE" in unchanged.stderr

    since = (datetime.now() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")  # local time
    sorter("reclassify", *model, "--verdict", "uncertain", "--predicted-before", since, url=db_url)
    verdicts = {r.path: r.verdict for r in query(db_url, "SELECT path, verdict FROM latest_predictions")}
    assert verdicts == {str(relabelled): "disagree", str(right): "agree"}
    assert query(db_url, "SELECT count(*) AS n FROM predictions")[0].n == 2  # replaced, not added

    again = sorter("reclassify", *model, "--predicted-before", since, url=db_url)
    assert "nothing classified again" in again.stderr  # what it redid is newer than the cut-off
