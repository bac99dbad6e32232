"""Manifests: reading the shared corpus, and building one from a real DICOM tree."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import pydicom
import pytest
from support import CORPUS, data_file

from sorter.domain import Label
from sorter.manifests import RelativePaths, relative_path
from train.manifest import FORMATS, MANIFEST_COLUMNS, build_manifest, read_manifest, source_problems


def study_hash(name: str) -> str:
    uid = str(pydicom.dcmread(Path(data_file(name)), stop_before_pixels=True).StudyInstanceUID)
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """Two sites of real pydicom test files, one nested, plus non-image and non-DICOM files."""
    root = tmp_path / "archive"
    (root / "siteA" / "sub" / "deeper").mkdir(parents=True)
    (root / "siteB").mkdir()
    shutil.copy(Path(data_file("CT_small.dcm")), root / "siteA" / "ct.dcm")
    shutil.copy(Path(data_file("MR_small.dcm")), root / "siteA" / "sub" / "deeper" / "mr.dcm")
    shutil.copy(Path(data_file("rtplan.dcm")), root / "siteA" / "rtplan.dcm")
    shutil.copy(Path(data_file("MR_small.dcm")), root / "siteB" / "IM0001")
    (root / "siteB" / "notes.txt").write_text("Not an image; just some notes about the archive.\n")
    # CT_small as a raw data set (no preamble, no File Meta): needs the force=True fallback.
    ds = pydicom.dcmread(Path(data_file("CT_small.dcm")))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(
        root / "siteB" / "ct_raw", ds, implicit_vr=True, little_endian=True, enforce_file_format=False
    )
    return root.resolve()


@pytest.mark.corpus
def test_read_shared_corpus_manifest() -> None:
    manifest = CORPUS / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"shared corpus not found at {manifest}; it lives beside the repository checkout")
    rows = read_manifest(manifest)
    with manifest.open(newline="", encoding="utf-8") as handle:
        assert len(rows) == sum(1 for _ in csv.DictReader(handle))  # every row read, none dropped
    missing = [row.path for row in rows if not row.path.is_file()]
    assert not missing, f"{len(missing)} manifest paths do not exist, e.g. {missing[:3]}"
    assert all(row.path.is_absolute() for row in rows)
    assert {row.format for row in rows} <= FORMATS
    assert {row.label for row in rows} <= set(Label)
    assert all(row.source and row.group for row in rows)
    assert "header_modality" in rows[0].extra


def test_build_manifest_from_dicom_tree(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifests" / "archive.csv"
    summary = build_manifest(archive, out, progress=False)

    assert summary.rows == 4
    assert summary.skipped == {"non_image": 1, "not_dicom": 1}
    assert summary.labels == {"CT": 2, "MR": 2}
    assert summary.sources_by_label == {"CT": {"siteA": 1, "siteB": 1}, "MR": {"siteA": 1, "siteB": 1}}

    text = out.read_text()
    for patient_id in ("1CT1", "4MR1"):
        assert patient_id not in text
    with out.open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == MANIFEST_COLUMNS
        records = {r["path"]: r for r in reader}
    assert set(records) == {
        "../archive/siteA/ct.dcm",
        "../archive/siteA/sub/deeper/mr.dcm",
        "../archive/siteB/IM0001",
        "../archive/siteB/ct_raw",
    }
    ct = records["../archive/siteA/ct.dcm"]
    assert (ct["label"], ct["header_modality"], ct["source"], ct["format"]) == ("CT", "CT", "siteA", "dcm")
    assert ct["group"] == study_hash("CT_small.dcm")
    assert records["../archive/siteB/ct_raw"]["group"] == ct["group"]
    assert records["../archive/siteB/IM0001"]["group"] == study_hash("MR_small.dcm")

    rows = read_manifest(out)
    assert len(rows) == 4
    assert {row.path for row in rows} == {
        archive / "siteA" / "ct.dcm",
        archive / "siteA" / "sub" / "deeper" / "mr.dcm",
        archive / "siteB" / "IM0001",
        archive / "siteB" / "ct_raw",
    }
    assert {row.label for row in rows} == {Label.CT, Label.MR}
    assert all(row.format == "dcm" and row.extra["header_modality"] == row.label for row in rows)


def test_a_linked_site_is_read_and_what_is_no_file_is_counted(archive: Path, tmp_path: Path) -> None:
    """os.walk skipped a site linked in from another disk without a word: a model trained on
    less than the archive; the walk is ``sorter scan``'s now, and a broken link or a loop says so."""
    elsewhere = tmp_path / "disk2" / "siteC"
    elsewhere.mkdir(parents=True)
    shutil.copy(Path(data_file("CT_small.dcm")), elsewhere / "ct.dcm")
    (archive / "siteC").symlink_to(elsewhere)
    (archive / "siteA" / "gone.dcm").symlink_to(archive / "nowhere.dcm")
    (archive / "siteA" / "loop").symlink_to(archive)
    out = tmp_path / "m.csv"
    summary = build_manifest(archive, out, progress=False)
    assert summary.sources_by_label["CT"] == {"siteA": 1, "siteB": 1, "siteC": 1}
    assert summary.skipped == {"broken_symlink": 1, "non_image": 1, "not_dicom": 1, "symlink_loop": 1}
    assert archive / "siteC" / "ct.dcm" in {row.path for row in read_manifest(out)}


