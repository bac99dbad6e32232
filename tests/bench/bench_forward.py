"""Forward rules: C-STORE throughput to 1 and 4 dcmtk storescp destinations, the delay from receipt
to forward, and what forwarding costs the listener's receive rate.

Run: .venv/bin/python tests/bench/bench_forward.py [--files 400] [--listener-files 300]
         [--concurrency 4] [--out tests/bench/results-forward-2core.json]

1. Throughput. ``--files`` copies of pydicom's CT_small.dcm (fresh UIDs, series of 20) are
   scanned into a fresh SQLite database (bundled model, no rules). Then, for D in 1 and 4, D
   storescp processes are started and a rules file with D rules (mode all) forwards every
   instance to each: the forwards are queued and a service's sender process (one thread per
   destination, :class:`sorter.rules.delivery.DeliveryProcess`) is timed until all are done:
   C-STOREs/s = files x D / seconds. Each destination's folder is counted: every instance must
   arrive exactly once.
2. The listener. ``tests/bench/bench_listener.py --files N --concurrency C`` runs twice in one
   session, without rules and with ``SORTER_RULES`` forwarding everything to one storescp; the
   ratio of its instances/s is what forwarding costs receiving (issue 16 allows 10 %). From the
   second run's database: the delay from receipt (the spool file's mtime) to forward (the ledger's
   ``updated_at``, written with microseconds).

Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from sorter.db.session import open_database
from sorter.rules.delivery import DeliveryProcess
from sorter.rules.engine import apply_rules
from sorter.rules.spec import load_rules

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _storescp(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["storescp", "-aet", "STORESCP", "+xa", "-od", str(out), str(port)], stdout=sink, stderr=sink
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"storescp did not listen on {port}")


def _rules(path: Path, ports: list[int]) -> Path:
    text = ['mode = "all"']
    for i, port in enumerate(ports):
        text.append(
            f'[[rule]]\nname = "dest-{i}"\n'
            f'[rule.forward]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {port}'
        )
    path.write_text("\n".join(text) + "\n")
    return path


def _archive(root: Path, files: int) -> None:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(files):
        if i % 20 == 0:
            series = generate_uid()
        source.SeriesInstanceUID = series
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = root / f"s{i // 20:03d}" / f"{i:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        source.save_as(path)


def throughput(work: Path, files: int) -> list[dict[str, Any]]:
    """Part 1: scan once, then forward everything to 1 and to 4 destinations."""
    archive, url = work / "archive", f"sqlite:///{work / 'forward.db'}"
    _archive(archive, files)
    subprocess.run(
        [sys.executable, "-m", "sorter", "scan", "--no-progress", "--database-url", url, str(archive)],
        check=True,
        capture_output=True,
    )
    engine, sessions = open_database(url)
    rows = []
    try:
        for destinations in (1, 4):
            ports: list[int] = []
            while len(ports) < destinations:  # the OS may hand out a port just released again
                if (port := _free_port()) not in ports:
                    ports.append(port)
            outs = [work / f"received-{destinations}-{i}" for i in range(destinations)]
            processes = [
                _storescp(p, o, work / f"storescp-{p}.log") for p, o in zip(ports, outs, strict=True)
            ]
            rules_path = _rules(work / f"forward-{destinations}.toml", ports)
            rules = load_rules(rules_path)
            with engine.begin() as connection:  # the previous round's ledger: forward everything again
                connection.exec_driver_sql("DELETE FROM rule_actions")
            try:
                started = time.perf_counter()
                apply_rules(sessions, rules, deliver=False)  # queue, as a service's batch hook does
                sent: list[Any] = []
                # What listen, watch and scan run: a sender process, a thread per destination in it.
                deliverer = DeliveryProcess(url, rules_path, on_report=sent.append)
                deliverer.start()
                deliverer.wake()
                while sum(sum(r.done.values()) for r in sent) < files * destinations:
                    if time.perf_counter() - started > 600 or any(r.failed or r.dead for r in sent):
                        deliverer.stop()
                        raise SystemExit(f"forwarding did not finish: {[r.line() for r in sent][-3:]}")
                    time.sleep(0.05)
                seconds = time.perf_counter() - started
                deliverer.stop()
            finally:
                for process in processes:
                    process.terminate()
                    process.wait(timeout=30)
            received = [len(list(o.iterdir())) for o in outs]
            assert received == [files] * destinations, received
            rows.append(
                {
                    "destinations": destinations,
                    "instances": files,
                    "seconds": round(seconds, 2),
                    "stores_per_s": round(files * destinations / seconds, 1),
                    "stores_per_s_per_destination": round(files / seconds, 1),
                }
            )
            print(f"  {destinations} destination(s): {rows[-1]['stores_per_s']} C-STOREs/s", flush=True)
    finally:
        engine.dispose()
    return rows


def _listener(work: Path, files: int, concurrency: int, rules: Path | None) -> dict[str, Any]:
    out = work / f"listener-{'rules' if rules else 'plain'}.json"
    keep = work / f"listener-{'rules' if rules else 'plain'}"
    env = {k: v for k, v in os.environ.items() if k != "SORTER_RULES"}
    if rules is not None:
        env["SORTER_RULES"] = str(rules)
    command = [sys.executable, str(HERE / "bench_listener.py"), "--files", str(files)]
    command += ["--concurrency", str(concurrency), "--work", str(keep), "--out", str(out)]
    subprocess.run(command, env=env, check=True)
    result: dict[str, Any] = json.loads(out.read_text())["rows"][0]
    if rules is not None:
        result["forward_delay"] = _delays(keep / "listener.db")
    return result


def _delays(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT i.path, r.updated_at FROM rule_actions r JOIN instances i ON i.id = r.instance_id "
            "WHERE r.status = 'done'"
        ).fetchall()
    delays = sorted(
        datetime.fromisoformat(str(at)).replace(tzinfo=UTC).timestamp() - os.stat(path).st_mtime
        for path, at in rows
        if os.path.exists(path)
    )
    if not delays:
        return {"n": 0}
    return {
        "n": len(delays),
        "median_s": round(statistics.median(delays), 2),
        "p95_s": round(delays[int(0.95 * (len(delays) - 1))], 2),
    }


def main() -> None:
    """Both parts; prints and writes JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--listener-files", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-forward.json"))
    args = parser.parse_args()
    if shutil.which("storescp") is None or shutil.which("storescu") is None:
        raise SystemExit("dcmtk's storescp and storescu must be on PATH")
    work = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    try:
        print("forwarding throughput", flush=True)
        rows = throughput(work, args.files)
        print("listener without rules, then forwarding to one storescp", flush=True)
        plain = _listener(work, args.listener_files, args.concurrency, None)
        port = _free_port()
        scp = _storescp(port, work / "listener-received", work / "storescp-listener.log")
        try:
            forwarding = _listener(
                work, args.listener_files, args.concurrency, _rules(work / "one.toml", [port])
            )
        finally:
            scp.terminate()
            scp.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = round(forwarding["instances_per_s"] / plain["instances_per_s"], 3)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "forward": rows,
        "listener": {
            "plain": plain,
            "forwarding": forwarding,
            "receive_rate_ratio": ratio,
            "note": "ratio = instances/s with SORTER_RULES forwarding everything / without; same session",
        },
    }
    print(f"listener receive rate with forwarding / without: {ratio}")
    print(f"delay from receipt to forward: {forwarding.get('forward_delay')}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
