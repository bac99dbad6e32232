"""What a PACS admin runs the listener by (issue 13): one log line per association, Prometheus
gauges and counters, /healthz, and a spool retention policy that never deletes what is not yet
classified. A real ``sorter listen`` process, real associations on loopback."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from db_support import query
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from support import free_port, listen_env, stop_process_group, wait_for_port

from sorter.retention import KEEP, Retention, parse_retention
from sorter.scu import c_store

pytest_plugins = ["db_fixtures"]

OUR_AE = "SORTER"


def _dataset() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _associate(port: int, calling: str, datasets: list[pydicom.Dataset]) -> list[int] | None:
    ae = AE(ae_title=calling)
    for ds in datasets or [_dataset()]:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE)
    if not assoc.is_established:
        return None
    try:
        return [int(c_store(assoc, ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(check: Callable[[], bool], what: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.fullmatch(rf"{re.escape(name)}(\{{(.*)\}})? (\S+)", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    return None


def test_associations_metrics_health_and_retention(tmp_path, sqlite_url, tiny_model):
    port, metrics_port = free_port(), free_port()
    spool = tmp_path / "spool"
    # Comma separated: a title may hold inner spaces (space separated, it allowed "CT" and "SCANNER").
    env = listen_env(OUR_AE, port, spool, sqlite_url, tiny_model, "MODALITY1, CT SCANNER 1")
    env |= {
        "SORTER_METRICS_PORT": str(metrics_port),
        "SORTER_SPOOL_RETENTION": "delete-after-classify",
        "SORTER_SPOOL_SWEEP_INTERVAL": "1",
    }
    log = tmp_path / "listen.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sorter", "listen"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{metrics_port}"
    try:
        wait_for_port(port, process, 90, log)
        wait_for_port(metrics_port, process, 30, log)
        assert _associate(port, "MODALITY1", [_dataset(), _dataset()]) == [0, 0]
        assert _associate(port, "INTRUDER", [_dataset()]) is None  # not in --allow-ae
        assert _associate(port, "modality1", [_dataset()]) is None  # AE titles are case-sensitive
        assert _associate(port, "CT SCANNER 1", [_dataset()]) == [0]
        assert _associate(port, "SCANNER", [_dataset()]) is None

        status, body = _get(f"{base}/healthz")
        assert status == 200, body
        health = json.loads(body)
        assert health["ok"] and health["accepting"] and health["spool_above_floor"]

        done = "SELECT count(*) FROM instances WHERE status = 'done'"
        _wait(lambda: query(sqlite_url, done)[0][0] == 3, "not classified", log)
        # delete-after-classify: the classified files leave the spool; rows and predictions stay.
        _wait(lambda: not list(spool.rglob("*.dcm")), "the spool still holds classified files", log)
        assert query(sqlite_url, "SELECT count(*) FROM predictions")[0][0] == 3
        assert query(sqlite_url, "SELECT count(*) FROM files")[0][0] == 0

        def pending_reported() -> bool:
            return _metric(_get(f"{base}/metrics")[1], "sorter_pending_instances") == 0.0

        _wait(pending_reported, "the backlog gauge never reported", log)
        text = _get(f"{base}/metrics")[1]
        assert _metric(text, "sorter_associations_total", reason="", result="released") == 2
        refused = {"reason": "calling_ae_not_allowed", "result": "rejected"}
        assert _metric(text, "sorter_associations_total", **refused) == 3
        assert (_metric(text, "sorter_last_store_timestamp_seconds") or 0) > time.time() - 300
        assert (_metric(text, "sorter_spool_free_bytes") or 0) > 0
        assert _metric(text, "sorter_oldest_pending_age_seconds") == 0.0
    finally:
        stop_process_group(process)
    output = log.read_text(errors="replace")
    assert process.returncode == 143, output
    peer = r"at 127\.0\.0\.1:\d+"
    assert re.search(rf"association from MODALITY1 {peer}: released, stored 2, failed 0", output)
    assert re.search(rf"association from INTRUDER {peer}: rejected \(calling_ae_not_allowed\)", output)
    assert re.search(rf"association from CT SCANNER 1 {peer}: released, stored 1, failed 0", output)
    # The admin who typed the sender's title in another case is told so, once per association.
    assert (
        "calling AE title 'modality1' is not allowed, but 'MODALITY1' is: AE titles are case-sensitive"
        in output
    )
    assert "calling AE title 'INTRUDER' is not allowed" not in output
    assert "retention: delete-after-classify" in output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("keep", KEEP),
        ("delete-after-classify", Retention(keep=False)),
        ("age:7d", Retention(keep=False, min_age_s=7 * 86400)),
        ("AGE:90m", Retention(keep=False, min_age_s=5400)),
    ],
)
def test_retention_policies_parse(text, expected):
    assert parse_retention(text) == expected


@pytest.mark.parametrize("text", ["", "age:", "age:7w", "delete", "7d"])
def test_a_policy_that_is_no_policy_is_refused(text):
    with pytest.raises(ValueError, match="keep, delete-after-classify or age:N"):
        parse_retention(text)


def test_retention_never_deletes_pending_or_retryable_files(db_url, tmp_path):
    """Only finished instances' files go, and with age:N only old enough ones."""
    import os

    from sorter.db.session import open_database
    from sorter.domain import Status
    from sorter.ingest import Registration, register
    from sorter.retention import apply_retention

    spool = tmp_path / "spool"
    spool.mkdir()
    cases = {
        "done": (Status.DONE, None),
        "pending": (Status.PENDING, None),
        "denied": (Status.FAILED, "permission_denied"),
        "notdicom": (Status.FAILED, "not_dicom"),
        "skipped": (Status.SKIPPED, "non_image"),
    }
    paths = {}
    for name in cases:
        paths[name] = spool / f"{name}.dcm"
        paths[name].write_bytes(b"x")
    old = spool / "old.dcm"
    old.write_bytes(b"x")
    os.utime(old, ns=(time.time_ns() - 10 * 86400 * 10**9,) * 2)
    engine, sessions = open_database(db_url)
    try:
        with sessions() as session:
            items = [
                Registration(str(paths[n]), None, Status.FAILED, "x", size=1, mtime_ns=time.time_ns())
                for n in cases
            ] + [Registration(str(old), None, Status.FAILED, "x", size=1, mtime_ns=old.stat().st_mtime_ns)]
            ids = {Path(r.path).stem: r.instance_id for r in register(session, items)}
            from sorter.db.queries import instances

            for name, (status, error) in [*cases.items(), ("old", (Status.DONE, None))]:
                session.execute(
                    instances.update().where(instances.c.id == ids[name]).values(status=status, error=error)
                )
            session.commit()
        with sessions() as session:
            assert apply_retention(session, str(spool), parse_retention("age:7d")) == 1
            session.commit()
        assert not old.exists() and paths["done"].exists()
        with sessions() as session:
            assert apply_retention(session, str(spool), parse_retention("delete-after-classify")) == 3
            session.commit()
    finally:
        engine.dispose()
    assert sorted(p.stem for p in spool.iterdir()) == ["denied", "pending"]


