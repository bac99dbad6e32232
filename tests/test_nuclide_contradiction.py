"""The radionuclide as a witness: a PT header naming Lu-177, an NM header naming F-18.

A PET scanner images positron emitters and a gamma camera single-photon ones, so the nuclide in
the Radiopharmaceutical Information Sequence says which scanner took the image, which the pixels
of SPECT and PET slices seldom tell apart. Before, a Lu-177 SPECT written as PET Image Storage
with Modality PT (as dosimetry exports do) was `agree` or `uncertain` on 7 of its 8 slices.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from db_support import pydicom_file, query, scan, sorter
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from verdict_support import prediction_of

from sorter.cli import main
from sorter.compare import compare
from sorter.db.session import create_db_engine, make_session_factory
from sorter.dicom import lean
from sorter.dicom.headers import HEADER_TAGS, describe_series, header_from_dataset
from sorter.dicom.reading import read_dataset
from sorter.domain import ALL_LABELS, NO_WITNESSES, Label, Verdict, Witnesses
from sorter.model.artefact import DEFAULT_MODEL_PATH
from sorter.model.spec import Thresholds
from sorter.nuclides import nuclide_confirms, nuclide_contradiction, nuclide_labels

pytest_plugins = ["db_fixtures"]

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
LU177 = ("447553000", "SCT", "^177^Lutetium")
F18_RETIRED = ("C-111A1", "SRT", "^18^Fluorine")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("C-111A1", {Label.PT}),  # ^18^Fluorine, the retired SNOMED RT code most archives hold
        ("77004003", {Label.PT}),  # the same in SNOMED CT
        ("C-131A3", {Label.PT}),  # ^68^Gallium
        ("C-163A8", {Label.NM}),  # ^99m^Technetium
        ("72454006", {Label.NM}),
        ("447553000", {Label.NM}),  # ^177^Lutetium
        ("C-114B1", {Label.NM}),  # ^131^Iodine
        (" C-163A8\0", {Label.NM}),  # padded as some writers leave it
        ("C-162F9", None),  # ^90^Yttrium: imaged by PET and by bremsstrahlung SPECT
        ("12345", None),
        ("", None),
        (None, None),
    ],
)
def test_nuclide_labels(code, expected):
    assert nuclide_labels(code) == (None if expected is None else frozenset(expected))


@pytest.mark.parametrize(
    ("label", "code", "expected"),
    [
        (Label.PT, "447553000", {Label.NM}),
        (Label.NM, "C-111A1", {Label.PT}),
        (Label.PT, "C-111A1", None),
        (Label.NM, "C-163A8", None),
        (Label.CT, "C-111A1", None),  # a PET/CT's CT often carries the PET's radiopharmaceutical
        (None, "C-111A1", None),
        (Label.PT, None, None),
    ],
)
def test_nuclide_contradiction(label, code, expected):
    assert nuclide_contradiction(label, code) == (None if expected is None else frozenset(expected))


THRESHOLDS = Thresholds(agree_at={"NM": 0.4, "PT": 0.5}, disagree_at={"NM": 0.01, "PT": 0.015})


@pytest.mark.parametrize(
    ("header", "prediction", "allows", "verdict"),
    [
        # SPECT pixels the network calls PET: the nuclide decides where NM is left room
        (Label.PT, prediction_of(PT=0.78, NM=0.04, MR=0.18), {Label.NM}, Verdict.DISAGREE),
        (Label.PT, prediction_of(PT=0.78, NM=0.04, MR=0.18), None, Verdict.AGREE),
        (Label.PT, prediction_of(NM=0.8, PT=0.1, MR=0.1), {Label.NM}, Verdict.DISAGREE),
        (Label.NM, prediction_of(PT=0.5, NM=0.45, MR=0.05), {Label.PT}, Verdict.DISAGREE),
        # the pixels refute what the nuclide allows and confirm the header: the tag is wrong
        (Label.PT, prediction_of(PT=0.995, NM=0.005), {Label.NM}, Verdict.AGREE),
        # refuted on the pixels alone, with or without the nuclide
        (Label.PT, prediction_of(CT=0.99, PT=0.01), {Label.NM}, Verdict.DISAGREE),
    ],
)
def test_a_header_its_nuclide_rules_out_is_refuted_unless_the_pixels_rule_out_the_nuclide(
    header, prediction, allows, verdict
):
    assert (
        compare(header, prediction, set(ALL_LABELS), THRESHOLDS, Witnesses(nuclide_allows=allows)) is verdict
    )


@pytest.mark.parametrize(
    ("label", "code", "expected"),
    [
        (Label.PT, "C-111A1", True),
        ("PT", "77004003", True),  # a stored header label is its text
        (Label.NM, "C-163A8", True),
        (Label.NM, "447553000", True),  # Lu-177: a gamma camera's
        (Label.PT, "447553000", False),  # contradicts instead
        (Label.PT, "C-162F9", False),  # Y-90 claims nothing
        (Label.PT, None, False),
        (Label.CT, "C-111A1", False),  # a PET/CT's CT: no label but PT and NM is judged by it
    ],
)
def test_nuclide_confirms(label, code, expected):
    assert nuclide_confirms(label, code) is expected


@pytest.mark.parametrize(
    ("header", "prediction", "witnesses", "verdict"),
    [
        # SPECT slices the network calls PET under an NM header naming Tc-99m: PT and NM together
        # reach NM's agree_at; on p(NM) alone they were refuted
        (
            Label.NM,
            prediction_of(PT=0.95, NM=0.005, MR=0.045),
            Witnesses(nuclide_confirms=True),
            Verdict.AGREE,
        ),
        (Label.NM, prediction_of(PT=0.95, NM=0.005, MR=0.045), NO_WITNESSES, Verdict.DISAGREE),
        (Label.PT, prediction_of(NM=0.5, PT=0.2, MR=0.3), Witnesses(nuclide_confirms=True), Verdict.AGREE),
        (Label.PT, prediction_of(NM=0.5, PT=0.2, MR=0.3), NO_WITNESSES, Verdict.UNCERTAIN),
        # not emission imaging: the pixels keep their verdict (a PET/CT's CT relabelled PT)
        (
            Label.PT,
            prediction_of(CT=0.99, PT=0.005, NM=0.005),
            Witnesses(nuclide_confirms=True),
            Verdict.DISAGREE,
        ),
        (
            Label.PT,
            prediction_of(MR=0.6, PT=0.2, NM=0.2),
            Witnesses(nuclide_confirms=True),
            Verdict.UNCERTAIN,
        ),
        # a SOP class that rules the Modality out outweighs the nuclide
        (
            Label.PT,
            prediction_of(NM=0.5, PT=0.2, CT=0.3),
            Witnesses(contradicted_by=frozenset({Label.CT}), nuclide_confirms=True),
            Verdict.UNCERTAIN,
        ),
    ],
)
def test_a_header_its_nuclide_confirms_agrees_where_pet_and_spect_together_do(
    header, prediction, witnesses, verdict
):
    assert compare(header, prediction, set(ALL_LABELS), THRESHOLDS, witnesses) is verdict
    # a model without the header test keeps its argmax rule whatever the nuclide
    assert compare(header, prediction, set(ALL_LABELS), None, witnesses) is compare(
        header, prediction, set(ALL_LABELS), None
    )


def test_the_model_s_emission_threshold_decides_the_confirmation_where_it_has_one():
    """``emission_agree_at`` (chosen on other labels' images, not on the other emission label's)
    replaces the header's own ``agree_at``, lower or higher; an older model keeps ``agree_at``."""
    limits = Thresholds(
        agree_at={"NM": 0.9, "PT": 0.9}, disagree_at={"NM": 0.01, "PT": 0.01}, emission_agree_at=0.6
    )
    spect = prediction_of(PT=0.35, NM=0.3, MR=0.35)  # 0.65 emission: above 0.6, below NM's 0.9
    faint = prediction_of(PT=0.3, NM=0.25, MR=0.45)  # 0.55: below it
    confirms = Witnesses(nuclide_confirms=True)
    labels = set(ALL_LABELS)
    assert compare(Label.NM, spect, labels, limits, confirms) is Verdict.AGREE
    assert compare(Label.NM, faint, labels, limits, confirms) is Verdict.UNCERTAIN
    assert (
        compare(Label.NM, spect, labels, replace(limits, emission_agree_at=None), confirms)
        is Verdict.UNCERTAIN
    )
    assert compare(Label.NM, spect, labels, limits, NO_WITNESSES) is Verdict.UNCERTAIN  # no nuclide
    # higher than agree_at: the header's own agree_at still confirms on p(header) alone
    strict = replace(limits, agree_at={"NM": 0.3, "PT": 0.3}, emission_agree_at=0.99)
    assert compare(Label.NM, spect, labels, strict, confirms) is Verdict.AGREE
    assert (
        compare(Label.PT, prediction_of(NM=0.6, PT=0.2, MR=0.2), labels, strict, confirms)
        is Verdict.UNCERTAIN
    )
    # never at or below the header's disagree_at: all of emission's probability would not save it
    bold = replace(limits, disagree_at={"NM": 0.01, "PT": 0.5}, emission_agree_at=0.1)
    assert compare(Label.PT, prediction_of(PT=0.3, MR=0.7), labels, bold, confirms) is Verdict.DISAGREE
    assert compare(Label.PT, prediction_of(PT=0.3, NM=0.25, MR=0.45), labels, bold, confirms) is Verdict.AGREE
    assert (
        compare(Label.NM, prediction_of(PT=0.05, NM=0.06, MR=0.89), labels, bold, confirms) is Verdict.AGREE
    )
    with pytest.raises(ValueError, match="emission_agree_at"):
        replace(limits, emission_agree_at=0.0)  # 0 would confirm whatever the pixels show


