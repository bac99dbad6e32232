"""Query helpers on both databases: idempotent registration, the claim, predictions per model."""

from __future__ import annotations

import pytest
from db_support import query
from pydicom.uid import generate_uid

from sorter.db import queries
from sorter.db.session import open_database
from sorter.domain import InstanceHeader, Label, Prediction, Status, Verdict
from sorter.ingest import failure, from_header, path_uid, register
from sorter.pipeline import Outcome, write_outcomes

pytest_plugins = ["db_fixtures"]


def _header(path: str, modality: str = "CT", uid: str | None = None) -> InstanceHeader:
    return InstanceHeader(
        path=path,
        sop_instance_uid=uid or generate_uid(),
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality=modality,
    )


def _prediction(label: Label, p: float) -> Prediction:
    other = Label.MR if label is not Label.MR else Label.CT
    return Prediction(label, p, other, 1 - p, {label: p, other: 1 - p})


def test_registration_is_idempotent_and_records_failures(db_url):
    items = [from_header(_header(f"/a/{i}.dcm"), source="a") for i in range(5)]
    items.append(failure("/a/readme.txt", "not_dicom", "text"))
    engine, sessions = open_database(db_url)
    with sessions() as session:
        first = register(session, items)
        session.commit()
    with sessions() as session:
        second = register(session, items)
        session.commit()
    engine.dispose()
    assert [r.instance_id for r in first] == [r.instance_id for r in second]
    assert [r.status for r in first] == [Status.PENDING] * 5 + [Status.FAILED]
    assert query(db_url, "SELECT count(*) FROM instances")[0][0] == 6
    row = query(db_url, "SELECT sop_instance_uid, error FROM instances WHERE path = '/a/readme.txt'")[0]
    assert tuple(row) == (path_uid("/a/readme.txt"), "not_dicom")


def test_hostile_header_values_do_not_fail_the_batch(db_url):
    header = InstanceHeader(
        path="/a/odd.dcm",
        sop_instance_uid="1.2." + "9" * 80,
        study_instance_uid="1.2\x003",
        series_instance_uid=None,
        sop_class_uid=None,
        modality="c\x00t",
        institution_name="x" * 500,
    )
    engine, sessions = open_database(db_url)
    with sessions() as session:
        [result] = register(session, [from_header(header)])
        session.commit()
    engine.dispose()
    row = query(
        db_url, "SELECT sop_instance_uid, study_instance_uid, header_modality, header_label FROM instances"
    )[0]
    assert tuple(row) == (path_uid("/a/odd.dcm"), "1.23", "CT", "CT")
    assert result.status is Status.PENDING


def test_claim_takes_only_pending_rows(db_url):
    engine, sessions = open_database(db_url)
    with sessions() as session:
        ids = [r.instance_id for r in register(session, [from_header(_header(f"/b/{i}")) for i in range(4)])]
        queries.mark_finished(
            session, [{"b_id": ids[0], "status": Status.FAILED, "error": "x", "detail": None}]
        )
        session.commit()
    with sessions() as session:
        assert [c.id for c in queries.claim(session, ids)] == ids[1:]
        assert [c.id for c in queries.claim(session, ids, [Status.FAILED])] == ids[:1]
    engine.dispose()


def test_concurrent_workers_never_claim_the_same_rows(postgres_database):
    from db_fixtures import truncate

    truncate(postgres_database)
    engine, sessions = open_database(postgres_database)
    with sessions() as session:
        ids = [r.instance_id for r in register(session, [from_header(_header(f"/c/{i}")) for i in range(6)])]
        session.commit()
    first, second = sessions(), sessions()
    try:
        taken = [c.id for c in queries.claim(first, ids[:4])]
        assert taken == ids[:4]
        assert [c.id for c in queries.claim(second, ids)] == ids[4:]  # skips the locked rows, does not wait
        second.rollback()
        first.rollback()  # a worker that dies releases its rows with its transaction
        assert [c.id for c in queries.claim(second, ids)] == ids
    finally:
        first.close()
        second.close()
        engine.dispose()


def test_predictions_are_kept_per_model_and_the_instance_points_at_the_latest(db_url):
    engine, sessions = open_database(db_url)
    with sessions() as session:
        [reg] = register(session, [from_header(_header("/d/1.dcm", "MR"))])
        model_a = queries.model_id_for(
            session,
            {
                "sha256": "a" * 64,
                "arch": "resnet18",
                "labels": "CT,MR",
                "min_confidence": 0.8,
                "min_margin": 0.2,
            },
        )
        model_b = queries.model_id_for(
            session,
            {
                "sha256": "b" * 64,
                "arch": "resnet18",
                "labels": "CT,MR",
                "min_confidence": 0.8,
                "min_margin": 0.2,
            },
        )
        outcome = Outcome(
            reg.instance_id, Status.DONE, Label.MR, _prediction(Label.CT, 0.9), Verdict.DISAGREE
        )
        write_outcomes(session, model_a, [outcome])
        write_outcomes(session, model_a, [outcome])  # a re-run replaces, never duplicates
        session.commit()
        agree = Outcome(reg.instance_id, Status.DONE, Label.MR, _prediction(Label.MR, 0.95), Verdict.AGREE)
        write_outcomes(session, model_b, [agree])
        session.commit()
    engine.dispose()
    assert query(db_url, "SELECT count(*) FROM predictions")[0][0] == 2
    latest = query(db_url, "SELECT label, verdict, model_sha256 FROM latest_predictions")
    assert [tuple(r) for r in latest] == [("MR", "agree", "b" * 64)]
    assert query(db_url, "SELECT count(*) FROM discrepancies")[0][0] == 0


def test_next_ids_pages_by_status_folder_and_model(db_url):
    engine, sessions = open_database(db_url)
    with sessions() as session:
        regs = register(session, [from_header(_header(p)) for p in ("/x/1", "/x/2", "/x_y/3", "/z/4")])
        session.commit()
        ids = [r.instance_id for r in regs]
        assert (
            queries.next_ids(session, after=0, limit=10, statuses=[Status.PENDING], under=["/x/"]) == ids[:2]
        )
        assert queries.next_ids(session, after=ids[0], limit=1, statuses=[Status.PENDING]) == ids[1:2]
        assert queries.next_ids(session, after=0, limit=10, statuses=[Status.DONE]) == []
    engine.dispose()


@pytest.mark.parametrize("bad", ["%", "_"])
def test_folder_prefixes_are_matched_literally(sqlite_url, bad):
    engine, sessions = open_database(sqlite_url)
    with sessions() as session:
        regs = register(session, [from_header(_header(p)) for p in (f"/{bad}/1", "/q/2")])
        session.commit()
        assert queries.next_ids(session, after=0, limit=9, statuses=[Status.PENDING], under=[f"/{bad}/"]) == [
            regs[0].instance_id
        ]
    engine.dispose()
