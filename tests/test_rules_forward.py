"""Forward rules against a real dcmtk storescp on loopback: down, then up, delivered exactly once."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from db_support import copy_dicom, pydicom_file, query, scalar, scan, small_archive, sorter
from pydicom import dcmread
from support import free_port, stop_process_group, wait_for, wait_for_port

from sorter.commands.watch import serve
from sorter.config import Settings
from sorter.db.models import RuleAction
from sorter.db.session import open_database
from sorter.rules.engine import _claim
from sorter.rules.forward import next_try

pytest_plugins = ["db_fixtures"]

pytestmark = pytest.mark.skipif(
    shutil.which("storescp") is None, reason="dcmtk's storescp not installed (apt-get install dcmtk)"
)


def _rules(tmp_path: Path, port: int, extra: str = "") -> Path:
    path = tmp_path / "forward.toml"
    path.write_text(
        f"""mode = "all"
[[rule]]
name = "to-storescp"
[rule.match]
{extra}
[rule.forward]
ae_title = "STORESCP"
host = "127.0.0.1"
port = "{port}"
calling_ae = "SORTER_TEST"
"""
    )
    return path


def _storescp(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            # +uf: a second copy of an instance would be a second file, never an overwrite.
            ["storescp", "-aet", "STORESCP", "+xa", "+uf", "-od", str(out), str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_port(port, process, 30, log)
    return process


def _received(out: Path) -> list[str]:
    return sorted(
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir() if p.is_file()
    )


def test_a_destination_down_then_up_gets_every_instance_exactly_once(db_url, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    small_archive(drop)
    port = free_port()
    rules = _rules(tmp_path, port, 'modality = ["CT", "MR"]')

    # Down: the scan classifies, queues 6 forwards (CT and MR headers), and cannot send them.
    scan(db_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
    rows = query(db_url, "SELECT status, error, attempts, next_attempt_at IS NOT NULL FROM rule_actions")
    assert sorted(rows) == [("failed", "destination_unreachable", 1, True)] * 6
    status = sorter("status", "--format", "csv", url=db_url).output
    assert "rules.forward.failed,6" in status
    # Their backoff has not passed: another run does not try again.
    again = sorter("rules", "apply", str(rules), url=db_url)
    assert "to-storescp" not in again.output.split("checked", 1)[1]
    assert query(db_url, "SELECT DISTINCT attempts FROM rule_actions") == [(1,)]

    out = tmp_path / "received"
    process = _storescp(port, out, tmp_path / "storescp.log")
    try:
        result = sorter("rules", "apply", "--retry-now", str(rules), url=db_url)
        assert "to-storescp: 6 done" in result.output
        # Once delivered, never again: neither a re-run nor a retry sends a second copy.
        sorter("rules", "apply", "--retry-now", str(rules), url=db_url)
        scan(db_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
    finally:
        stop_process_group(process)
    expected = sorted(
        uid
        for (uid,) in query(
            db_url, "SELECT sop_instance_uid FROM instances WHERE header_modality IN ('CT', 'MR')"
        )
    )
    assert _received(out) == expected  # each once: storescp names files by SOP Instance UID, see the count
    assert len(list(out.iterdir())) == 6
    assert query(db_url, "SELECT DISTINCT status, attempts FROM rule_actions") == [("done", 2)]


def test_forwards_are_sent_in_the_transfer_syntax_they_are_stored_in(sqlite_url, tiny_model, tmp_path):
    drop = tmp_path / "drop"
    files = small_archive(drop)  # the RGB image is RLE Lossless
    port = free_port()
    rules = _rules(tmp_path, port, 'label = ["CT", "MR", "PT", "NM", "XR", "MG", "US", "OT"]')
    out = tmp_path / "received"
    process = _storescp(port, out, tmp_path / "storescp.log")
    try:
        scan(sqlite_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
    finally:
        stop_process_group(process)
    rgb_uid = str(dcmread(files["rgb"], stop_before_pixels=True).SOPInstanceUID)
    [received] = [p for p in out.iterdir() if dcmread(p, stop_before_pixels=True).SOPInstanceUID == rgb_uid]
    sent = dcmread(received)
    original = dcmread(files["rgb"])
    assert sent.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert sent.PixelData == original.PixelData
    assert len(list(out.iterdir())) == 7


def test_a_refusing_destination_dead_letters_after_the_last_try(
    sqlite_url, tiny_model, tmp_path, monkeypatch
):
    drop = tmp_path / "drop"
    small_archive(drop)
    port = free_port()
    rules = _rules(tmp_path, port, 'modality = "CT"')
    monkeypatch.setattr("sorter.rules.engine.MAX_ATTEMPTS", 2)
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
    result = sorter("rules", "apply", "--retry-now", str(rules), url=sqlite_url, expect=3)
    assert "3 dead-lettered" in result.output
    assert query(sqlite_url, "SELECT DISTINCT status, attempts FROM rule_actions") == [("dead", 2)]
    assert "rules.forward.dead,3" in sorter("status", "--format", "csv", url=sqlite_url).output
    listed = sorter("rules", "failed", "--format", "json", url=sqlite_url).output
    rows = json.loads(listed)
    assert [(r["rule"], r["status"], r["error"], r["attempts"]) for r in rows] == [
        ("to-storescp", "dead", "destination_unreachable", 2)
    ] * 3
    uids = {
        uid
        for (uid,) in query(sqlite_url, "SELECT sop_instance_uid FROM instances WHERE header_modality = 'CT'")
    }
    assert {r["sop_instance_uid"] for r in rows} == uids
    # Dead letters wait for an admin: a plain run leaves them alone.
    sorter("rules", "apply", str(rules), url=sqlite_url)
    assert query(sqlite_url, "SELECT DISTINCT attempts FROM rule_actions") == [(2,)]


def test_backoff_doubles_and_is_capped():
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, tzinfo=UTC)
    delays = [(next_try(n, now) - now).total_seconds() for n in (1, 2, 3, 20)]
    assert delays[:3] == [15.0, 30.0, 60.0] and delays[3] == 6 * 3600.0


def test_senders_never_take_each_others_claims(db_url, tiny_model, tmp_path):
    """A claimed row belongs to its sender until the lease ends: a second sender (a worker process,
    `rules apply` from cron) skips it; once the lease has run out (the sender died) it is sent."""
    drop = tmp_path / "drop"
    small_archive(drop)
    port = free_port()
    rules = _rules(tmp_path, port, 'modality = ["CT", "MR"]')
    scan(db_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))  # down: 6 failed
    engine, sessions = open_database(db_url)
    try:
        with sessions() as session:
            ids = list(session.scalars(sa.select(RuleAction.id).order_by(RuleAction.id)))
            held = _claim(session, ids[:4], datetime.now(UTC), retry_now=True)  # another, live sender
        assert len(held) == 4
        out = tmp_path / "received"
        process = _storescp(port, out, tmp_path / "storescp.log")
        try:
            first = sorter("rules", "apply", "--retry-now", str(rules), url=db_url)
            assert "to-storescp: 2 done" in first.output
            with engine.begin() as connection:  # the other sender died: its lease runs out
                connection.execute(
                    sa.update(RuleAction)
                    .where(RuleAction.status == "sending")
                    .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
                )
            # Two senders at once, as two processes: each row is sent by one of them.
            command = [sys.executable, "-m", "sorter", "rules", "apply", str(rules), "--database-url", db_url]
            both = [
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)
            ]
            outputs = [p.communicate(timeout=120)[0].decode() for p in both]
        finally:
            stop_process_group(process)
    finally:
        engine.dispose()
    assert all(p.returncode == 0 for p in both), outputs
    assert len(list(out.iterdir())) == 6  # +uf: a duplicate would be a seventh file
    assert len(set(_received(out))) == 6
    assert query(db_url, "SELECT DISTINCT status, claim FROM rule_actions") == [("done", None)]


class _LateWake(threading.Event):
    """pynetdicom's reactor checkpoint, with its reactor thread held up for 50 ms each time it wakes:
    what a loaded machine does to it now and then, made certain."""

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)
        return woke


def test_a_response_is_never_taken_by_pynetdicoms_reactor(tmp_path, monkeypatch):
    """pynetdicom's reactor thread pauses for a send by a flag it sets before it waits; a sender
    that finds the flag set just after the reactor woke sends anyway, and if the response is
    queued before the sender asks for it, the reactor takes it ("Received unexpected C-STORE
    service message"): the send waits out the DIMSE timeout and the association is lost. Seen
    under load as an occasional 30 s stall and failed forwards; made certain here by holding the
    reactor up each time it wakes and the sender after each message it sends."""
    from pynetdicom.association import Association
    from pynetdicom.dimse import DIMSEServiceProvider

    from sorter.rules.forward import ForwardAction, Item, send

    made, send_msg = Association.__init__, DIMSEServiceProvider.send_msg

    def late_waking(self, *args, **kwargs):
        made(self, *args, **kwargs)
        self._reactor_checkpoint = _LateWake()
        self._reactor_checkpoint.set()

    def slow_sender(self, *args, **kwargs):
        send_msg(self, *args, **kwargs)
        time.sleep(0.2)

    monkeypatch.setattr(Association, "__init__", late_waking)
    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", slow_sender)
    port, out = free_port(), tmp_path / "received"
    process = _storescp(port, out, tmp_path / "storescp.log")
    items = []
    for n, name in enumerate(["CT_small.dcm", "MR_small.dcm", "rtdose.dcm"]):
        path = copy_dicom(pydicom_file(name), tmp_path / f"{n}.dcm")
        ds = dcmread(path, stop_before_pixels=True)
        items.append(
            Item(n, 0, str(path), ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, None)
        )
    try:
        sent = send(ForwardAction("STORESCP", "127.0.0.1", port), items, timeout_s=5)
    finally:
        stop_process_group(process)
    assert [(s.error, s.detail) for s in sent] == [(None, None)] * 3
    assert len(_received(out)) == 3


def test_a_service_sends_and_retries_in_the_background(sqlite_url, tiny_model, tmp_path, monkeypatch):
    """`sorter watch --apply-rules` with a destination that is down, then up: its sender process
    retries on its own after the first backoff (15 s; no `rules apply`), and each instance
    arrives once."""
    monkeypatch.setattr("sorter.rules.delivery.POLL_S", 0.5)
    port = free_port()
    rules = _rules(tmp_path, port, 'modality = "CT"')
    drop, out = tmp_path / "drop", tmp_path / "received"
    drop.mkdir()
    open_database(sqlite_url)[0].dispose()  # the schema exists before the polling starts
    settings = Settings.from_env(
        {},
        database_url=sqlite_url,
        model=tiny_model,
        workers=1,
        batch_size=2,
        settle=0.3,
        rescan=0.3,
        rules=rules,
    )
    stop = threading.Event()
    watcher = threading.Thread(target=serve, args=(settings, drop, stop), daemon=True)
    watcher.start()
    process = None
    try:
        for i in range(3):
            copy_dicom(pydicom_file("CT_small.dcm"), drop / f"ct{i}.dcm")
        wait_for(
            lambda: scalar(sqlite_url, "SELECT count(*) FROM rule_actions WHERE status = 'failed'") == 3,
            what="three failed forwards",
        )
        process = _storescp(port, out, tmp_path / "storescp.log")
        wait_for(lambda: out.exists() and len(list(out.iterdir())) == 3, timeout=60, what="three received")
    finally:
        stop.set()
        watcher.join(30)
        if process is not None:
            stop_process_group(process)
    assert not watcher.is_alive()
    assert len(set(_received(out))) == 3 and len(list(out.iterdir())) == 3
    assert query(sqlite_url, "SELECT DISTINCT status FROM rule_actions") == [("done",)]


def test_a_destination_that_is_down_is_tried_once_per_run(db_url, tiny_model, tmp_path, monkeypatch, caplog):
    """One association that cannot be made leaves the run's other forwards for the next run,
    untried (each would wait for the same timeout), with one warning instead of one per instance."""
    drop = tmp_path / "drop"
    small_archive(drop)
    scan(db_url, tiny_model, drop, tmp=tmp_path)
    port = free_port()
    rules = _rules(tmp_path, port, 'modality = ["CT", "MR"]')
    monkeypatch.setattr("sorter.rules.engine._CHUNK", 2)  # 6 forwards: 3 associations' worth

    with caplog.at_level(logging.WARNING, logger="sorter.rules.engine"):
        result = sorter("rules", "apply", str(rules), url=db_url, expect=3)
    assert "to-storescp: 0 done, 2 failed, 4 wait for the next run (destination unreachable)" in result.output
    [warning] = [r.getMessage() for r in caplog.records if r.name == "sorter.rules.engine"]
    assert "could not forward 2 instances (destination_unreachable, try 1)" in warning
    assert "4 more wait for the next run" in warning
    rows = query(db_url, "SELECT status, attempts FROM rule_actions")
    assert sorted(rows) == [("failed", 1)] * 2 + [("pending", 0)] * 4

    out = tmp_path / "received"
    process = _storescp(port, out, tmp_path / "storescp.log")
    try:
        assert "to-storescp: 4 done" in sorter("rules", "apply", str(rules), url=db_url).output
        assert "to-storescp: 2 done" in sorter("rules", "apply", "--retry-now", str(rules), url=db_url).output
    finally:
        stop_process_group(process)
    assert len(_received(out)) == len(set(_received(out))) == 6


def test_a_sender_leaves_a_destination_that_is_down_alone_for_longer_each_time(
    sqlite_url, tiny_model, tmp_path, monkeypatch, caplog
):
    """A listener's sender asked a PACS that refuses connections at every batch and every look
    (a warning each time, 17 000 a day); it now waits 15 s, doubling up to 5 minutes, whatever is
    queued meanwhile, and sends at once when the destination answers again."""
    from sorter.rules.delivery import Deliverer
    from sorter.rules.engine import apply_rules
    from sorter.rules.spec import load_rules

    small_archive(tmp_path / "drop")
    scan(sqlite_url, tiny_model, tmp_path / "drop", tmp=tmp_path)
    port = free_port()
    rules = load_rules(_rules(tmp_path, port, 'modality = ["CT", "MR"]'))
    engine, sessions = open_database(sqlite_url)
    apply_rules(sessions, rules, deliver=False)  # six forwards queued
    monkeypatch.setattr("sorter.rules.engine._CHUNK", 1)  # one forward per association
    monkeypatch.setattr("sorter.rules.delivery.DOWN_FIRST_S", 1.0)
    deliverer = Deliverer(sessions, rules, poll_s=0.02)
    out, process = tmp_path / "received", None
    try:
        with caplog.at_level(logging.INFO, logger="sorter.rules"):
            deliverer.start()
            for _ in range(125):  # 2.5 s of batches waking the sender
                deliverer.wake()
                time.sleep(0.02)
            tries = [r for r in caplog.records if "could not forward" in r.getMessage()]
            assert len(tries) == 2, [r.getMessage() for r in tries]  # at 0 s and 1 s; next at 3 s
            assert "is down; asking again in 2 s" in caplog.text
            process = _storescp(port, out, tmp_path / "storescp.log")
            # The four forwards never tried go at the next ask; the two that failed, at their own backoff.
            wait_for(lambda: len(list(out.iterdir())) == 4, timeout=30, what="four received")
            wait_for(lambda: "answers again" in caplog.text, timeout=10, what="the sender's note")
    finally:
        deliverer.stop()
        engine.dispose()
        if process is not None:
            stop_process_group(process)
