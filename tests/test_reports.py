"""``sorter report``, ``discrepancies``, ``find``, ``export`` and ``reclassify`` on both databases."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from db_support import (
    copy_dicom,
    every_verdict_results,
    pydicom_file,
    query,
    result_header,
    scan,
    small_archive,
    sorter,
    synthetic_results,
    top2_prediction,
    write_results,
)
from pydicom.uid import generate_uid

from train.manifest import read_manifest

pytest_plugins = ["db_fixtures"]


def test_report_counts_labels_rates_and_failures(db_url):
    synthetic_results(db_url)
    data = json.loads(sorter("report", "--format", "json", url=db_url).output)

    labels = {(r["header_label"], r["label"]): r["n"] for r in data["labels"]}
    assert labels[("MR", "CT")] == 3 and labels[("CT", "CT")] == 9
    # labels and verdicts come from one scan: each as the database counts and orders it alone
    pairs = "SELECT header_label, label, count(*) AS n FROM latest_predictions GROUP BY 1, 2 ORDER BY 1, 2"
    assert data["labels"] == [dict(r._mapping) for r in query(db_url, pairs)]
    counts = "SELECT verdict, count(*) AS n FROM latest_predictions GROUP BY 1 ORDER BY 1"
    assert data["verdicts"] == [dict(r._mapping) for r in query(db_url, counts)]
    assert len(data["verdicts"]) > 1 and len(data["labels"]) > 2
    by_source = {r["source"]: r for r in data["by_source"]}
    assert (by_source["siteA"]["classified"], by_source["siteA"]["disagree"]) == (6, 3)
    assert by_source["siteA"]["rate"] == 0.5 and by_source["siteB"]["disagree"] == 0
    by_station = {r["station_name"]: r["disagree"] for r in data["by_station"]}
    assert by_station["MR1"] == 3
    # The three breakdowns come from one scan: each as the database counts it alone, most
    # disagreeing first, ties by value with the empty value last.
    for column, section in (
        ("source", "by_source"),
        ("station_name", "by_station"),
        ("calling_ae", "by_calling_ae"),
    ):
        alone = (
            f"SELECT {column} AS key, count(*), sum(CASE WHEN verdict = 'disagree' THEN 1 ELSE 0 END),"
            f" sum(CASE WHEN verdict = 'uncertain' THEN 1 ELSE 0 END) FROM latest_predictions GROUP BY 1"
        )
        rows = data[section]
        assert {r[column]: (r["classified"], r["disagree"], r["uncertain"]) for r in rows} == {
            key: (n, d, u) for key, n, d, u in query(db_url, alone)
        }
        assert rows == sorted(rows, key=lambda r: (-r["disagree"], r[column] is None, r[column] or ""))
    assert len(data["by_station"]) > 1 and len({r["disagree"] for r in data["by_source"]}) > 1
    assert {r["verdict"]: r["n"] for r in data["series"]}["disagree"] == 1
    assert {r["verdict"]: r["n"] for r in data["studies"]} == {"disagree": 1, "uncertain": 1}

    table = sorter("report", url=db_url).output
    assert "== by source" in table and "siteA" in table
    rows = list(csv.DictReader(io.StringIO(sorter("report", "--format", "csv", url=db_url).output)))
    assert {r["section"] for r in rows} >= {"labels", "by_source", "series"}


def test_report_counts_series_and_studies_as_the_views_do(db_url):
    """The series and study verdict counts come from one scan of the series (the study verdicts
    by study_summary's rule): each as the view counts it, for every study verdict, with a series
    without a study and an instance without a series."""
    every_verdict_results(db_url)
    data = json.loads(sorter("report", "--format", "json", url=db_url).output)
    for section, view in (("series", "series_summary"), ("studies", "study_summary")):
        counts = f"SELECT verdict, count(*) AS n FROM {view} GROUP BY 1 ORDER BY 1"
        assert data[section] == [dict(r._mapping) for r in query(db_url, counts)], section
    assert {r["verdict"] for r in data["studies"]} == {
        "agree",
        "disagree",
        "uncertain",
        "no_header",
        "unsupported",
    }


def test_discrepancies_at_every_level(db_url):
    uids = synthetic_results(db_url)
    instance = json.loads(sorter("discrepancies", "--format", "json", url=db_url).output)
    assert len(instance) == 3 and {r["series_instance_uid"] for r in instance} == {uids["mr_as_ct"]}
    series = json.loads(sorter("discrepancies", "--level", "series", "--format", "json", url=db_url).output)
    assert [(r["series_instance_uid"], r["header_label"], r["label"]) for r in series] == [
        (uids["mr_as_ct"], "MR", "CT")
    ]
    study = json.loads(sorter("discrepancies", "--level", "study", "--format", "json", url=db_url).output)
    assert [r["study_instance_uid"] for r in study] == [uids["study_bad"]]
    strict = sorter(
        "discrepancies", "--level", "series", "--min-confidence", "0.99", "--format", "csv", url=db_url
    )
    assert strict.output.strip().count("\n") == 0  # header only: 0.96 < 0.99
    assert uids["mr_as_ct"] in sorter("discrepancies", "--level", "series", url=db_url).output


def test_find_by_what_the_pixels_show(db_url):
    uids = synthetic_results(db_url)
    rows = list(
        csv.DictReader(
            io.StringIO(
                sorter("find", "--label", "CT", "--header", "MR", "--format", "csv", url=db_url).output
            )
        )
    )
    assert len(rows) == 3 and {r["series_instance_uid"] for r in rows} == {uids["mr_as_ct"]}
    everything_ct = json.loads(sorter("find", "--label", "ct", "--format", "json", url=db_url).output)
    assert len(everything_ct) == 18  # every synthetic series looks most like CT
    confident = json.loads(
        sorter("find", "--label", "CT", "--min-confidence", "0.95", "--format", "json", url=db_url).output
    )
    assert len(confident) == 9
    site_b = json.loads(
        sorter("find", "--label", "CT", "--source", "siteB", "--format", "json", url=db_url).output
    )
    assert {r["source"] for r in site_b} == {"siteB"}


def test_find_refuses_a_source_no_instance_has_and_a_limit_below_one(db_url):
    """A mistyped ``--source`` listed an empty table, as if no image of that source showed the
    label; ``--limit 0`` and ``--limit -1`` listed every row on SQLite (PostgreSQL refuses a
    negative LIMIT)."""
    synthetic_results(db_url)
    typo = sorter("find", "--label", "CT", "--source", "siteB", "--source", "siteZ", url=db_url, expect=2)
    assert "no instance has source 'siteZ' (`sorter report` lists the sources)" in typo.output
    for command in (["find", "--label", "CT"], ["discrepancies"], ["failures"]):
        for limit in ("0", "-1"):
            refused = sorter(*command, "--limit", limit, url=db_url, expect=2)
            assert f"{limit} is not in the range x>=1" in refused.output
    one = json.loads(sorter("find", "--label", "CT", "--limit", "1", "--format", "json", url=db_url).output)
    assert len(one) == 1


def test_export_writes_a_balanced_manifest_that_sorter_train_reads(db_url, tiny_model, tmp_path):
    archive = tmp_path / "archive"
    for site in ("siteA", "siteB"):
        for name, count in (("CT_small.dcm", 5), ("MR_small.dcm", 3)):
            series = generate_uid()
            for i in range(count):
                copy_dicom(pydicom_file(name), archive / site / f"{name[:2]}{i}.dcm", series=series)
    scan(db_url, tiny_model, archive, tmp=tmp_path)
    out = tmp_path / "export" / "manifest.csv"

    sorter(
        "export",
        "--balanced",
        "--per-label",
        "4",
        "--by-source",
        "--label-from",
        "header",
        "--out",
        str(out),
        url=db_url,
    )
    rows = read_manifest(out)

    by_label = Counter(row.label.value for row in rows)
    assert by_label == {"CT": 4, "MR": 4}
    assert Counter((row.label.value, row.source) for row in rows) == {
        ("CT", "siteA"): 2,
        ("CT", "siteB"): 2,
        ("MR", "siteA"): 2,
        ("MR", "siteB"): 2,
    }
    assert all(row.path.is_file() and row.format == "dcm" for row in rows)
    assert all(row.extra["header_modality"] == row.label.value for row in rows)
    assert len({row.group for row in rows}) > 1

    everything = tmp_path / "all.csv"
    sorter("export", "--label-from", "header", "--out", str(everything), url=db_url)
    assert len(read_manifest(everything)) == 16
    agree = tmp_path / "agree.csv"
    sorter("export", "--out", str(agree), url=db_url)  # the default: only where header and pixels agree
    verdicts = {r.verdict for r in query(db_url, "SELECT verdict FROM latest_predictions")}
    assert (len(read_manifest(agree)) > 0) == ("agree" in verdicts)


def test_reclassify_keeps_predictions_per_model_and_views_stay_on_the_active_model(
    db_url, tiny_model, tiny_model_b, tmp_path
):
    small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    summary = tmp_path / "reclassify.json"
    args = ("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress")

    result = sorter(*args, "--json-summary", str(summary), url=db_url)

    assert json.loads(summary.read_text())["classified"] == 7
    assert "the views still show the active model tiny.pt" in result.output
    assert query(db_url, "SELECT count(*) FROM predictions")[0][0] == 14
    latest = query(db_url, "SELECT m.path FROM latest_predictions lp JOIN models m ON m.id = lp.model_id")
    assert {Path(r.path).name for r in latest} == {tiny_model.name}  # no switch behind the user's back
    sorter(*args, "--json-summary", str(summary), url=db_url)
    assert json.loads(summary.read_text())["classified"] == 0  # nothing left for this model


def test_a_station_that_mislabels_systematically_is_reported(db_url):
    """Station MR1 writes CT images as MR: all 3 of its MR-headed instances disagree (issue 18's
    station-level discrepancy); the honest sources stay out."""
    from sorter import reports
    from sorter.db.session import open_database

    synthetic_results(db_url)
    engine, sessions = open_database(db_url)
    try:
        with sessions() as session:
            rows = reports.source_contradictions(session, min_instances=3)
            assert reports.source_contradictions(session) == []  # under the default 10 instances
    finally:
        engine.dispose()
    found = {
        (r["by"], r["name"], r["header_label"], r["pixels"], r["classified"], r["disagree"]) for r in rows
    }
    assert ("station_name", "MR1", "MR", "CT", 3, 3) in found
    assert all(r["rate"] >= 0.5 for r in rows) and all(r["name"] not in ("siteB", "CT1") for r in rows)
    data = json.loads(sorter("report", "--format", "json", url=db_url).output)
    assert data["source_contradictions"] == []


def _station_results(url: str) -> None:
    """NM, PT and CT stations of 12 instances each, written through the real write path by a
    model with a header test (NM: agree_at 0.43, disagree_at 0.008; CT: 0.24, 0.235; PT: 0.58,
    0.015), each instance's verdict the header test's own."""
    from sorter.compare import compare
    from sorter.domain import Label, Thresholds, Witnesses

    labels = (Label.CT, Label.PT, Label.NM)
    bounds = {"NM": (0.43, 0.008), "CT": (0.24, 0.235), "PT": (0.58, 0.015)}
    thresholds = Thresholds(
        agree_at={k: v[0] for k, v in bounds.items()}, disagree_at={k: v[1] for k, v in bounds.items()}
    )
    # station: (modality, p(header label) of each of the 12 instances, the label given the rest)
    plan = {
        # never refuted one by one (0.03 > 0.008), but the images all look like CT: a mean of
        # 0.03 lies under NM's bound (0.04 to 0.13 along the way to agree_at); the rule before
        # 2026-12-07, 1.5 x disagree_at = 0.012, missed it
        "CT_AS_NM": ("NM", [0.03] * 12, Label.CT),
        "NM_HONEST": ("NM", [0.2] * 12, Label.CT),  # the model doubts NM headers: uncertain, not implausible
        # SPECT read as PET: the pixels cannot tell the two apart, so without a witness an NM
        # header on images that look like PT accuses nobody (PT + NM is the evidence)
        "NM_LOOKS_PT": ("NM", [0.011] * 12, Label.PT),
        "CT_SOMETIMES_PT": ("CT", [0.9] * 8 + [0.01] * 4, Label.PT),  # 4 of 12 refuted: 33 %
        "CT_HONEST": ("CT", [0.9] * 10 + [0.01] * 2, Label.PT),  # 2 of 12: not enough to accuse a station
        # SPECT whose NM headers name Tc-99m: every slice agrees (PT + NM reach NM's agree_at), so
        # the mean p(NM), as low as the first station's, accuses nobody.
        "SPECT_NAMING_TC99M": ("NM", [0.011] * 12, Label.PT),
        # PET written as NM naming F-18, which only a PET scanner images: every slice refuted
        "PET_AS_NM_NAMING_F18": ("NM", [0.011] * 12, Label.PT),
    }
    rows = []
    for station, (modality, p_header, rest) in plan.items():
        series = generate_uid()
        for i, p in enumerate(p_header):
            path = f"/archive/{station}/{i}.dcm"
            header = result_header(
                path, series, series, modality, station, sop_class="1.2.840.10008.5.1.4.1.1.20"
            )
            probs = {label: 0.0 for label in labels}
            probs[Label(modality)] = p
            probs[rest] += 1 - p
            witnesses = Witnesses(
                nuclide_confirms=station == "SPECT_NAMING_TC99M",
                nuclide_allows=frozenset({Label.PT}) if station == "PET_AS_NM_NAMING_F18" else None,
            )
            verdict = compare(Label(modality), top2_prediction(probs), labels, thresholds, witnesses)
            rows.append((header, station, Label(modality), probs, verdict))
    model = {
        "sha256": "e" * 64,
        "arch": "test",
        "labels": "CT,PT,NM",
        "min_confidence": 0.8,
        "min_margin": 0.2,
    }
    write_results(url, model, rows, bounds)


def test_a_station_is_reported_when_its_images_all_doubt_the_header_or_a_third_are_refuted(db_url):
    """Issue 18, item 2: a station whose NM headers no single image refutes (the model's NM
    ``disagree_at`` is low) but whose images all find NM implausible, and one with a third of
    its CT headers refuted, are station-level discrepancies; honest stations are not, nor is an
    NM station whose images the pixels read as PT without a witness to say which. Before
    2026-12-05 only a disagree rate of one half counted; before 2026-12-07 the mean had to fall
    under 1.5 x ``disagree_at``, which missed the first station."""
    from sorter import reports
    from sorter.db.session import open_database

    _station_results(db_url)
    engine, sessions = open_database(db_url)
    try:
        with sessions() as session:
            rows = [r for r in reports.source_contradictions(session) if r["by"] == "station_name"]
    finally:
        engine.dispose()
    found = {r["name"]: r for r in rows}
    assert set(found) == {"CT_AS_NM", "CT_SOMETIMES_PT", "PET_AS_NM_NAMING_F18"}, rows
    nm = found["CT_AS_NM"]
    assert (nm["header_label"], nm["pixels"], nm["disagree"], nm["mean_p_header"]) == ("NM", "CT", 0, 0.03)
    # the report shows what the mean rule compared (PT + NM: no PT here) and its bound
    assert (nm["mean_evidence"], nm["bound"]) == (0.03, round(reports.mean_bound(0.008, 0.43), 4))
    f18 = found["PET_AS_NM_NAMING_F18"]  # listed by its refuted slices; its evidence is PT + NM
    assert (f18["mean_p_header"], f18["mean_evidence"]) == (0.011, 1.0)
    assert f18["mean_evidence"] > f18["bound"]
    assert found["CT_SOMETIMES_PT"]["rate"] == 0.3333 and found["CT_SOMETIMES_PT"]["pixels"] == "PT"
    assert found["PET_AS_NM_NAMING_F18"]["rate"] == 1.0
    # the mean rule's bound: the geometric way from disagree_at to agree_at
    bound = reports.mean_bound(0.008, 0.43)
    assert 0.008 < bound < 0.43
    assert reports.mean_bound(0.008, 0.43, towards=0.0) == pytest.approx(0.008)
    assert reports.mean_bound(0.008, 0.43, towards=1.0) == pytest.approx(0.43)
    assert reports.mean_bound(0.05, None) == 0.05 and reports.mean_bound(0.07, 0.07) == 0.07
    assert reports.contradicts(12, 0, bound * 0.99, 0.008, mean_agree_at=0.43)
    assert not reports.contradicts(12, 0, bound * 1.01, 0.008, mean_agree_at=0.43)
    assert reports.contradicts(12, 0, 0.0079, 0.008)  # no agree_at: disagree_at itself
    assert not reports.contradicts(12, 0, 0.0081, 0.008)
    assert not reports.contradicts(9, 9, 0.0, 0.008)  # too few instances to speak for a station
    assert reports.contradicts(12, 0, 0.0079, 0.008, n_agree=6)
    assert not reports.contradicts(12, 0, 0.0079, 0.008, n_agree=7)  # most confirmed: the mean is silent
    assert reports.contradicts(12, 4, 0.5, 0.008, n_agree=8)  # a third refuted speaks regardless


def test_a_ct_scanner_writing_mr_is_listed_though_no_image_of_it_is_refuted(db_url, tmp_path, corpus):
    """Real CT slices from one station written as MR, in MR Image Storage objects (so the class
    agrees with the header): the bundled model's MR ``disagree_at`` is so low (held to its budget
    on unseen sources) that no slice is refuted one by one, yet every slice finds MR implausible.
    The mean rule lists the station; its bound before 2026-12-07 (1.5 x ``disagree_at``) did not.
    The series is a discrepancy by the same rule (before migration 0013 it was ``uncertain``)."""
    from pydicom.uid import MRImageStorage

    from sorter.model.artefact import DEFAULT_MODEL_PATH

    series, study, folder = generate_uid(), generate_uid(), tmp_path / "archive" / "ct7"
    for n, source in enumerate(sorted((corpus / "CT" / "tcia_lidc_idri_0314").glob("*"))):
        copy_dicom(
            source,
            folder / f"{n}.dcm",
            series=series,
            study=study,
            modality="MR",
            station="CTSCANNER7",
            sop_class=MRImageStorage,
        )
    summary = scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == 12, summary
    rows = json.loads(sorter("report", "--format", "json", url=db_url).stdout)["source_contradictions"]
    station = [r for r in rows if r["by"] == "station_name"]
    assert [(r["name"], r["header_label"], r["pixels"], r["classified"]) for r in station] == [
        ("CTSCANNER7", "MR", "CT", 12)
    ]
    row = station[0]
    assert row["rate"] < 0.3  # listed by the mean rule, not by refuted images
    disagree_at = query(db_url, "SELECT MAX(disagree_at) AS d FROM latest_predictions")[0].d
    assert row["mean_p_header"] > 1.5 * disagree_at  # what the rule before required
    assert row["mean_evidence"] == row["mean_p_header"] < row["bound"]  # MR is its own evidence
    # ... and its series is a discrepancy by the same mean (migration 0013), though no slice is
    listed = sorter("discrepancies", "--level", "series", "--format", "json", url=db_url).stdout
    assert [(r["series_instance_uid"], r["verdict"], r["n_disagree"]) for r in json.loads(listed)] == [
        (series, "disagree", 0)
    ]
    assert json.loads(sorter("discrepancies", "--format", "json", url=db_url).stdout) == []


def test_under_takes_a_file_or_a_folder_that_is_gone(sqlite_url, tiny_model, tiny_model_b, tmp_path):
    """`failures --under x.dcm` listed nothing (taken as the folder x.dcm/), and `--under` a share
    that is no longer mounted must still find what was stored under it."""
    files = small_archive(tmp_path / "archive")
    (tmp_path / "archive" / "siteA" / "notes.txt.bak").write_text("not DICOM either")
    scan(sqlite_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    notes = tmp_path / "archive" / "siteA" / "notes.txt"

    def failed_under(*under: Path) -> list[str]:
        args = [a for u in under for a in ("--under", str(u))]
        listed = sorter("failures", *args, "--format", "json", url=sqlite_url).output
        return sorted(Path(r["path"]).name for r in json.loads(listed))

    assert failed_under(notes) == ["notes.txt"]
    assert failed_under(tmp_path / "archive" / "siteA") == ["notes.txt", "notes.txt.bak"]
    summary = tmp_path / "r.json"
    args = ("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress")
    sorter(*args, "--under", str(files["ct0"]), "--json-summary", str(summary), url=sqlite_url)
    assert json.loads(summary.read_text())["classified"] == 1

    shutil.move(tmp_path / "archive", tmp_path / "unmounted")  # the share is gone
    assert failed_under(tmp_path / "archive" / "siteA") == ["notes.txt", "notes.txt.bak"]
    assert failed_under(notes) == ["notes.txt"]