def test_the_listener_s_old_sweep_variable_still_works_and_warns():
    """SORTER_SWEEP_INTERVAL set both sweeps; the listener now reads SORTER_SPOOL_SWEEP_INTERVAL."""
    from click.testing import CliRunner

    from sorter.commands.listen import listen

    unset = {"SORTER_SWEEP_INTERVAL": None, "SORTER_SPOOL_SWEEP_INTERVAL": None}
    cases = (
        ({"SORTER_SWEEP_INTERVAL": "42"}, 42.0, True),
        ({"SORTER_SPOOL_SWEEP_INTERVAL": "7", "SORTER_SWEEP_INTERVAL": "42"}, 7.0, False),
        ({}, 300.0, False),
    )
    for env, expected, warned in cases:
        with CliRunner().isolation(env={**unset, **env}) as (_out, err, _log):
            # Parsing only: the options and their callbacks, without starting anything.
            ctx = listen.make_context("listen", ["--ae-title", "SORTER", "--port", "11112"])
            assert ctx.params["sweep_interval"] == expected, env
            assert ("deprecated" in err.getvalue().decode()) is warned, env


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--spool-sweep-interval", "-1"], {}, "--spool-sweep-interval"),
        (["--sweep-grace", "-5"], {}, "--sweep-grace"),
        ([], {"SORTER_SPOOL_SWEEP_INTERVAL": "-300"}, "--spool-sweep-interval"),
        ([], {"SORTER_SWEEP_INTERVAL": "-300"}, "SORTER_SWEEP_INTERVAL='-300' must be 0 or more"),
    ],
)
def test_a_negative_sweep_interval_or_grace_is_refused(args, env, named):
    """-1 swept the whole spool after every batch; a negative grace said nothing."""
    import click
    from click.testing import CliRunner

    from sorter.commands.listen import listen

    unset = {"SORTER_SWEEP_INTERVAL": None, "SORTER_SPOOL_SWEEP_INTERVAL": None, "SORTER_SWEEP_GRACE": None}
    with CliRunner().isolation(env={**unset, **env}), pytest.raises(click.BadParameter) as refused:
        # Parsing only (a regression must fail here, not start a listener).
        listen.make_context("listen", ["--ae-title", "SORTER", "--port", "11112", *args])
    assert named in refused.value.format_message()


@pytest.mark.parametrize(
    ("code", "port", "hint"),
    [
        (errno.EACCES, 104, "ports below 1024 need root or CAP_NET_BIND_SERVICE"),
        (errno.EADDRINUSE, 11112, "another program, or another sorter, has it"),
        (errno.EADDRNOTAVAIL, 11112, "no network interface of this machine has that address"),
        (errno.EACCES, 11112, ""),  # above 1024 the capability is not the cause: no hint
    ],
)
def test_a_port_that_cannot_be_had_says_what_to_do(code, port, hint):
    """`SORTER_PORT=104` under the systemd unit's user said only "Permission denied"."""
    import os

    from sorter.commands.common import cannot_bind

    message = cannot_bind("listen", "0.0.0.0", port, OSError(code, os.strerror(code))).format_message()
    assert message.startswith(f"cannot listen on 0.0.0.0:{port}: {os.strerror(code)}")
    assert (hint in message) if hint else message.endswith(os.strerror(code))


def test_listen_on_a_busy_port_says_so_in_one_line(tmp_path, sqlite_url, tiny_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = listen_env("SORTER", port, tmp_path / "spool", sqlite_url, tiny_model, "")
        result = subprocess.run(
            [sys.executable, "-m", "sorter", "listen"], env=env, capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 1, result.stderr
    assert (
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use (another program" in result.stderr
    )
    assert "Traceback" not in result.stderr
