"""Reliability under load and bad input: what was sent, acknowledged, stored, registered, classified,
lost, duplicated, and recorded with a reason, per scenario.

Run: .venv/bin/python tests/bench/bench_reliability.py [--files 600] [--scenarios ...]
     [--work DIR] [--out bench-reliability.json]

Scenarios (each on a fresh database and spool):

- ``push-sqlite-cN``: ``sorter listen`` (embedded SQLite, in-process executor, bundled model)
  receives ``--files`` instances from N pynetdicom associations at once (N = 1, 4, 16).
- ``push-broker-c4``: the same into PostgreSQL, with Redis and one ``sorter worker`` classifying.
- ``kill9-listener-c4``: the listener is killed with SIGKILL a third of the way through a push and
  started again; then everything not acknowledged is sent again, as a PACS retries.
- ``zoo-scan``, ``zoo-watch``, ``zoo-cstore``: the bad-input zoo (seeded fuzz of pydicom's
  compressed files, a file that makes pylibjpeg-rle panic, file names that are not UTF-8,
  symlink loops, dangling links, a FIFO, a socket, text files) through ``sorter scan``,
  ``sorter watch`` and C-STORE.

``lost`` = acknowledged (or, for scan/watch, present in the folder) but without a terminal row;
``duplicated`` = SOP Instance UIDs with more than one prediction from the model, or more than one
row; ``recorded`` = rows in a terminal status whose failure or skip has a reason.
Timings are reported, never asserted: this is a benchmark (``tests/`` has the fast cases).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pydicom
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fuzz_support
from fuzz_support import fuzz_archive, panicking_rle

from sorter.scu import c_store

OUR_AE = "SORTER"
TERMINAL = ("done", "failed", "skipped")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    env.update(extra)
    return env


def _listen_env(port: int, spool: Path, url: str, **extra: str) -> dict[str, str]:
    """The environment of a ``sorter listen`` on loopback ``port`` (any calling AE, a 1 MB floor)."""
    return _env(
        SORTER_AE_TITLE=OUR_AE,
        SORTER_PORT=str(port),
        SORTER_BIND="127.0.0.1",
        SORTER_SPOOL=str(spool),
        SORTER_MIN_FREE_MB="1",
        SORTER_DATABASE_URL=url,
        **extra,
    )


def _datasets(root: Path, files: int) -> list[Path]:
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    root.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(files):
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = root / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Listener:
    """``sorter listen`` as a child process."""

    def __init__(self, work: Path, port: int, env: dict[str, str]) -> None:
        self.work, self.port, self.env = work, port, env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.work / "listener.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sorter", "listen"], env=self.env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 120
        while subprocess.run(
            ["echoscu", "-aec", OUR_AE, "127.0.0.1", str(self.port)], capture_output=True, timeout=60
        ).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sorter listen did not start: see {self.work / 'listener.log'}")
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return int(self.process.wait())


def send(paths: list[Path], port: int, associations: int, acked: dict[str, int], stop_on_abort: bool) -> None:
    """Send ``paths`` over ``associations`` pynetdicom associations at once; record each status."""
    from pynetdicom import AE

    lock = threading.Lock()
    unsent: dict[str, int] = {}
    contexts: dict[str, set[str]] = {}  # SOP class -> transfer syntaxes, as the files hold them
    for path in paths:
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
            sop_class, syntax = UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)
        except Exception:  # unreadable here too: the sender skips it below
            continue
        if sop_class.is_valid and syntax.is_valid:  # a bit flip in a UID: pynetdicom cannot offer it
            contexts.setdefault(sop_class, set()).add(syntax)

    def one(part: list[Path], k: int) -> None:
        ae = AE(ae_title=f"BENCH{k}")
        # One context per (class, syntax): the acceptor picks one syntax per context.
        pairs = [(sop_class, syntax) for sop_class, syntaxes in contexts.items() for syntax in syntaxes]
        for sop_class, syntax in pairs[:128]:
            ae.add_requested_context(sop_class, syntax)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AE)
        if not assoc.is_established:
            print(f"association {k} not established", file=sys.stderr)
            return
        for path in part:
            try:
                ds = pydicom.dcmread(path, force=True)
                uid = str(ds.SOPInstanceUID)
            except Exception:  # a fuzzed file the sender itself cannot read: never sent
                with lock:
                    unsent["unreadable"] = unsent.get("unreadable", 0) + 1
                continue
            try:
                status = c_store(assoc, ds)
            except Exception as exc:  # the sender cannot encode it, or its association ended: not sent
                if os.environ.get("BENCH_DEBUG"):
                    print(f"association {k}: {type(exc).__name__}: {exc}", file=sys.stderr)
                with lock:
                    unsent[type(exc).__name__] = unsent.get(type(exc).__name__, 0) + 1
                continue
            code = int(status.Status) if status and "Status" in status else -1
            with lock:
                acked[uid] = code
            if code == -1 and stop_on_abort and not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()

    parts = [paths[k::associations] for k in range(associations)]
    threads = [threading.Thread(target=one, args=(part, k)) for k, part in enumerate(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if unsent:
        print(f"not sent (the sender refused them): {unsent}", file=sys.stderr)


def counts(url: str, uids: set[str] | None = None) -> dict[str, Any]:
    """Rows by status, unrecorded failures and duplicate predictions (restricted to ``uids``)."""
    engine = sa.create_engine(url)
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT sop_instance_uid, status, error, path FROM instances")).all()
        dup = c.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT instance_id FROM predictions "
                "GROUP BY instance_id, model_id HAVING count(*) > 1) d"
            )
        ).scalar_one()
    engine.dispose()
    if uids is not None:
        rows = [r for r in rows if r.sop_instance_uid in uids]
    return {
        "rows": rows,
        "by_status": {s: sum(1 for r in rows if r.status == s) for s in ("pending", *TERMINAL)},
        "no_reason": sum(1 for r in rows if r.status in ("failed", "skipped") and not r.error),
        "duplicate_predictions": int(dup),
    }


def wait_terminal(url: str, uids: set[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = counts(url, uids)
        except sa.exc.OperationalError:
            found = None
        if found is not None:
            terminal = sum(found["by_status"][s] for s in TERMINAL)
            if terminal >= len(uids) or time.monotonic() > deadline:
                return found
        elif time.monotonic() > deadline:
            raise SystemExit(f"no database at {url}")
        time.sleep(0.5)


def _push_row(
    name: str, sent: int, acked: dict[str, int], spool: Path, found: dict[str, Any], s: float
) -> dict[str, Any]:
    ok = {uid for uid, code in acked.items() if code == 0}
    # Spool files (named from the SOP Instance UID, made safe: a mangled UID gets another name).
    stored = [p for p in spool.rglob("*.dcm") if not p.name.startswith(".")]
    registered = {r.sop_instance_uid for r in found["rows"]}
    terminal = {r.sop_instance_uid for r in found["rows"] if r.status in TERMINAL}
    return {
        "scenario": name,
        "sent": sent,
        "acked": len(ok),
        "stored": len(stored),
        "registered": len(registered & ok),
        "classified": found["by_status"]["done"],
        "lost": len(ok - terminal),
        "duplicated": found["duplicate_predictions"],
        "recorded_with_reason": found["by_status"]["failed"]
        + found["by_status"]["skipped"]
        - found["no_reason"],
        "without_reason": found["no_reason"],
        "seconds": round(s, 1),
    }


def push(
    work: Path, files: int, associations: int, broker: dict[str, str] | None, kill9: bool
) -> dict[str, Any]:
    name = ("kill9-listener" if kill9 else "push-broker" if broker else "push-sqlite") + f"-c{associations}"
    work = work / name
    spool, port = work / "spool", _free_port()
    work.mkdir(parents=True)
    url = broker["SORTER_DATABASE_URL"] if broker else f"sqlite:///{work / 'sorter.db'}"
    env = _listen_env(
        port, spool, url, SORTER_MAX_ASSOCIATIONS=str(max(10, associations + 2)), SORTER_SWEEP_GRACE="1"
    )
    env.update(broker or {})
    paths = _datasets(work / "send", files)
    uids = {_uid(p) for p in paths}
    listener = Listener(work, port, env)
    listener.start()
    worker = None
    if broker:
        log = (work / "worker.log").open("ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "sorter", "worker", "--concurrency", "2"], env=env, stdout=log, stderr=log
        )
    acked: dict[str, int] = {}
    started = time.monotonic()
    try:
        if kill9:
            sender = threading.Thread(target=send, args=(paths, port, associations, acked, True))
            sender.start()
            while len(acked) < files // 3 and sender.is_alive():
                time.sleep(0.01)
            listener.kill()
            sender.join()
            before_kill = sum(1 for code in acked.values() if code == 0)
            listener.start()
            # As a PACS retries: everything not acknowledged is sent again, the instance that was
            # stored but whose answer was lost included (it must not be counted twice).
            retry = [p for p in paths if acked.get(_uid(p)) != 0]
            send(retry, port, associations, acked, False)
        else:
            send(paths, port, associations, acked, False)
        ok = {uid for uid, code in acked.items() if code == 0}
        wait_terminal(url, ok, timeout_s=600)
    finally:
        listener.stop()
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    row = _push_row(name, len(acked), acked, spool, counts(url, uids), time.monotonic() - started)
    if kill9:
        row["acked_before_kill"] = before_kill
        row["resent_after_restart"] = len(retry)
    return row


def zoo(root: Path) -> list[socket.socket]:
    """The bad-input zoo under ``root``; returns the bound UNIX sockets (to close afterwards)."""
    fuzz_archive(root / "fuzz", seed=1, per_source=12)
    panicking_rle(root / "panic" / "panic.dcm")
    latin = root / os.fsdecode(b"latin-\xe9")
    latin.mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_small.dcm"), latin / os.fsdecode(b"caf\xe9.dcm"))
    (latin / os.fsdecode(b"notes-\xff.txt")).write_text("not dicom\n")
    links = root / "links"
    links.mkdir()
    (links / "loop").symlink_to("..")
    (links / "self").symlink_to("self")
    (links / "dangling.dcm").symlink_to(root / "nowhere.dcm")
    (links / "null").symlink_to("/dev/null")
    os.mkfifo(links / "fifo")
    (root / "empty.dcm").write_bytes(b"")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(links / "socket"))
    return [server]


def _zoo_entries(root: Path) -> int:
    """Paths a walk reports: files, and each thing that is no file (not followed)."""
    return sum(1 for p in root.rglob("*") if p.is_symlink() or not p.is_dir())


def zoo_scan_or_watch(work: Path, mode: str) -> dict[str, Any]:
    name = f"zoo-{mode}"
    work = work / name
    root = work / "drop"
    sockets = zoo(root)
    url = f"sqlite:///{work / 'sorter.db'}"
    started = time.monotonic()
    try:
        expected = _zoo_entries(root)
        if mode == "scan":
            result = subprocess.run(
                [sys.executable, "-m", "sorter", "scan", "--no-progress", str(root)],
                env=_env(SORTER_DATABASE_URL=url),
                capture_output=True,
                timeout=600,
            )
            exit_status = result.returncode
        else:
            log = (work / "watch.log").open("ab")
            watcher = subprocess.Popen(
                [sys.executable, "-m", "sorter", "watch", "--settle", "0.5", "--rescan", "2", str(root)],
                env=_env(SORTER_DATABASE_URL=url),
                stdout=log,
                stderr=log,
            )
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    found = counts(url)
                    if sum(found["by_status"][s] for s in TERMINAL) >= expected:
                        break
                except sa.exc.OperationalError:
                    pass
                time.sleep(0.5)
            watcher.send_signal(signal.SIGTERM)
            exit_status = watcher.wait(timeout=60)
        found = counts(url)
    finally:
        for server in sockets:
            server.close()
    terminal = sum(found["by_status"][s] for s in TERMINAL)
    return {
        "scenario": name,
        "sent": expected,
        "registered": len(found["rows"]),
        "classified": found["by_status"]["done"],
        "lost": expected - terminal,
        "duplicated": found["duplicate_predictions"],
        "recorded_with_reason": found["by_status"]["failed"]
        + found["by_status"]["skipped"]
        - found["no_reason"],
        "without_reason": found["no_reason"],
        "exit_status": exit_status,
        "seconds": round(time.monotonic() - started, 1),
    }


def zoo_cstore(work: Path) -> dict[str, Any]:
    name = "zoo-cstore"
    work = work / name
    mutants = fuzz_archive(work / "fuzz", seed=2, per_source=12)
    paths = [m.path for m in mutants]
    panic = panicking_rle(work / "panic" / "panic.dcm")
    if panic is not None:
        paths.append(panic)
    spool, port = work / "spool", _free_port()
    url = f"sqlite:///{work / 'sorter.db'}"
    listener = Listener(work, port, _listen_env(port, spool, url))
    listener.start()
    acked: dict[str, int] = {}
    started = time.monotonic()
    try:
        send(paths, port, 2, acked, False)
        ok = {uid for uid, code in acked.items() if code == 0}
        found = wait_terminal(url, ok, timeout_s=300)
    finally:
        exit_status = listener.stop()
    row = _push_row(name, len(acked), acked, spool, found, time.monotonic() - started)
    row["files"] = len(paths)
    row["refused"] = sum(1 for code in acked.values() if code != 0)
    row["exit_status"] = exit_status
    return row


def _broker(work: Path) -> dict[str, str]:
    admin = sa.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/test", isolation_level="AUTOCOMMIT"
    )
    name = f"bench_rel_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return {
        "SORTER_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        "SORTER_BROKER_URL": "redis://127.0.0.1:6379/0",
        "SORTER_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=600, help="instances per push scenario")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["push-sqlite", "push-broker", "kill9-listener", "zoo-scan", "zoo-watch", "zoo-cstore"],
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--out", type=Path, default=Path("bench-reliability.json"))
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    rows: list[dict[str, Any]] = []
    try:
        for scenario in args.scenarios:
            if scenario == "push-sqlite":
                rows += [push(work, args.files, c, None, False) for c in (1, 4, 16)]
            elif scenario == "push-broker":
                rows.append(push(work, args.files, 4, _broker(work), False))
            elif scenario == "kill9-listener":
                rows.append(push(work, args.files, 4, None, True))
            elif scenario in ("zoo-scan", "zoo-watch"):
                rows.append(zoo_scan_or_watch(work, scenario[4:]))
            elif scenario == "zoo-cstore":
                rows.append(zoo_cstore(work))
            else:
                raise SystemExit(f"unknown scenario {scenario}")
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    keys = ("scenario", "sent", "acked", "stored", "registered", "classified", "lost", "duplicated")
    keys += ("recorded_with_reason", "without_reason", "seconds")
    print("  ".join(f"{k:>20}" for k in keys))
    for row in rows:
        print("  ".join(f"{row.get(k, '-')!s:>20}" for k in keys))
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
