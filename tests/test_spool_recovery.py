"""The spool after outages and crashes: attribution kept, registration at once, temporary files.

- Each received file carries its calling AE title in its own File Meta
  Information ((0002,0016) Source Application Entity Title, as dcmtk's
  storescp writes it), so a sweep that finds a file the queue lost registers
  it with its sender, and need not wait for it to age.
- After a PostgreSQL crash (our own cluster, as in ``test_db_outage``) and
  after a ``kill -9`` of ``sorter listen``, everything received is registered
  as soon as the database is back or the listener restarted, with its
  calling AE, not at the next periodic sweep.
- ``sorter scan`` of a spool ignores the listener's temporary files, and the
  listener removes those a crash left behind.

Real associations on loopback (pynetdicom as the sender), real PostgreSQL,
real ``sorter listen`` processes, killed with their process group.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from db_support import query, scan, truncate
from pydicom.uid import generate_uid
from pynetdicom import AE
from support import free_port, listen_env, stop_process_group, wait_for_port

# The crashable PostgreSQL cluster of the outage tests (fixture ``cluster``).
from test_db_outage import Cluster, _datasets, cluster, listen  # noqa: F401

from sorter import listener
from sorter.commands.listen import backend
from sorter.config import Settings
from sorter.dicom.storage import is_temporary_name, store_instance
from sorter.scu import c_store
from sorter.spool import SpoolWorker
from sorter.summary import RunSummary

pytest_plugins = ["db_fixtures"]

OUR_AE = "SORTER"
CALLING_AE = "MODALITY1"
#: The production defaults, set explicitly: a sweep every 5 minutes, 60 s of grace.
SWEEP_ENV = {"SORTER_SPOOL_SWEEP_INTERVAL": "300", "SORTER_SWEEP_GRACE": "60"}
#: How long after the database is back (or the listener restarted) everything must be registered:
#: the listener retries the database every 10 s, then loads the model; far below the 300 s sweep.
RECOVERY_S = 45.0
HOUR_NS = 3600 * 10**9


def _send(port: int, datasets: list[pydicom.Dataset], calling: str = CALLING_AE) -> list[int]:
    ae = AE(ae_title=calling)
    for ds in datasets[:2]:  # CT_small and MR_small: every SOP class and syntax used here
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE)
    assert assoc.is_established
    try:
        return [int(c_store(assoc, ds).Status) for ds in datasets]
    finally:
        assoc.release()


def _count(url: str, sql: str) -> int | None:
    """The value of a count, or ``None`` while the database is unreachable."""
    try:
        return int(query(url, sql)[0][0])
    except sa.exc.OperationalError:
        return None


def _wait_count(url: str, sql: str, want: int, timeout: float, log: Path) -> float:
    """Seconds until ``sql`` counts ``want``; fails with the listener's log after ``timeout``."""
    started = time.monotonic()
    value = None
    while time.monotonic() - started < timeout:
        value = _count(url, sql)
        if value == want:
            return time.monotonic() - started
        time.sleep(0.25)
    pytest.fail(
        f"{sql!r} is {value}, not {want}, {timeout:.0f} s on:\n{log.read_text(errors='replace')[-4000:]}"
    )


def _part10(ds: pydicom.Dataset, calling_ae: str | None = None) -> bytes:
    """``ds`` as a Part 10 file, with the calling AE in its meta as the listener records it, or none."""
    if calling_ae is not None:
        ds.file_meta.SourceApplicationEntityTitle = calling_ae
    elif "SourceApplicationEntityTitle" in ds.file_meta:  # pydicom's test files name their author
        del ds.file_meta.SourceApplicationEntityTitle
    encoded = pydicom.filebase.DicomBytesIO()
    pydicom.dcmwrite(encoded, ds, enforce_file_format=True)
    return encoded.getvalue()


def _recorded_ae(path: Path) -> str | None:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.get("SourceApplicationEntityTitle")


def _temporary(folder: Path, final: str, age_s: float = 0.0, data: bytes = b"partial") -> Path:
    """A temporary file named as ``store_instance`` names them (``.<final>.XXXXXXXX.part``)."""
    fd, name = tempfile.mkstemp(prefix=f".{final}.", suffix=".part", dir=folder)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    if age_s:
        then = time.time() - age_s
        os.utime(name, (then, then))
    return Path(name)


