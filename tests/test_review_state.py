"""The review queue's summary table follows the series view through scans, model switches and deletions.

After every refresh, ``series_state`` must hold exactly what ``series_summary`` says (real scans
of pydicom's and the corpus's files, with the untrained tiny models of tests/db_fixtures.py: the
labels do not matter here, the bookkeeping does), on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from db_support import copy_dicom, pydicom_file, query, scan, sorter
from pydicom.uid import generate_uid

from sorter.db.session import open_database
from sorter.review import state

pytest_plugins = ["db_fixtures"]

FIELDS = "series_instance_uid, label, verdict, n_instances, n_disagree, n_uncertain, header_label"


def _series(root: Path, n: int, modality: str = "CT") -> str:
    uid, study = generate_uid(), generate_uid()
    for k in range(n):
        copy_dicom(
            pydicom_file("CT_small.dcm"), root / uid / f"{k}.dcm", series=uid, study=study, modality=modality
        )
    return uid


def _refresh(url: str) -> state.Refreshed:
    _engine, sessions = open_database(url)
    try:
        with sessions() as session:
            return state.refresh(session)
    finally:
        _engine.dispose()


def _same_as_view(url: str) -> set[tuple]:
    table = {tuple(r) for r in query(url, f"SELECT {FIELDS} FROM series_state")}
    view = {tuple(r) for r in query(url, f"SELECT {FIELDS} FROM series_summary")}
    assert table == view
    return table


def test_refreshes_follow_scans_switches_and_deletions(db_url, tiny_model, tiny_model_b, tmp_path):
    first = _series(tmp_path / "a", 3)
    scan(db_url, tiny_model, tmp_path / "a", tmp=tmp_path)
    assert _refresh(db_url).kind == "rebuilt"
    assert {r[0] for r in _same_as_view(db_url)} == {first}

    second = _series(tmp_path / "b", 2, modality="MR")
    scan(db_url, tiny_model, tmp_path / "b", tmp=tmp_path)
    done = _refresh(db_url)
    assert done.kind == "updated" and done.series >= 1  # the new series (and recent ones, by the margin)
    assert {r[0] for r in _same_as_view(db_url)} == {first, second}

    # another model becomes active: pointers move without stamping instances -> rebuilt
    sorter("reclassify", "--model", str(tiny_model_b), "--workers", "1", "--no-progress", url=db_url)
    sorter("models", "use", tiny_model_b.name, url=db_url)
    assert _refresh(db_url).kind == "rebuilt"
    _same_as_view(db_url)
    models = {r[0] for r in query(db_url, "SELECT DISTINCT model_id FROM series_state")}
    # the model switched to (activation times have one-second resolution on SQLite: not by time)
    [switched] = query(db_url, "SELECT id FROM models WHERE path = :p", p=str(tiny_model_b))
    assert models == {switched[0]}

    # a series whose instances are gone is pruned
    _engine, sessions = open_database(db_url)
    with sessions() as session:
        session.execute(sa.text("DELETE FROM instances WHERE series_instance_uid = :u"), {"u": second})
        session.commit()
    _engine.dispose()
    _refresh(db_url)
    assert {r[0] for r in _same_as_view(db_url)} == {first}


def test_the_refresher_waits_its_interval(sqlite_url, tiny_model, tmp_path):
    _series(tmp_path / "a", 2)
    scan(sqlite_url, tiny_model, tmp_path / "a", tmp=tmp_path)
    _engine, sessions = open_database(sqlite_url)
    refresher = state.Refresher(interval_s=3600.0)
    with sessions() as session:
        assert refresher.ensure(session) is not None
        assert refresher.ensure(session) is None  # within the interval
        assert refresher.ensure(session, force=True) is not None
    _engine.dispose()
