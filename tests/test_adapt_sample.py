"""The adaptation's sample and folds (sorter.adaptation.sample): balance, caps, studies kept whole."""

from __future__ import annotations

from collections import Counter

import pytest

from sorter.adaptation.sample import Candidate, assign_folds, interleave, sample

pytest_plugins = ["db_fixtures"]


def archive() -> list[Candidate]:
    """A lopsided archive: CT mostly from one big scanner, a few MR studies, one small XR source."""
    rows: list[Candidate] = []
    n = 0

    def add(label: str, source: str, study: str, series: str, count: int) -> None:
        nonlocal n
        for _ in range(count):
            rows.append(Candidate(n, label, source, study, series))
            n += 1

    for s in range(40):  # the big CT scanner: 40 studies of 2 series of 100 slices
        add("CT", "ct-big", f"big-{s}", f"big-{s}-a", 100)
        add("CT", "ct-big", f"big-{s}", f"big-{s}-b", 100)
    add("CT", "ct-small", "small-0", "small-0-a", 30)
    add("CT", "ct-small", "small-1", "small-1-a", 30)
    for s in range(6):
        add("MR", "mr", f"mr-{s}", f"mr-{s}-a", 50)
        add("MR", "mr", f"mr-{s}", f"mr-{s}-b", 50)
    add("XR", "xr", "xr-0", "xr-0-a", 1)
    add("XR", "xr", "xr-1", "xr-1-a", 1)
    return rows


def test_interleave_takes_one_of_each_in_turn():
    assert interleave([[1, 2, 3], [10], [20, 21]]) == [1, 10, 20, 2, 21, 3]
    assert interleave([]) == []


def test_labels_are_capped_and_series_keep_at_most_per_series():
    chosen = sample(archive(), per_label=100, per_series=3)
    labels = Counter(c.header_label for c in chosen)
    assert labels == {"CT": 100, "MR": 36, "XR": 2}  # MR: 12 series x 3; XR has only 2
    assert max(Counter(c.series for c in chosen).values()) <= 3
    assert len({c.instance_id for c in chosen}) == len(chosen)


def test_a_small_source_is_not_drowned_by_a_big_one():
    chosen = [c for c in sample(archive(), per_label=20, per_series=3) if c.header_label == "CT"]
    by_source = Counter(c.source for c in chosen)
    # Round-robin over sources: the small scanner gets all it can give (2 series x 3), not 20 x 2/82.
    assert by_source == {"ct-small": 6, "ct-big": 14}
    # ... and within the big source, studies before second series: 14 instances from 14 studies.
    assert len({c.study for c in chosen if c.source == "ct-big"}) == 14


def test_kept_instances_are_spread_over_the_series():
    chosen = [c for c in sample(archive(), per_label=1000, per_series=3) if c.series == "mr-0-a"]
    ids = sorted(c.instance_id for c in chosen)
    first = min(c.instance_id for c in archive() if c.series == "mr-0-a")
    assert [i - first for i in ids] == [8, 25, 41]  # evenly spaced over 50, not the first three


def test_the_sample_does_not_depend_on_the_candidates_order_and_follows_the_seed():
    rows = archive()
    one = sample(rows, 50, 2, seed=3)
    assert sample(list(reversed(rows)), 50, 2, seed=3) == one
    assert sample(rows, 50, 2, seed=4) != one


def test_folds_never_split_a_study_and_spread_every_label():
    chosen = sample(archive(), per_label=200, per_series=3)
    fold_of = assign_folds(chosen, folds=5)
    assert set(fold_of) == {c.study for c in chosen}
    assert set(fold_of.values()) == set(range(5))
    # a study is one key: all its instances share the fold by construction; labels spread out:
    for label in ("CT", "MR"):
        per_fold = Counter(fold_of[c.study] for c in chosen if c.header_label == label)
        assert len(per_fold) == 5, (label, per_fold)
        assert max(per_fold.values()) - min(per_fold.values()) <= 6 * 3, (label, per_fold)
    xr = {fold_of[c.study] for c in chosen if c.header_label == "XR"}
    assert len(xr) == 2  # two XR studies land in two folds, so each has XR to learn from


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        sample(archive(), per_label=0, per_series=1)
    with pytest.raises(ValueError):
        assign_folds(sample(archive(), 10, 1), folds=1)


def test_instances_without_series_uids_are_kept_together_by_folder(tmp_path, sqlite_url, tiny_model):
    """A UID-less series (a broken exporter) was one series and one study per slice: it escaped the
    per-series cap and its neighbouring slices were dealt to different folds."""
    import pydicom
    from db_support import copy_dicom, pydicom_file, scan

    from sorter.adaptation.store import candidates
    from sorter.db.session import open_database

    for folder, count in (("dump-a", 5), ("dump-b", 2)):
        for i in range(count):
            path = copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "archive" / folder / f"{i}.dcm")
            ds = pydicom.dcmread(path)
            del ds.SeriesInstanceUID, ds.StudyInstanceUID
            ds.save_as(path, enforce_file_format=False)
    copy_dicom(pydicom_file("CT_small.dcm"), tmp_path / "archive" / "dump-b" / "named.dcm")
    assert scan(sqlite_url, tiny_model, tmp_path / "archive", tmp=tmp_path)["classified"] == 8
    engine, sessions = open_database(sqlite_url)
    try:
        with sessions() as session:
            pool, _paths = candidates(session)
    finally:
        engine.dispose()
    groups = Counter((c.study, c.series) for c in pool)
    assert sorted(groups.values()) == [1, 2, 5]  # one series per folder, its own study; the named one apart
    kept = sample(pool, per_label=100, per_series=3)
    assert len(kept) == 3 + 2 + 1
    folds = assign_folds(kept, 3)
    assert len({folds[c.study] for c in kept if c.series.endswith("dump-a")}) == 1