@pytest.fixture()
def pg_url(postgres_database: str) -> str:
    """The session's PostgreSQL database, emptied."""
    truncate(postgres_database)
    return postgres_database


# --- (5) attribution in the file, registration at once ---------------------------------------------


def test_each_received_file_records_its_calling_ae_and_a_resend_from_another_ae_rewrites_nothing(
    tmp_path: Path,
) -> None:
    config = listener.ListenerConfig(
        OUR_AE, free_port(), tmp_path / "spool", bind="127.0.0.1", min_free_bytes=0, timeout_s=10.0
    )
    offered: list[tuple[Path, str]] = []
    datasets = _datasets(2)
    server = listener.start(config, lambda path, ae: offered.append((path, ae)))
    try:
        assert _send(config.port, datasets) == [0, 0]
        first = {path: path.stat().st_ino for path, _ in offered}
        assert _send(config.port, datasets, calling="PACS") == [0, 0]  # the same instances, another sender
        datasets[1].StationName = "CHANGED"
        assert _send(config.port, datasets[1:], calling="PACS") == [0]  # a correction replaces the copy
    finally:
        server.shutdown()

    assert [ae for _, ae in offered] == [CALLING_AE, CALLING_AE, "PACS", "PACS", "PACS"]
    unchanged, changed = (next(p for p in first if p.name == f"{ds.SOPInstanceUID}.dcm") for ds in datasets)
    assert _recorded_ae(unchanged) == CALLING_AE  # as dcmtk's storescp records it
    assert unchanged.stat().st_ino == first[unchanged]  # identical data set: nothing rewritten
    assert _recorded_ae(changed) == "PACS" and changed.stat().st_ino != first[changed]  # the newer copy won
    for ds, path in zip(datasets, (unchanged, changed), strict=True):  # the data set is stored as sent
        stored = pydicom.dcmread(path)
        assert stored == ds and stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_after_a_kill_9_the_restart_registers_what_was_unregistered_at_once_with_its_calling_ae(
    tmp_path: Path, pg_url: str, tiny_model: Path
) -> None:
    """The queue dies with the process; the start-up sweep must not wait for the files to age."""
    spool = tmp_path / "spool"
    log = tmp_path / "listen.log"
    port = free_port()
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/absent"
    env = {**listen_env(OUR_AE, port, spool, unreachable, tiny_model, CALLING_AE), **SWEEP_ENV}
    process = listen(env, log)
    try:
        wait_for_port(port, process, timeout=90, log=log)
        assert _send(port, _datasets(6)) == [0] * 6  # stored; registration cannot happen
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    spooled = sorted(spool.rglob("*.dcm"))
    assert len(spooled) == 6
    for path in spooled[:2]:  # two of them were received long ago (an outage of hours)
        then = time.time() - 7200
        os.utime(path, (then, then))

    process = listen({**env, "SORTER_DATABASE_URL": pg_url}, log)
    try:
        delay = _wait_count(pg_url, "SELECT count(*) FROM instances", 6, RECOVERY_S, log)
        done = "SELECT count(*) FROM instances WHERE status = 'done'"
        _wait_count(pg_url, done, 6, RECOVERY_S, log)
    finally:
        stop_process_group(process)
    print(f"registered {delay:.1f} s after the restart")
    rows = query(pg_url, "SELECT calling_ae, source, path FROM instances")
    assert {(r.calling_ae, r.source) for r in rows} == {(CALLING_AE, CALLING_AE)}
    assert sorted(r.path for r in rows) == [str(p) for p in spooled]