def test_a_real_pet_slice_naming_f18_is_confirmed_where_the_pixels_alone_were_unsure(tmp_path, corpus):
    """A soft-tissue sarcoma PET slice (the corpus's, F-18 in its header) that the bundled model
    gives PT 0.50 and NM 0.36: below PT's agree_at alone, above it together."""
    path = corpus / "PT" / "tcia_sts_ibsi" / "STS_003_000030.dcm"
    ds = pydicom.dcmread(path)
    assert ds.Modality == "PT" and "RadiopharmaceuticalInformationSequence" in ds
    del ds.RadiopharmaceuticalInformationSequence  # the same slice, naming no nuclide
    anonymous = tmp_path / "no-nuclide.dcm"
    ds.save_as(anonymous)
    result = CliRunner().invoke(main, ["classify", "--json", str(path), str(anonymous)])
    assert result.exit_code == 0, result.output
    named, unnamed = map(json.loads, result.stdout.splitlines())
    assert (named["radionuclide"], named["nuclide_confirms"], named["verdict"]) == ("C-111A1", True, "agree")
    assert (unnamed["radionuclide"], unnamed["nuclide_confirms"], unnamed["verdict"]) == (
        None,
        False,
        "uncertain",
    )
    assert named["label"] == unnamed["label"] == "PT" and named["confidence"] == unnamed["confidence"]


