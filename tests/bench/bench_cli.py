"""The command-line tools on a large archive: how long ``sorter status``, ``report``,
``discrepancies``, ``find``, ``export`` and ``rules apply`` take on a database of a million
instances, SQLite and PostgreSQL.

Run: .venv/bin/python tests/bench/bench_review.py --db both --requests 3 --warmup 0 --only thumbnail \\
         --work /tmp/bigdb --keep --out /tmp/bigdb/review.json     # the database, once (~3 min)
     .venv/bin/python tests/bench/bench_cli.py --work /tmp/bigdb [--db sqlite|postgresql|both]
         [--repeats 2] [--only CASE,CASE] [--out tests/bench/results-cli-2core.json]

The archive is the review benchmark's (``bench_review.py``: 1 million instances in ~20 000 series
of 20 sources, ~2 % disagreeing, every instance's path one real 512x512 CT file). Each case runs
the real ``sorter`` command in a subprocess, ``--repeats`` times, and reports its wall times (the
process's start-up, about 1.5 s here, included: that is what a user waits for) and the lines it
printed; a case that exits with another status than the expected one is reported as failed, and
its time is not one of a finished run (a run killed at ``--timeout`` is reported so, with
that time). ``rules apply`` files by hard link into the work folder,
so each of its runs gets a fresh copy of the database (SQLite: the backup API; PostgreSQL:
``CREATE DATABASE ... TEMPLATE``), dropped afterwards.

Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_review import ADMIN_URL, drop_postgres_database, machine, server_version

from sorter.db.session import create_db_engine

HERE = Path(__file__).resolve().parent
SORTER = [sys.executable, "-m", "sorter"]

#: name, arguments, exit status expected, whether the command writes (and needs a copy)
CASES: list[tuple[str, list[str], int, bool]] = [
    ("status", ["status"], 0, False),
    ("report", ["report", "--format", "json"], 0, False),
    ("discrepancies instance", ["discrepancies", "--format", "csv"], 0, False),
    ("discrepancies series", ["discrepancies", "--level", "series", "--format", "csv"], 0, False),
    ("discrepancies study", ["discrepancies", "--level", "study", "--format", "csv"], 0, False),
    ("find MR (all, csv)", ["find", "--label", "MR", "--format", "csv"], 0, False),
    ("export (all)", ["export", "--out", "{work}/cli-export.csv"], 0, False),
    (
        "export balanced by source",
        [
            "export",
            "--out",
            "{work}/cli-export-balanced.csv",
            "--balanced",
            "--per-label",
            "1000",
            "--by-source",
        ],
        0,
        False,
    ),
    ("rules apply (one link rule)", ["rules", "apply", "{work}/cli-rules.toml"], 0, True),
]

RULES = """mode = "all"
[[rule]]
name = "mr-as-xr"
[rule.match]
verdict = "disagree"
header = "MR"
label = "XR"
min_confidence = 0.9
[rule.file]
to = "{work}/cli-filed/{{header_label}}-as-{{label}}/{{SOPInstanceUID}}.dcm"
how = "link"
"""


@contextmanager
def copy_of(url: str, work: Path) -> Iterator[str]:
    """A throwaway copy of the database at ``url``."""
    engine = create_db_engine(url)
    try:
        if engine.dialect.name == "sqlite":
            copy = work / f"cli-copy-{uuid.uuid4().hex[:8]}.db"
            source = sqlite3.connect(sa.make_url(url).database or "")
            target = sqlite3.connect(copy)
            try:
                source.backup(target)  # the WAL's content too, unlike copying the file
            finally:
                target.close()
                source.close()
            try:
                yield f"sqlite:///{copy}"
            finally:
                for path in work.glob(copy.name + "*"):
                    path.unlink()
            return
        name = f"sorter_bench_{uuid.uuid4().hex[:12]}"
        admin = create_db_engine(ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                template = sa.make_url(url).database
                connection.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
        finally:
            admin.dispose()
        copied = sa.make_url(url).set(database=name).render_as_string(hide_password=False)
        try:
            yield copied
        finally:
            drop_postgres_database(copied)
    finally:
        engine.dispose()


def run(args: list[str], url: str, expect: int, timeout_s: float) -> dict[str, Any]:
    """One run of ``sorter ARGS`` on ``url``: wall time, exit status, lines printed."""
    env = {**os.environ, "SORTER_DATABASE_URL": url, "SORTER_LOG_FORMAT": "text"}
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [*SORTER, *args], env=env, capture_output=True, text=True, check=False, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"s": timeout_s, "rc": None, "ok": False, "timed_out": True, "lines": 0, "last_line": ""}
    seconds = time.perf_counter() - started
    return {
        "s": round(seconds, 2),
        "rc": done.returncode,
        "ok": done.returncode == expect,
        "lines": done.stdout.count("\n"),
        "last_line": (done.stdout.strip().splitlines() or done.stderr.strip().splitlines() or [""])[-1][:200],
    }


def bench(url: str, work: Path, repeats: int, only: list[str] | None, timeout_s: float) -> dict[str, Any]:
    (work / "cli-rules.toml").write_text(RULES.format(work=work))
    results: dict[str, Any] = {}
    for name, template, expect, writes in CASES:
        if only and not any(part in name for part in only):
            continue
        args = [a.format(work=work) for a in template]
        runs = []
        for _ in range(repeats):
            shutil.rmtree(work / "cli-filed", ignore_errors=True)
            if writes:
                with copy_of(url, work) as copied:
                    runs.append(run(args, copied, expect, timeout_s))
            else:
                runs.append(run(args, url, expect, timeout_s))
        ok = all(r["ok"] for r in runs)
        times = [r["s"] for r in runs]
        results[name] = {
            "ok": ok,
            "median_s": round(statistics.median(times), 2),
            "runs": runs,
        }
        status = "ok" if ok else f"FAILED (exit {[r['rc'] for r in runs]}; None: killed at --timeout)"
        print(f"  {name:32s} median {statistics.median(times):7.2f} s  runs {times}  {status}", flush=True)
        print(f"  {'':32s} {runs[-1]['last_line']}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a kept bench_review.py run (its meta.json)")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run is killed")
    parser.add_argument("--only", default=None, help="only the cases whose name holds one of these parts")
    parser.add_argument("--out", type=Path, default=HERE / "results-cli-2core.json")
    args = parser.parse_args()
    meta = json.loads((args.work / "meta.json").read_text())
    wanted = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    only = args.only.split(",") if args.only else None
    result: dict[str, Any] = {"machine": machine(), "instances": meta["instances"], "databases": {}}
    for db in wanted:
        url = meta["urls"].get(db)
        if url is None:
            raise SystemExit(
                f"{args.work}/meta.json has no {db} database: run bench_review.py --db {db} --keep"
            )
        print(f"\n== {db} ({server_version(url)}, {meta['instances']:,} instances)", flush=True)
        result["databases"][db] = {
            "server": server_version(url),
            "cases": bench(url, args.work, args.repeats, only, args.timeout),
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
