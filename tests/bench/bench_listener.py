"""Listener throughput: instances/s received over DICOM and the delay until each has a stored prediction.

Run: .venv/bin/python tests/bench/bench_listener.py --files 300 [--concurrency 1 4 16]
     [--work DIR] [--timeout 600] [--out bench-listener.json]

Starts ``python -m sorter listen`` as a child process on a free loopback port
with a fresh SQLite database in a work folder, the bundled default model (no
SORTER_MODEL) and any calling AE allowed (no SORTER_ALLOW_AE). For each
concurrency C: ``--files`` real DICOM files (pydicom's CT_small.dcm under new
UIDs, distinct in every round) are split into C parts, one study/series per
part, and C dcmtk ``storescu`` processes send them at once, each part in one
association. Instances/s is files / wall time of the C senders. Then the
database is polled until every instance of the round has a prediction; the
delay per instance is predictions.created_at (UTC, stored by the database's
CURRENT_TIMESTAMP: whole seconds on SQLite) minus the spool file's mtime, and,
finer grained, the time the poll first saw the prediction minus that mtime.
Prints a table, writes JSON. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

OUR_AE = "SORTER"
POLL_S = 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_round(root: Path, files: int, parts: int) -> tuple[list[Path], set[str]]:
    """``files`` copies of CT_small.dcm under new UIDs in ``parts`` folders (one study/series each)."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folders, uids = [], set()
    for part in range(parts):
        folder = root / f"part{part:02d}"
        folder.mkdir(parents=True)
        folders.append(folder)
        study, series = generate_uid(), generate_uid()
        for i in range(part, files, parts):
            ds = template.copy()
            ds.file_meta = template.file_meta.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.save_as(folder / f"{i:06d}.dcm", enforce_file_format=True)
            uids.add(str(ds.SOPInstanceUID))
    return folders, uids


def wait_for_listener(process: subprocess.Popen[bytes], port: int, timeout_s: float = 120.0) -> float:
    """Seconds until a C-ECHO succeeds (a bare TCP probe would only prove the port is open)."""
    started = time.monotonic()
    while True:
        echo = subprocess.run(
            ["echoscu", "-aec", OUR_AE, "127.0.0.1", str(port)], capture_output=True, timeout=60
        )
        if echo.returncode == 0:
            return time.monotonic() - started
        if process.poll() is not None:
            raise SystemExit(f"sorter listen exited with {process.returncode} before listening")
        if time.monotonic() - started > timeout_s:
            raise SystemExit("sorter listen did not answer a C-ECHO in time")
        time.sleep(0.2)


def send(folders: list[Path], port: int) -> float:
    """One storescu per folder, all at once (one association each); returns the wall time."""
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", f"BENCH{k}", "-aec", OUR_AE, "+sd", "127.0.0.1", str(port), str(folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for k, folder in enumerate(folders)
    ]
    failures = []
    for sender in senders:
        _, err = sender.communicate(timeout=600)
        if sender.returncode != 0:
            failures.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit("storescu failed:\n" + "\n".join(failures))
    return elapsed