def _with_nuclide(ds: Dataset, code: tuple[str, str, str]) -> None:
    value, scheme, meaning = code
    item = Dataset()
    item.Radiopharmaceutical = "test"
    item.RadionuclideCodeSequence = Sequence(
        [Dataset(), Dataset()]  # the first code counts
    )
    first, second = item.RadionuclideCodeSequence
    first.CodeValue, first.CodingSchemeDesignator, first.CodeMeaning = value, scheme, meaning
    second.CodeValue, second.CodingSchemeDesignator, second.CodeMeaning = "C-163A8", "SRT", "Tc"
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_the_lean_reader_finds_the_nuclide_as_pydicom_does(tmp_path, syntax, undefined):
    implicit = syntax == ImplicitVRLittleEndian
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.Modality = "PT"
    ds.file_meta.TransferSyntaxUID = syntax
    _with_nuclide(ds, LU177)
    item = ds.RadiopharmaceuticalInformationSequence[0]
    for holder, tag in ((ds, 0x00540016), (item, 0x00540300)):
        holder[tag].is_undefined_length = undefined
        for inner in holder[tag].value:
            inner.is_undefined_length_sequence_item = undefined
    path = tmp_path / "pt.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    header = b"\x54\x00\x16\x00" + (b"" if implicit else b"SQ\0\0")
    assert (header + b"\xff\xff\xff\xff" in path.read_bytes()) is undefined  # the encoding asked for
    read = lean.read_header(str(path))
    assert read is not None and read.radionuclide == "447553000"
    assert read == header_from_dataset(read_dataset(path, specific_tags=HEADER_TAGS), str(path))
    assert lean.load_frames(str(path), lambda n: range(n)) is not None  # its pixels stay lean