def test_after_a_postgres_crash_files_received_during_it_are_registered_at_reconnect_with_their_ae(
    tmp_path: Path,
    cluster: Cluster,  # noqa: F811 (the fixture imported above)
    tiny_model: Path,
) -> None:
    before, during = 4, 10
    spool = tmp_path / "spool"
    log = tmp_path / "listen.log"
    port = free_port()
    env = {**listen_env(OUR_AE, port, spool, cluster.url, tiny_model, CALLING_AE), **SWEEP_ENV}
    datasets = _datasets(before + during)
    process = listen(env, log)
    try:
        wait_for_port(port, process, timeout=90, log=log)
        assert _send(port, datasets[:before]) == [0] * before
        _wait_count(cluster.url, "SELECT count(*) FROM instances", before, 60, log)
        cluster.crash()
        assert _send(port, datasets[before:]) == [0] * during  # stored while the database is down
        time.sleep(2)  # the listener's registration fails: it drops its queue and retries
        cluster.start()
        delay = _wait_count(cluster.url, "SELECT count(*) FROM instances", before + during, RECOVERY_S, log)
        done = "SELECT count(*) FROM instances WHERE status = 'done' AND prediction_id IS NOT NULL"
        _wait_count(cluster.url, done, before + during, RECOVERY_S, log)
    finally:
        stop_process_group(process)
    print(f"registered {delay:.1f} s after the database came back")
    assert process.returncode == 143, log.read_text(errors="replace")[-4000:]  # clean SIGTERM stop
    rows = query(cluster.url, "SELECT sop_instance_uid, calling_ae, source FROM instances")
    assert sorted(r.sop_instance_uid for r in rows) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert {(r.calling_ae, r.source) for r in rows} == {(CALLING_AE, CALLING_AE)}
    twice = (
        "SELECT count(*) FROM (SELECT instance_id FROM predictions GROUP BY instance_id"
        " HAVING count(*) > 1) AS d"
    )
    assert _count(cluster.url, twice) == 0


def test_a_sweep_still_waits_for_young_files_without_a_recorded_calling_ae(
    tmp_path: Path, pg_url: str, tiny_model: Path
) -> None:
    """``--sweep-grace`` now guards only files that do not carry their sender (written by older versions)."""
    spool = tmp_path / "spool"
    recorded, legacy = _datasets(2)
    for ds, ae in ((recorded, CALLING_AE), (legacy, None)):
        store_instance(spool, _part10(ds, ae), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    settings = Settings.from_env(database_url=pg_url, model=tiny_model, workers=1, device="cpu")
    worker = SpoolWorker(spool, backend(settings, RunSummary()), grace_s=60.0)
    worker.start()  # its start-up sweep
    worker.stop(timeout=120)
    rows = query(pg_url, "SELECT sop_instance_uid, calling_ae FROM instances")
    assert [tuple(r) for r in rows] == [(str(recorded.SOPInstanceUID), CALLING_AE)]


# --- (7) temporary files ------------------------------------------------------------------------


def test_scan_of_a_spool_ignores_the_listeners_temporary_files(
    tmp_path: Path, pg_url: str, tiny_model: Path
) -> None:
    spool = tmp_path / "spool"
    ds = _datasets(1)[0]
    data = _part10(ds, CALLING_AE)
    final = store_instance(spool, data, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    other = f"{generate_uid()}.dcm"
    temporaries = [
        _temporary(final.parent, other, data=data.replace(str(ds.SOPInstanceUID).encode(), b"9" * 10)),
        _temporary(final.parent, other, data=data[: len(data) // 2]),  # half written
        _temporary(final.parent, final.name, age_s=7200, data=data),  # left by a crash
    ]

    assert [p for p in temporaries if not is_temporary_name(p.name)] == []  # named as the listener names them

    summary = scan(pg_url, tiny_model, spool, tmp=tmp_path)
    assert summary["files"] == 1
    assert all(p.exists() for p in temporaries)  # a scan reads, never removes
    rows = query(pg_url, "SELECT path, status FROM instances")
    assert [tuple(r) for r in rows] == [(str(final), "done")]
    assert [r.path for r in query(pg_url, "SELECT path FROM files")] == [str(final)]


def test_the_listener_removes_stale_temporary_files_at_start_even_while_the_database_is_down(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    folder = spool / "1.2.3" / "1.2.3.4"
    folder.mkdir(parents=True)
    stale = [_temporary(folder, "1.2.3.4.5.dcm", age_s=7200), _temporary(spool, "1.2.3.4.6.dcm", age_s=7200)]
    young = _temporary(folder, "1.2.3.4.7.dcm", age_s=60)  # another listener may be writing it
    others = [folder / "notes.part", folder / ".hidden.dcm"]  # not ours: never touched
    for path in others:
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 7200,) * 2)

    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/absent"
    settings = Settings.from_env(database_url=unreachable, workers=1, device="cpu")
    worker = SpoolWorker(spool, backend(settings, RunSummary()), retry_s=0.2)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while any(p.exists() for p in stale) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop(timeout=30)
    assert [p for p in stale if p.exists()] == []
    assert young.exists() and all(p.exists() for p in others)