def test_a_file_name_that_is_not_utf8_is_counted_not_a_traceback(archive: Path, tmp_path: Path) -> None:
    """A Latin-1 name (an old share's ``caf\xe9.dcm``) stopped the manifest's writing with
    UnicodeEncodeError after every header was read; it is left out and counted now."""
    import os

    shutil.copy(Path(data_file("CT_small.dcm")), archive / "siteB" / os.fsdecode(b"caf\xe9.dcm"))
    out = tmp_path / "m.csv"
    summary = build_manifest(archive, out, progress=False)
    assert summary.skipped == {"name_not_utf8": 1, "non_image": 1, "not_dicom": 1}
    assert summary.rows == 4 and len(read_manifest(out)) == 4
    from click.testing import CliRunner

    from train.cli import main

    built = CliRunner().invoke(main, ["manifest", str(archive), "--out", str(tmp_path / "cli.csv")])
    assert built.exit_code == 0, built.output
    assert "skipped 1: name_not_utf8 (a manifest is UTF-8 text: rename them" in built.output


def test_manifest_inside_root_is_not_read_back(archive: Path) -> None:
    out = archive / "manifest.csv"
    first = build_manifest(archive, out, progress=False)
    second = build_manifest(archive, out, progress=False)
    assert first == second
    assert read_manifest(out)[0].path.parent.parent == archive


def test_source_from_header_keyword(archive: Path, tmp_path: Path) -> None:
    summary = build_manifest(archive, tmp_path / "m.csv", source_from="Manufacturer", progress=False)
    assert summary.sources_by_label == {"CT": {"GE MEDICAL SYSTEMS": 2}, "MR": {"TOSHIBA_MEC": 2}}
    with pytest.raises(ValueError, match="DICOM keyword"):
        build_manifest(archive, tmp_path / "m.csv", source_from="NotAKeyword", progress=False)


def test_limit_per_series_keeps_evenly_spaced(tmp_path: Path) -> None:
    root = tmp_path / "series"
    root.mkdir()
    for i in range(5):
        shutil.copy(Path(data_file("MR_small.dcm")), root / f"mr_{i}.dcm")
    out = tmp_path / "m.csv"
    summary = build_manifest(root, out, limit_per_series=2, progress=False)
    assert summary.rows == 2
    assert summary.skipped == {"series_limit": 3}
    assert [row.path.name for row in read_manifest(out)] == ["mr_0.dcm", "mr_4.dcm"]
    assert summary.sources_by_label == {"MR": {"series": 2}}


def test_read_manifest_infers_format_and_reports_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text(
        "path,label,source,group,notes\n"
        "a/vol.nii.gz,MR,s1,g1,x\n"
        "b/photo.JPEG,OT,s2,g2,\n"
        "c/IM0001,ct,s3,g3,y\n"
    )
    rows = read_manifest(good)
    assert [r.format for r in rows] == ["nii.gz", "jpg", "dcm"]
    assert rows[2].label is Label.CT
    assert rows[0].path == tmp_path.resolve() / "a" / "vol.nii.gz"
    assert rows[0].extra == {"notes": "x"}

    bad_label = tmp_path / "bad_label.csv"
    bad_label.write_text("path,label,source,group\na.dcm,CT,s,g\nb.dcm,XA,s,g\n")
    with pytest.raises(ValueError, match=r"line 3: unknown label 'XA'"):
        read_manifest(bad_label)

    empty_group = tmp_path / "empty_group.csv"
    empty_group.write_text("path,label,source,group,format\na.dcm,CT,s,,dcm\n")
    with pytest.raises(ValueError, match=r"line 2: empty 'group'"):
        read_manifest(empty_group)

    bad_format = tmp_path / "bad_format.csv"
    bad_format.write_text("path,label,source,group,format\na.gif,CT,s,g,gif\n")
    with pytest.raises(ValueError, match=r"line 2: unknown format 'gif'"):
        read_manifest(bad_format)

    no_source = tmp_path / "no_source.csv"
    no_source.write_text("path,label,group\na.dcm,CT,g\n")
    with pytest.raises(ValueError, match="missing required column"):
        read_manifest(no_source)