def _spect_as_pet(corpus, archive, n: int = 8) -> list:
    """Slices of the corpus's real Lu-177 SPECT written as PET Image Storage, Modality PT, naming
    Lu-177: a SPECT exported as PET for dosimetry software."""
    import nibabel as nib

    volume = np.asarray(
        nib.load(corpus / "NM" / "tumorseg_lu177_spect" / "spect.nii.gz").dataobj, dtype=np.float32
    )
    series, study, paths = generate_uid(), generate_uid(), []
    archive.mkdir(parents=True, exist_ok=True)
    for k, z in enumerate(np.linspace(40, 190, n).astype(int)):
        ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
        frame = np.rot90(volume[:, :, z])
        slope = max(float(frame.max()), 1.0) / 32767
        ds.Rows, ds.Columns = frame.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.6g}", "0"
        ds.PixelData = np.clip(frame / slope, 0, 65535).astype("<u2").tobytes()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality, ds.Units = series, study, "PT", "BQML"
        for keyword in ("WindowCenter", "WindowWidth"):
            ds.pop(keyword, None)
        _with_nuclide(ds, LU177)
        paths.append(archive / f"lu177-{k}.dcm")
        ds.save_as(paths[-1])
    return paths


def test_a_spect_stored_as_pet_is_flagged_per_slice_and_per_series(db_url, tmp_path, corpus):
    paths = _spect_as_pet(corpus, tmp_path / "archive")
    summary = scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == len(paths), summary
    rows = query(
        db_url,
        "SELECT i.radionuclide, p.verdict FROM latest_predictions p JOIN instances i ON i.id = p.instance_id",
    )
    assert [tuple(r) for r in rows] == [("447553000", "disagree")] * len(paths)
    series = query(db_url, "SELECT header_label, verdict FROM series_summary")
    assert [tuple(r) for r in series] == [("PT", "disagree")]
    # `sorter adapt` judges its out-of-fold predictions with the same witnesses
    from sorter.adaptation.store import header_witnesses

    ids = [r.id for r in query(db_url, "SELECT id FROM instances")]
    engine = create_db_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            witnesses = header_witnesses(session, ids)
    finally:
        engine.dispose()
    assert witnesses == dict.fromkeys(ids, Witnesses(nuclide_allows=frozenset({Label.NM})))


def test_classify_names_the_nuclide_and_the_review_page_shows_it(tmp_path, corpus):
    spect = _spect_as_pet(corpus, tmp_path / "spect", n=2)
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.Modality, ds.SOPClassUID = "PT", PET_IMAGE_STORAGE
    _with_nuclide(ds, F18_RETIRED)
    consistent = tmp_path / "pt-f18.dcm"
    ds.save_as(consistent)
    result = CliRunner().invoke(main, ["classify", "--json", *map(str, spect), str(consistent)])
    assert result.exit_code == 0, result.output
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert {
        (r["radionuclide"], tuple(r["nuclide_allows"]), r["verdict"])
        for r in map(records.get, map(str, spect))
    } == {("447553000", ("NM",), "disagree")}
    assert (records[str(consistent)]["radionuclide"], records[str(consistent)]["nuclide_allows"]) == (
        "C-111A1",
        None,
    )
    assert describe_series(spect[0])["Radionuclide"] == "^177^Lutetium (imaged by NM)"
    assert describe_series(consistent)["Radionuclide"] == "^18^Fluorine (imaged by PT, as the Modality says)"