def _utc_epoch(value: Any) -> float:
    """``created_at`` as read from SQLite (``YYYY-MM-DD HH:MM:SS``, UTC, no zone) to epoch seconds."""
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def wait_for_predictions(db: Path, uids: set[str], timeout_s: float) -> dict[str, tuple[float, float]]:
    """Poll until every uid has a prediction: uid -> (created_at epoch, epoch first seen by the poll)."""
    seen: dict[str, tuple[float, float]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(uids):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {len(seen)} of {len(uids)} instances had a prediction after {timeout_s} s"
            )
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
                rows = connection.execute(
                    "SELECT i.sop_instance_uid, p.created_at FROM instances i "
                    "JOIN predictions p ON p.id = i.prediction_id"
                ).fetchall()
        except sqlite3.OperationalError:  # no database or no tables yet, or locked
            rows = []
        now = time.time()
        for uid, created in rows:
            if uid in uids and uid not in seen:
                seen[uid] = (_utc_epoch(created), now)
        time.sleep(POLL_S)
    return seen


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def run_round(
    work: Path, spool: Path, db: Path, port: int, files: int, concurrency: int, timeout_s: float
) -> dict[str, Any]:
    folders, uids = build_round(work / f"round-c{concurrency}", files, concurrency)
    # Polled from before the first store, so that "first seen" is not bounded below by the end of sending.
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(wait_for_predictions, db, uids, timeout_s)
        seconds = send(folders, port)
        predictions = polling.result()
    received = {p.stem: p.stat().st_mtime for p in spool.rglob("*.dcm") if p.stem in uids}
    missing = uids - received.keys()
    if missing:
        raise SystemExit(f"{len(missing)} instances of round {concurrency} are not in the spool")
    by_created = [predictions[uid][0] - received[uid] for uid in uids]
    by_poll = [predictions[uid][1] - received[uid] for uid in uids]
    return {
        "concurrency": concurrency,
        "files": files,
        "seconds": round(seconds, 2),
        "instances_per_s": round(files / seconds, 1),
        "median_delay_s": round(statistics.median(by_created), 2),
        "p95_delay_s": round(_p95(by_created), 2),
        "min_delay_s": round(min(by_created), 2),  # below 0: created_at truncated to the second
        "max_delay_s": round(max(by_created), 2),
        "median_delay_polled_s": round(statistics.median(by_poll), 2),
        "p95_delay_polled_s": round(_p95(by_poll), 2),
        "max_delay_polled_s": round(max(by_poll), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=300, help="instances sent per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for a round's predictions"
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--out", type=Path, default=Path("bench-listener.json"))
    args = parser.parse_args()
    if shutil.which("storescu") is None or shutil.which("echoscu") is None:
        raise SystemExit("dcmtk's storescu and echoscu must be on PATH")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-listener-"))
    work.mkdir(parents=True, exist_ok=True)
    spool, db, port = work / "spool", work / "listener.db", _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SORTER_MODEL", "SORTER_ALLOW_AE")}
    env.update(
        {
            "SORTER_AE_TITLE": OUR_AE,
            "SORTER_PORT": str(port),
            "SORTER_BIND": "127.0.0.1",
            "SORTER_SPOOL": str(spool),
            "SORTER_MIN_FREE_MB": "1",
            "SORTER_DATABASE_URL": f"sqlite:///{db}",
            # 16 senders at once: the default limit (10) would reject some associations.
            "SORTER_MAX_ASSOCIATIONS": str(max(10, *args.concurrency)),
        }
    )
    log = (work / "listener.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "sorter", "listen"], env=env, stdout=log, stderr=log)
    rows = []
    returncode: int | None = None
    try:
        startup_s = wait_for_listener(process, port)
        print(f"sorter listen accepting on port {port} after {startup_s:.1f} s", flush=True)
        for concurrency in args.concurrency:
            row = run_round(work, spool, db, port, args.files, concurrency, args.timeout)
            rows.append(row)
            print(
                f"  c={concurrency:<3} {row['instances_per_s']:>7} instances/s  "
                f"delay median {row['median_delay_s']} s p95 {row['p95_delay_s']} s",
                flush=True,
            )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                returncode = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = process.wait()
        else:
            returncode = process.returncode
        log.close()
        if returncode != 0:
            print((work / "listener.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nmachine: {machine}; listener exit status after SIGTERM: {returncode}")
    header = ("concurrency", "files", "seconds", "instances/s", "median delay s", "p95 delay s")
    header += ("median polled s", "p95 polled s")
    print("  ".join(f"{h:>15}" for h in header))
    values = ("concurrency", "files", "seconds", "instances_per_s", "median_delay_s", "p95_delay_s")
    values += ("median_delay_polled_s", "p95_delay_polled_s")
    for row in rows:
        print("  ".join(f"{row[k]:>15}" for k in values))
    result = {
        "machine": machine,
        "python": sys.version.split()[0],
        "model": "bundled default",
        "database": "sqlite",
        "startup_s": round(startup_s, 1) if rows else None,
        "listener_exit_status": returncode,
        "delay_note": "created_at - spool mtime; created_at has 1 s resolution on SQLite, "
        "*_polled_s use the time a 0.1 s poll first saw the prediction",
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
