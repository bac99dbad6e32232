"""A real Orthanc pushes a study to ``sorter listen`` through its REST API: every instance is classified."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
from db_support import query, scan, small_archive, sorter
from pydicom.uid import generate_uid
from support import data_file, free_port, listen_env

pytest_plugins = ["db_fixtures"]

ORTHANC = shutil.which("Orthanc") or (
    "/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None
)
OUR_AE = "SORTER"
ORTHANC_AE = "ORTHANC"
#: One study: CT_small under fresh SOP Instance UIDs, sharing its Study and Series Instance UIDs.
STUDY_COPIES = 5

pytestmark = pytest.mark.skipif(
    ORTHANC is None, reason="Orthanc not installed (apt-get install -y --no-install-recommends orthanc)"
)


def _wait(
    ready: Any, process: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"{what} did not start (exit {process.poll()}):\n{log.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http(base: str, method: str, path: str, body: bytes | None = None, timeout_s: float = 30.0) -> Any:
    request = urllib.request.Request(base + path, data=body, method=method)
    if body is not None:
        request.add_header(
            "Content-Type", "application/dicom" if path == "/instances" else "application/json"
        )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        assert response.status == 200, f"{method} {path}: HTTP {response.status}"
        return json.loads(response.read() or b"null")


def _answers(base: str) -> bool:
    try:
        _http(base, "GET", "/system", timeout_s=2)
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture()
def sorter_listen(tmp_path: Path, sqlite_url: str, tiny_model: Path) -> Iterator[int]:
    """``python -m sorter listen`` configured by environment, as in production; yields its port."""
    port = free_port()
    env = listen_env(OUR_AE, port, tmp_path / "spool", sqlite_url, tiny_model, ORTHANC_AE)
    log = tmp_path / "sorter-listen.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sorter", "listen"], env=env, stdout=out, stderr=out
        )
    try:
        _wait(lambda: _port_open(port), process, "sorter listen", log, timeout_s=60)
        yield port
    finally:
        _stop(process)
    assert process.returncode == 143, log.read_text(errors="replace")[-4000:]  # clean SIGTERM stop


def _orthanc_config(tmp_path: Path, http_port: int, sorter_port: int) -> dict[str, Any]:
    """A throwaway Orthanc on loopback (storage under ``tmp_path``) that knows ``sorter listen``
    on ``sorter_port`` as modality ``sorter``."""
    return {
        "Name": "dicom-sorter-test",
        "StorageDirectory": str(tmp_path / "orthanc" / "storage"),
        "IndexDirectory": str(tmp_path / "orthanc" / "index"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "DicomAet": ORTHANC_AE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"sorter": [OUR_AE, "127.0.0.1", sorter_port]},
        "Plugins": [],
    }


@contextmanager
def _running_orthanc(tmp_path: Path, config: dict[str, Any]) -> Iterator[str]:
    """Orthanc with ``config`` until the block ends; yields its URL once it answers."""
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = tmp_path / "orthanc.log"
    assert ORTHANC is not None
    with log.open("wb") as out:
        process = subprocess.Popen([ORTHANC, str(config_path)], cwd=tmp_path, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{config['HttpPort']}"
    try:
        _wait(lambda: _answers(base), process, "Orthanc", log)
        yield base
    finally:
        _stop(process)


@pytest.fixture()
def orthanc(tmp_path: Path, sorter_listen: int) -> Iterator[str]:
    """A throwaway Orthanc on loopback that knows ``sorter listen`` as modality ``sorter``; yields its URL."""
    with _running_orthanc(tmp_path, _orthanc_config(tmp_path, free_port(), sorter_listen)) as base:
        yield base


def _write_files(folder: Path) -> tuple[list[Path], list[str], str]:
    """One study of CT_small copies (files, SOP Instance UIDs, Study Instance UID), and an MR in another."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    files, uids = [], []
    for i in range(STUDY_COPIES):
        ds = pydicom.dcmread(data_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        files.append(folder / f"ct{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    other = pydicom.dcmread(data_file("MR_small_jp2klossless.dcm"))  # another study, not pushed
    other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    files.append(folder / "mr.dcm")
    other.save_as(files[-1], enforce_file_format=True)
    return files, uids, str(study)


def _done(url: str) -> list[Any]:
    try:
        return query(url, "SELECT sop_instance_uid, status, calling_ae, prediction_id FROM instances")
    except sa.exc.OperationalError:  # not migrated yet, or locked for a moment
        return []


def test_orthanc_pushes_a_study_and_every_instance_is_classified(
    tmp_path: Path, orthanc: str, sqlite_url: str
) -> None:
    files, uids, study_uid = _write_files(tmp_path / "upload")
    parents = {_http(orthanc, "POST", "/instances", f.read_bytes())["ParentStudy"] for f in files}
    assert len(parents) == 2
    (found,) = _http(orthanc, "POST", "/tools/lookup", study_uid.encode())
    study_id = found["ID"]
    assert found["Type"] == "Study" and study_id in parents
    assert len(_http(orthanc, "GET", f"/studies/{study_id}/instances")) == STUDY_COPIES

    body = json.dumps({"Resources": [study_id], "Synchronous": True}).encode()
    job = _http(orthanc, "POST", "/modalities/sorter/store", body, timeout_s=60)
    assert job.get("FailedInstancesCount", 0) == 0 and job.get("InstancesCount") == STUDY_COPIES, job

    deadline = time.monotonic() + 30
    while True:
        rows = {r.sop_instance_uid: r for r in _done(sqlite_url)}
        if all(u in rows and rows[u].status == "done" for u in uids) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert sorted(rows) == sorted(uids), "the pushed study's instances, and nothing else"
    for uid in uids:
        assert rows[uid].status == "done" and rows[uid].prediction_id is not None, rows[uid]
        assert rows[uid].calling_ae == ORTHANC_AE


def _received(url: str) -> set[str]:
    return {r.sop_instance_uid for r in _done(url)}


AUTOROUTE = Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "autoroute.lua"


def test_the_shipped_autoroute_forwards_and_retries_while_the_listener_is_down(
    tmp_path: Path, sqlite_url: str, tiny_model: Path
) -> None:
    """deploy/orthanc/autoroute.lua in a real Orthanc: a store that fails while sorter listen is
    down is resubmitted once it is back (on Orthanc < 1.11.1, which has no heartbeat, when the
    next instance arrives), and nothing is lost."""
    port, http_port = free_port(), free_port()
    config = _orthanc_config(tmp_path, http_port, port) | {
        "LuaScripts": [str(AUTOROUTE)],
        "LuaHeartBeatPeriod": 1,
        "JobsHistorySize": 100,
        "SorterRetryDelay": 1,
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    files, uids, _study = _write_files(tmp_path / "upload")
    olog, slog = tmp_path / "orthanc.log", tmp_path / "sorter-listen.log"
    assert ORTHANC is not None
    with olog.open("wb") as out:
        orthanc = subprocess.Popen(
            [ORTHANC, str(tmp_path / "orthanc.json")], cwd=tmp_path, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{http_port}"
    listener = None
    try:
        _wait(lambda: _answers(base), orthanc, "Orthanc", olog)
        _http(base, "POST", "/instances", files[0].read_bytes())  # the listener is not running yet

        def failed() -> bool:
            jobs = _http(base, "GET", "/jobs?expand")
            return any(j["Type"] == "DicomModalityStore" and j["State"] == "Failure" for j in jobs)

        _wait(failed, orthanc, "a failed store job", olog)
        env = listen_env(OUR_AE, port, tmp_path / "spool", sqlite_url, tiny_model, ORTHANC_AE)
        with slog.open("wb") as out:
            listener = subprocess.Popen(
                [sys.executable, "-m", "sorter", "listen"], env=env, stdout=out, stderr=out
            )
        _wait(lambda: _port_open(port), listener, "sorter listen", slog, timeout_s=60)
        time.sleep(1.5)  # past SorterRetryDelay
        _http(base, "POST", "/instances", files[1].read_bytes())  # a new arrival also triggers retries
        deadline = time.monotonic() + 60
        while _received(sqlite_url) != set(uids[:2]) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _received(sqlite_url) == set(uids[:2]), olog.read_text()[-3000:]
    finally:
        _stop(orthanc)
        if listener is not None:
            _stop(listener)


def _forward_rule(name: str, config: dict[str, Any]) -> str:
    """A rule that forwards every classified instance to the Orthanc of ``config``."""
    return (
        f'[[rule]]\nname = "{name}"\n[rule.forward]\n'
        f'ae_title = "{ORTHANC_AE}"\nhost = "127.0.0.1"\nport = {config["DicomPort"]}\n'
    )


def test_orthanc_as_a_forward_destination_receives_each_instance_once(tmp_path, sqlite_url, tiny_model):
    """`[rule.forward]` to a real Orthanc: every classified instance arrives, in its own transfer
    syntax, and a re-scan with the same rules sends nothing twice."""
    config = _orthanc_config(tmp_path, free_port(), free_port())
    rules = tmp_path / "forward.toml"
    rules.write_text('mode = "all"\n' + _forward_rule("to-orthanc", config))
    drop = tmp_path / "drop"
    small_archive(drop)
    with _running_orthanc(tmp_path, config) as base:
        scan(sqlite_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
        scan(sqlite_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
        stored = _http(base, "GET", "/statistics")
        uids = {
            _http(base, "GET", f"/instances/{orthanc_id}/simplified-tags")["SOPInstanceUID"]
            for orthanc_id in _http(base, "GET", "/instances")
        }
    expected = {
        uid for (uid,) in query(sqlite_url, "SELECT sop_instance_uid FROM instances WHERE status = 'done'")
    }
    assert uids == expected and len(expected) == 7
    assert stored["CountInstances"] == 7
    assert query(sqlite_url, "SELECT DISTINCT status, attempts FROM rule_actions") == [("done", 1)]


def test_the_series_verdict_is_written_back_into_orthanc(tmp_path, sqlite_url, tiny_model):
    """`[rule.orthanc]`: once a series is complete its verdict is Orthanc metadata of the series,
    found by its UID (no patient identifier travels)."""
    config = _orthanc_config(tmp_path, free_port(), free_port()) | {"UserMetadata": {"SorterVerdict": 1024}}
    rules = tmp_path / "orthanc.toml"
    rules.write_text(
        'mode = "all"\n'
        + _forward_rule("store", config)
        + '[[rule]]\nname = "verdict"\n[rule.orthanc]\n'
        + f'url = "http://127.0.0.1:{config["HttpPort"]}"\nquiet_s = 0\n'
    )
    drop = tmp_path / "drop"
    small_archive(drop)
    with _running_orthanc(tmp_path, config) as base:
        scan(sqlite_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
        # A verdict tried before its series had reached Orthanc waits for its backoff: at once now.
        sorter("rules", "apply", "--retry-now", str(rules), url=sqlite_url)
        written = {}
        for series_id in _http(base, "GET", "/series"):
            uid = _http(base, "GET", f"/series/{series_id}")["MainDicomTags"]["SeriesInstanceUID"]
            written[uid] = _http_text(base, f"/series/{series_id}/metadata/SorterVerdict")
    series = dict(
        query(
            sqlite_url,
            "SELECT series_instance_uid, verdict FROM series_summary",
        )
    )
    assert set(written) == set(series) and len(series) == 3
    for uid, text in written.items():
        assert text.startswith(f"{series[uid]}: header ") and "instances disagree" in text
    assert query(sqlite_url, "SELECT DISTINCT rule, status FROM rule_actions ORDER BY rule") == [
        ("store", "done"),
        ("verdict", "done"),
    ]


def _http_text(base: str, path: str) -> str:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.read().decode()