def test_the_review_page_names_the_nuclide_and_its_scanner_beside_the_header(sqlite_url, tmp_path, corpus):
    """What a reviewer reads on the series page of a flagged SPECT-as-PET series: the nuclide and
    which scanner images it, no patient data."""
    from starlette.testclient import TestClient

    from sorter.review.security import Access
    from sorter.review.web import create_app

    spect = _spect_as_pet(corpus, tmp_path / "archive", n=2)
    assert scan(sqlite_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)["classified"] == 2
    uid = pydicom.dcmread(spect[0], stop_before_pixels=True).SeriesInstanceUID
    engine = create_db_engine(sqlite_url)
    try:
        client = TestClient(create_app(make_session_factory(engine), Access(reviewer="ana")))
        page = client.get(f"/series/{uid}")
    finally:
        engine.dispose()
    assert page.status_code == 200
    assert "^177^Lutetium (imaged by NM)" in page.text
    assert "PatientName" not in page.text and str(spect[0]) not in page.text


def test_an_archive_scanned_before_gets_the_nuclide_by_rereading_headers(db_url, tmp_path, corpus):
    """Upgrading leaves the stored rows of unchanged files as they were (no radionuclide, the old
    verdicts); `reclassify --reread-headers` reads their headers again and classifies what changed."""
    paths = _spect_as_pet(corpus, tmp_path / "archive", n=3)
    scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    engine = create_db_engine(db_url)
    try:
        with engine.begin() as connection:  # as a release before migration 0011 left them
            connection.execute(sa.text("UPDATE instances SET radionuclide = NULL"))
            connection.execute(sa.text("UPDATE predictions SET verdict = 'agree'"))
    finally:
        engine.dispose()
    paths[2].unlink()  # a file gone since: left as it was, and said so
    model = ("--model", str(DEFAULT_MODEL_PATH), "--no-progress")

    unchanged = sorter("scan", *model, str(tmp_path / "archive"), url=db_url)
    assert "unchanged" in unchanged.output
    assert query(db_url, "SELECT count(*) AS n FROM instances WHERE radionuclide IS NOT NULL")[0].n == 0

    result = sorter("reclassify", *model, "--reread-headers", "--header", "pt", url=db_url)
    assert "headers read again: 3 (2 changed and classified again, 1 unreadable now" in result.stderr
    rows = query(
        db_url,
        "SELECT i.path, i.radionuclide, p.verdict FROM latest_predictions p"
        " JOIN instances i ON i.id = p.instance_id ORDER BY i.path",
    )
    assert [tuple(r) for r in rows] == [
        (str(paths[0]), "447553000", "disagree"),
        (str(paths[1]), "447553000", "disagree"),
        (str(paths[2]), None, "agree"),
    ]
    assert query(db_url, "SELECT count(*) AS n FROM predictions")[0].n == 3  # replaced, not added

    again = sorter("reclassify", *model, "--reread-headers", url=db_url)
    assert "headers read again: 3 (0 changed" in again.stderr
    assert "nothing classified again" in again.stderr


def test_an_empty_first_code_gives_the_next_one_on_both_readers(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    ds.Modality = "NM"
    _with_nuclide(ds, ("", "SCT", "unknown"))  # the second code is Tc-99m's
    path = tmp_path / "nm.dcm"
    ds.save_as(path)
    read = lean.read_header(str(path))
    assert read is not None and read.radionuclide == "C-163A8"
    assert read == header_from_dataset(read_dataset(path, specific_tags=HEADER_TAGS), str(path))
