"""``sorter models``: the active model decides what every view and query shows; ``use`` switches
and rolls back without inference; ``--model`` asks about another one; ``reclassify`` takes filters
(issue 13, model selection). On SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from db_support import copy_dicom, pydicom_file, query, scan, small_archive, sorter

pytest_plugins = ["db_fixtures"]


def _shown(url: str) -> set[str]:
    rows = query(url, "SELECT DISTINCT m.path FROM latest_predictions lp JOIN models m ON m.id = lp.model_id")
    return {Path(r.path).name for r in rows}


def _models(url: str) -> dict[str, dict[str, str]]:
    rows = csv.DictReader(io.StringIO(sorter("models", "list", "--format", "csv", url=url).output))
    return {row["name"]: row for row in rows}


def _sha(url: str, model: Path) -> str:
    return str(query(url, "SELECT sha256 FROM models WHERE path = :p", p=str(model))[0][0])


@pytest.fixture()
def two_models(db_url, tiny_model, tiny_model_b, tmp_path) -> str:
    """The small archive scanned with model A, then reclassified with model B."""
    small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    sorter("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress", url=db_url)
    return db_url


def test_the_first_model_is_active_and_use_switches_and_rolls_back(two_models, tiny_model, tiny_model_b):
    url = two_models
    listed = _models(url)
    assert listed[tiny_model.name]["active"] == "*" and listed[tiny_model_b.name]["active"] == ""
    assert listed[tiny_model.name]["predictions"] == "7" == listed[tiny_model_b.name]["predictions"]
    assert (listed[tiny_model.name]["shown"], listed[tiny_model_b.name]["shown"]) == ("7", "0")
    assert _shown(url) == {tiny_model.name}

    switched = sorter("models", "use", _sha(url, tiny_model_b)[:10], url=url)
    assert "7 instances show its predictions" in switched.output
    assert _shown(url) == {tiny_model_b.name}
    assert _models(url)[tiny_model_b.name]["active"] == "*"

    sorter("models", "use", tiny_model.name, url=url)  # rollback, by name
    assert _shown(url) == {tiny_model.name}
    # Within the second of the switch: the model stamped last is active, whatever its id.
    assert _models(url)[tiny_model.name]["active"] == "*" and _models(url)[tiny_model_b.name]["active"] == ""
    table = sorter("models", url=url).output  # the group alone lists
    assert tiny_model.name in table and tiny_model_b.name in table


def test_query_commands_answer_for_another_model_without_switching(two_models, tiny_model_b):
    url = two_models
    sha_b = _sha(url, tiny_model_b)[:12]
    asked = {
        args: sorter(*args, "--model", sha_b, "--format", "json", url=url).output
        for args in (("find", "--label", "CT"), ("discrepancies", "--level", "series"), ("report",))
    }
    assert _shown(url) == {Path(_models(url)["tiny.pt"]["path"]).name}  # nothing committed
    sorter("models", "use", sha_b, url=url)
    for args, output in asked.items():
        assert json.loads(output) == json.loads(sorter(*args, "--format", "json", url=url).output), args


def test_an_unknown_model_is_one_line(two_models):
    result = sorter("find", "--label", "CT", "--model", "nope", url=two_models, expect=1)
    assert "no model 'nope' in this database; known: tiny.pt" in result.output
    assert "Traceback" not in result.output
    prefix = _models(two_models)["tiny.pt"]["sha256"][:4]
    short = sorter("models", "use", prefix, url=two_models, expect=1)
    assert (
        f"no model '{prefix}' in this database: a sha256 prefix needs at least 6 characters" in short.output
    )


def test_reclassify_keeps_instances_whose_file_is_gone(db_url, tiny_model, tiny_model_b, tmp_path):
    """A file deleted after it was classified (`watch --after delete`, spool retention): reclassify
    turned its instance from done into failed (unreadable); now it keeps its status and its
    earlier prediction, and the summary says so. Export listed the missing file."""
    files = small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    files["ct0"].unlink()
    summary = tmp_path / "r.json"
    args = ("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress")
    result = sorter(*args, "--json-summary", str(summary), url=db_url)
    data = json.loads(summary.read_text())
    assert data["classified"] == 6 and data["not_read_again"] == {"unreadable": 1} and data["failed"] == {}
    assert "not read again: unreadable 1 (classified before;" in result.output
    done = query(db_url, "SELECT count(*) FROM instances WHERE status = 'done'")
    assert done == [(7,)]
    assert query(db_url, "SELECT count(*) FROM latest_predictions") == [(7,)]  # the first model's, shown
    out = tmp_path / "m.csv"  # export leaves the file out: training could not read it
    exported = sorter("export", "--label-from", "header", "--out", str(out), url=db_url)
    assert "left out 1 instances whose file is gone" in exported.output
    assert len(list(csv.DictReader(out.open()))) == 6


def test_an_instance_whose_file_another_overwrote_leaves_the_views(
    db_url, tiny_model, tiny_model_b, tmp_path
):
    """A drop folder that reuses a file name: the CT instance kept its path, now holding an MR,
    so reclassify judged the MR's pixels as the CT's ("header CT, pixels MR": a false
    discrepancy) and export listed the MR file under the CT label."""
    archive = tmp_path / "archive"
    ct = copy_dicom(pydicom_file("CT_small.dcm"), archive / "IMG0001.dcm")
    scan(db_url, tiny_model, archive, tmp=tmp_path)
    ct.unlink()
    copy_dicom(pydicom_file("MR_small.dcm"), archive / "IMG0001.dcm")  # the next export, same name
    assert scan(db_url, tiny_model, archive, tmp=tmp_path)["failed"] == {"vanished": 1}  # said so

    rows = query(
        db_url, "SELECT header_modality, status, error, detail, prediction_id FROM instances ORDER BY id"
    )
    assert tuple(rows[0]) == (
        "CT",
        "failed",
        "vanished",
        "its file was overwritten by another instance",
        None,
    )
    assert [r.status for r in rows] == ["failed", "done"]
    summary = tmp_path / "r.json"
    args = ("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress", "--json-summary")
    sorter(*args, str(summary), url=db_url)
    assert json.loads(summary.read_text())["classified"] == 1  # the MR only
    sorter("models", "use", "tiny-b.pt", url=db_url)
    assert [r.header_modality for r in query(db_url, "SELECT header_modality FROM latest_predictions")] == [
        "MR"
    ]
    out = tmp_path / "m.csv"
    sorter("export", "--label-from", "header", "--out", str(out), url=db_url)
    assert [row["header_modality"] for row in csv.DictReader(out.open())] == ["MR"]


def test_reclassify_never_judges_another_instance_at_the_path(db_url, tiny_model, tiny_model_b, tmp_path):
    """The name reused before any scan saw it: reclassify read the MR now at the CT's path and
    stored its prediction as the CT's."""
    archive = tmp_path / "archive"
    ct = copy_dicom(pydicom_file("CT_small.dcm"), archive / "IMG0001.dcm")
    scan(db_url, tiny_model, archive, tmp=tmp_path)
    ct.unlink()
    copy_dicom(pydicom_file("MR_small.dcm"), archive / "IMG0001.dcm")
    summary = tmp_path / "r.json"
    args = ("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress", "--json-summary")
    sorter(*args, str(summary), url=db_url)
    data = json.loads(summary.read_text())
    assert data["classified"] == 0 and data["not_read_again"] == {"vanished": 1}
    assert query(db_url, "SELECT count(*) FROM predictions") == [(1,)]  # the first model's only


