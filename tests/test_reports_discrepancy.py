"""Find mislabelled series with the bundled model: real CT and MR slices, some with altered headers.

Copies of real files get new UIDs; on two series the header Modality is
deliberately wrong (CT slices labelled MR, MR slices labelled CT). The views
must flag exactly those series and their studies, and leave the honest ones
alone. This test fails if the model cannot tell CT from MR, or if the views
aggregate wrongly: it needs the trained model, not the untrained tiny one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from db_support import copy_dicom, pydicom_file, query, scan, sorter, truncate
from review_support import make_archive

from sorter.cli import main
from sorter.model.artefact import DEFAULT_MODEL_PATH

pytest_plugins = ["db_fixtures"]

#: The trained model under test (the bundled default; a candidate can be checked the same way).
MODEL = Path(os.environ.get("SORTER_TEST_REAL_MODEL", DEFAULT_MODEL_PATH))
PER_SERIES = 6
#: name -> (corpus folder, header Modality written on the copies, study)
SERIES = {
    "ct_labelled_mr": ("CT/tcia_lidc_idri_0314", "MR", "study_x"),
    "ct_honest": ("CT/tcia_nsclc_lung1_001", "CT", "study_y"),
    "mr_honest": ("MR/dwv_bbmri_memprage", "MR", "study_x"),
    "mr_labelled_ct": ("MR/fnndsc_adi_brain", "CT", "study_z"),
}
ALTERED = {"ct_labelled_mr", "mr_labelled_ct"}

pytestmark = [
    pytest.mark.corpus,
    pytest.mark.skipif(
        not MODEL.exists(), reason=f"no trained model at {MODEL} (bundled default not built yet)"
    ),
]


@pytest.fixture()
def altered_archive(corpus: Path, tmp_path: Path) -> dict[str, str]:
    """Copy each series under new UIDs; return series (and study) name -> UID."""
    return make_archive(corpus, tmp_path / "archive", SERIES, PER_SERIES)


def test_altered_series_and_their_studies_are_flagged_and_honest_ones_are_not(
    db_url, altered_archive, tmp_path
):
    uids = altered_archive
    summary = scan(db_url, MODEL, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == PER_SERIES * len(SERIES)

    flagged = {
        r.series_instance_uid: (r.header_label, r.label)
        for r in query(db_url, "SELECT * FROM series_discrepancies")
    }
    assert flagged == {uids["ct_labelled_mr"]: ("MR", "CT"), uids["mr_labelled_ct"]: ("CT", "MR")}

    per_series = dict(
        query(db_url, "SELECT series_instance_uid, count(*) FROM discrepancies GROUP BY series_instance_uid")
    )
    for name in SERIES:
        if name in ALTERED:  # most slices are confident on their own, too
            assert per_series.get(uids[name], 0) > PER_SERIES // 2, name
        else:
            assert uids[name] not in per_series, name

    studies = dict(query(db_url, "SELECT study_instance_uid, verdict FROM study_summary"))
    assert studies == {uids["study_x"]: "disagree", uids["study_y"]: "agree", uids["study_z"]: "disagree"}
    listed = sorter("discrepancies", "--level", "study", "--format", "csv", url=db_url).output
    assert uids["study_x"] in listed and uids["study_z"] in listed and uids["study_y"] not in listed


def readme_sql() -> list[str]:
    """The SQL blocks of README.md's "Ready SQL (PostgreSQL)" section, in order."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Ready SQL (PostgreSQL)", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0].strip() for block in section.split("```sql\n")[1:]]


def test_the_readme_recipes_run_and_find_what_they_promise(postgres_database, altered_archive, tmp_path):
    """Every recipe runs on PostgreSQL after a real scan; the mislabelling recipes find the altered
    series with the thresholds and verdicts this model actually reaches."""
    url, uids = postgres_database, altered_archive
    truncate(url)
    scan(url, MODEL, tmp_path / "archive", tmp=tmp_path)
    blocks = readme_sql()
    assert len(blocks) >= 8, "the README's recipes moved"
    results = {sql: query(url, sql) for sql in blocks}  # each one runs
    [mr_as_ct] = [sql for sql in blocks if "header_label = 'MR' AND label = 'CT'" in sql]
    assert {r.series_instance_uid for r in results[mr_as_ct]} == {uids["ct_labelled_mr"]}
    [studies] = [sql for sql in blocks if "FROM study_summary" in sql]
    assert {r.study_instance_uid for r in results[studies]} == {uids["study_x"], uids["study_z"]}


def test_a_ct_slice_relabelled_mr_is_refuted_and_the_honest_one_confirmed(tmp_path):
    """The issue's example: pydicom's CT_small.dcm with MR written in was `uncertain` at 0.66."""

    honest = copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "ct.dcm")
    relabelled = copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "ct-as-mr.dcm", modality="MR")
    result = CliRunner().invoke(
        main, ["classify", "--json", "--model", str(MODEL), str(honest), str(relabelled)]
    )
    assert result.exit_code == 0, result.output
    verdicts = {Path(r["path"]).name: r["verdict"] for r in map(json.loads, result.output.splitlines())}
    assert verdicts == {"ct.dcm": "agree", "ct-as-mr.dcm": "disagree"}