def test_source_problems_name_the_labels_leave_sources_out_cannot_measure() -> None:
    assert source_problems({"CT": {"a": 5, "b": 1, "c": 1}}) == []
    (few,) = source_problems({"CT": {"a": 5, "b": 1, "c": 1}, "MR": {"MR": 40}})
    assert few.startswith("MR: 1 source (MR), fewer than 3") and "--source-from StationName" in few
    (unknown,) = source_problems({"CT": {"unknown": 114, "h1": 3, "h2": 2, "h3": 1}})
    assert unknown.startswith("CT: 114 of 120 files have no source (`unknown`)")


def test_a_tree_sorted_by_modality_is_flagged_and_loso_refuses_it(archive: Path, tmp_path: Path) -> None:
    """The default source (the top folder) of a tree sorted by modality is one source per label."""
    from click.testing import CliRunner

    from train.cli import main

    by_modality = tmp_path / "by-modality"
    for label, name in (("CT", "CT_small.dcm"), ("MR", "MR_small.dcm")):
        (by_modality / label).mkdir(parents=True)
        shutil.copy(Path(data_file(name)), by_modality / label / "1.dcm")
    out = tmp_path / "m.csv"
    built = CliRunner().invoke(main, ["manifest", str(by_modality), "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert "warning: CT: 1 source (CT), fewer than 3" in built.output
    assert "warning: MR: 1 source (MR)" in built.output
    refused = CliRunner().invoke(main, ["loso", "--manifest", str(out), "--out", str(tmp_path / "loso")])
    assert refused.exit_code == 2, refused.output
    assert "error: CT: 1 source" in refused.output and "pass --force to run anyway" in refused.output
    assert not (tmp_path / "loso").exists()


def test_cards_say_which_model_they_describe() -> None:
    from sorter.model.artefact import DEFAULT_MODEL_PATH, load_artefact
    from train.export import model_card

    card = model_card(load_artefact(DEFAULT_MODEL_PATH).spec, "ab" * 32, "cmd", name="mine.pt")
    assert card.startswith("# Model card: mine.pt (sha256 abababababab)")


def test_a_manifest_that_cannot_be_written_is_one_line_naming_it(archive: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from train.cli import main

    taken = tmp_path / "taken"
    taken.write_text("a file where a folder should be")
    result = CliRunner().invoke(main, ["manifest", str(archive), "--out", str(taken / "manifest.csv")])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    last = result.output.splitlines()[-1]  # the OS's words ("File exists": mkdir of the folder)
    assert last.startswith("Error: ") and str(taken) in last, result.output


@pytest.mark.parametrize("manifest", ["out/m.csv", "m.csv", "out/deep/er/m.csv", "/elsewhere/m.csv"])
def test_relative_paths_match_relpath_for_every_kind_of_path(tmp_path, monkeypatch, manifest):
    """The per-folder cache of ``sorter export`` and ``sorter-train manifest`` gives what
    ``os.path.relpath`` gives, path by path, in any order (it once took half an export's time)."""
    monkeypatch.chdir(tmp_path)
    paths = [
        str(tmp_path / "out" / "a.dcm"),
        str(tmp_path / "out" / "s1" / "b.dcm"),
        str(tmp_path / "out" / "s1" / "c.dcm"),
        str(tmp_path / "x" / "y" / "d.dcm"),
        str(tmp_path / "out" / "s1" / ".." / "e.dcm"),
        str(tmp_path / "out" / "." / "s1" / "f.dcm"),
        str(tmp_path / "out" / "s1" / ".."),
        "rel/g.dcm",
        "h.dcm",
        "./i.dcm",
        "/top.dcm",
        str(tmp_path / "out" / "caf\udce9" / "j.dcm"),  # a Latin-1 name, as os.fsdecode gives it
    ]
    relative = RelativePaths(Path(manifest))
    for path in paths + paths[::-1]:
        assert relative(path) == relative_path(path, Path(manifest)), path