@pytest.mark.parametrize("moved_to", ["later/IMG0001.dcm", "A-moved.dcm"])
def test_an_instance_moved_before_its_name_was_reused_follows_its_file(
    db_url, tiny_model, tmp_path, moved_to
):
    """The CT moved away, then an MR took its old name: the CT lives at its new path (walked after
    the old one, or before it and first counted as a duplicate), not `vanished`."""
    archive = tmp_path / "archive"
    ct = copy_dicom(pydicom_file("CT_small.dcm"), archive / "IMG0001.dcm")
    scan(db_url, tiny_model, archive, tmp=tmp_path)
    (archive / moved_to).parent.mkdir(exist_ok=True)
    ct.rename(archive / moved_to)
    copy_dicom(pydicom_file("MR_small.dcm"), archive / "IMG0001.dcm")
    scan(db_url, tiny_model, archive, tmp=tmp_path)

    rows = query(db_url, "SELECT header_modality, status, path FROM instances ORDER BY id")
    assert [(r.header_modality, r.status, Path(r.path)) for r in rows] == [
        ("CT", "done", archive / moved_to),
        ("MR", "done", archive / "IMG0001.dcm"),
    ]
    assert len(query(db_url, "SELECT instance_id FROM latest_predictions")) == 2


def test_reclassify_takes_filters(db_url, tiny_model, tiny_model_b, tmp_path):
    small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    summary = tmp_path / "r.json"
    args = ("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress")
    sorter(*args, "--source", "siteA", "--json-summary", str(summary), url=db_url)
    assert json.loads(summary.read_text())["classified"] == 3  # siteA's three CT slices
    sorter(
        *args,
        "--header",
        "MR",
        "--under",
        str(tmp_path / "archive" / "siteB"),
        "--json-summary",
        str(summary),
        url=db_url,
    )
    assert json.loads(summary.read_text())["classified"] == 3
    b = query(
        db_url,
        "SELECT i.source, i.header_label FROM predictions p JOIN instances i ON i.id = p.instance_id "
        "JOIN models m ON m.id = p.model_id WHERE m.path = :p",
        p=str(tiny_model_b),
    )
    assert sorted((r.source, r.header_label) for r in b) == [("siteA", "CT")] * 3 + [("siteB", "MR")] * 3
    nothing = sorter(*args, "--source", "siteZ", url=db_url)  # a typo: it said only "0 files"
    assert "nothing classified again: no classified instance matches the filters" in nothing.stderr
    assert (
        "nothing classified again" not in sorter(*args, "--source", "siteB", url=db_url).stderr
    )  # its colour image


def test_a_scan_with_another_model_on_an_unchanged_archive_classifies_what_it_has_not_seen(
    db_url, tiny_model, tiny_model_b, tmp_path
):
    small_archive(tmp_path / "archive")
    scan(db_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    again = scan(db_url, tiny_model_b, tmp_path / "archive", tmp=tmp_path)
    assert again["registered"] == 0 and again["classified"] == 7, again
    assert scan(db_url, tiny_model_b, tmp_path / "archive", tmp=tmp_path)["classified"] == 0
    assert _shown(db_url) == {tiny_model.name}  # classified, not switched


def test_migration_0006_keeps_the_views_on_the_model_they_showed(two_models, tiny_model):
    url = two_models
    sorter("db", "downgrade", "0005", url=url)
    sorter("db", "upgrade", url=url)
    assert _models(url)[tiny_model.name]["active"] == "*"
