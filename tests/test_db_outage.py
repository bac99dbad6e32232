"""A PostgreSQL outage in the middle of a push to a real ``sorter listen``: nothing lost, nothing twice.

The test runs its own throwaway PostgreSQL cluster (``initdb`` in a temporary
folder, on a free port) so that it can stop it with ``pg_ctl stop -m immediate``
(a crash, as far as clients can tell) while C-STOREs are arriving, then start it
again. PostgreSQL refuses to run as root: as root, the cluster is run as the
``postgres`` user through ``runuser``. Skipped, with the reason, when the server
binaries, that user or ``runuser`` are missing.

Every process started here (the listener and its decode process, the
postmaster and its backends) runs in its own process group with its output in
files, and is killed with its group in teardown.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from db_support import query
from pydicom.uid import generate_uid
from pynetdicom import AE
from support import data_file, free_port, listen_env, start_listen, stop_process_group, wait_for_port

from sorter.db.session import create_db_engine, upgrade
from sorter.scu import c_store

pytest_plugins = ["db_fixtures"]

PG_BIN = Path(os.environ.get("SORTER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
OUR_AE = "SORTER"
CALLING_AE = "MODALITY1"
#: Instances sent before the outage, and during it (one association throughout).
BEFORE, DURING = 8, 8
#: ``sorter listen`` registers files a sweep finds only once they are this old
#: (``--sweep-grace``), and reconnects to the database every 10 s.
LISTEN_GRACE_S = 5
SWEEP_INTERVAL_S = "2"


class Cluster:
    """A PostgreSQL cluster of our own in a temporary folder, run as a non-root user when we are root."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = port
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            owner = pwd.getpwnam(self.user)
            os.chown(root, owner.pw_uid, owner.pw_gid)

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [str(PG_BIN / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        with (self.root / "commands.log").open("ab") as out:
            # pg_ctl's postmaster writes to -l; its own output goes to a file, never our pipes.
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=self.root,
                start_new_session=True,
            )
        if result.returncode != 0:
            pytest.fail(f"{' '.join(args)} failed ({result.returncode}):\n{self.output()}")

    def output(self) -> str:
        text = ""
        for name in ("commands.log", "postgres.log"):
            path = self.root / name
            if path.exists():
                text += f"--- {name}\n{path.read_text(errors='replace')[-3000:]}\n"
        return text

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: every backend dies at once, no checkpoint."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def destroy(self) -> None:
        """Stop the cluster whatever its state, kill what is left of it, remove its folder."""
        if self.postmaster_pid() is not None:
            with contextlib.suppress(Exception):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        pid = self.postmaster_pid()  # still there: the stop failed; kill its group and it
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


def _skip_reason() -> str | None:
    for binary in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / binary).is_file():
            return f"PostgreSQL server binaries not found in {PG_BIN} (set SORTER_TEST_PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run initdb/pg_ctl as"
        if shutil.which("runuser") is None:
            return "running as root without runuser to run initdb/pg_ctl as the 'postgres' user"
    return None


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    """A migrated cluster on a free port; always stopped and removed afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp_path: its parents are private to root, and postgres must reach the folder.
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="sorter-pg-")), free_port())
    try:
        cluster.init()
        cluster.start()
        engine = create_db_engine(cluster.url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield cluster
    finally:
        cluster.destroy()


def listen(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``sorter listen`` with ``env`` in a session of its own, its output appended to ``log``."""
    with log.open("ab") as out:
        return start_listen(env, out, subprocess.STDOUT)


def _datasets(count: int) -> list[pydicom.Dataset]:
    """Real small CT and MR files under fresh UIDs."""
    out: list[pydicom.Dataset] = []
    for i in range(count):
        ds = pydicom.dcmread(data_file("CT_small.dcm" if i % 2 else "MR_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        out.append(ds)
    return out


def _count(url: str, sql: str) -> int | None:
    """The value of a count, or ``None`` while the database is unreachable."""
    try:
        return int(query(url, sql)[0][0])
    except sa.exc.OperationalError:
        return None


def _wait(url: str, sql: str, want: int, timeout: float, why: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = _count(url, sql)
        if value == want:
            return
        time.sleep(0.5)
    pytest.fail(f"{why}: {sql!r} is {value}, not {want}:\n{log.read_text(errors='replace')[-4000:]}")


def test_a_postgres_crash_mid_push_loses_nothing_and_each_instance_is_classified_once(
    tmp_path: Path, cluster: Cluster, tiny_model: Path
) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    log = tmp_path / "listen.log"
    env = {
        **listen_env(OUR_AE, port, spool, cluster.url, tiny_model, CALLING_AE),
        "SORTER_SWEEP_INTERVAL": SWEEP_INTERVAL_S,
        "SORTER_SWEEP_GRACE": str(LISTEN_GRACE_S),
    }
    datasets = _datasets(BEFORE + DURING)
    listener = listen(env, log)
    try:
        wait_for_port(port, listener, timeout=90, log=log)
        ae = AE(ae_title=CALLING_AE)
        for ds in datasets[:2]:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE)
        assert assoc.is_established
        try:
            statuses = [int(c_store(assoc, ds).Status) for ds in datasets[:BEFORE]]
            # The first part reached the database before the crash.
            _wait(cluster.url, "SELECT count(*) FROM instances", BEFORE, 60, "not registered", log)
            cluster.crash()
            assert _count(cluster.url, "SELECT 1") is None  # it is down
            statuses += [int(c_store(assoc, ds).Status) for ds in datasets[BEFORE:]]
        finally:
            assoc.release()
        assert statuses == [0x0000] * len(datasets)  # every C-STORE succeeded, during the outage too
        spooled = sorted(spool.rglob("*.dcm"))
        assert len(spooled) == len(datasets)  # and every file is kept in the spool
        assert listener.poll() is None, log.read_text(errors="replace")[-4000:]

        time.sleep(2)  # the listener notices the outage (its registration fails) while the server is down
        cluster.start()
        # Reconnection (every 10 s), then a sweep once the files are past the grace period.
        done = "SELECT count(*) FROM instances WHERE status = 'done' AND prediction_id IS NOT NULL"
        _wait(cluster.url, done, len(datasets), LISTEN_GRACE_S + 90, "not all classified", log)
    finally:
        stop_process_group(listener)
    assert listener.returncode == 143, log.read_text(errors="replace")[-4000:]  # clean SIGTERM stop

    rows = query(cluster.url, "SELECT sop_instance_uid, status, path FROM instances")
    assert sorted(r.sop_instance_uid for r in rows) == sorted(str(ds.SOPInstanceUID) for ds in datasets)
    assert {r.status for r in rows} == {"done"}
    assert sorted(r.path for r in rows) == [str(p) for p in sorted(spool.rglob("*.dcm"))]
    assert _count(cluster.url, "SELECT count(*) FROM predictions") == len(datasets)
    twice = (
        "SELECT count(*) FROM (SELECT instance_id FROM predictions GROUP BY instance_id"
        " HAVING count(*) > 1) AS d"
    )
    assert _count(cluster.url, twice) == 0
    assert len(sorted(spool.rglob("*.dcm"))) == len(datasets)  # classified files stay in the spool
