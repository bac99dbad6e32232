"""Scan throughput: files/s of the register + database path, and whether it stays flat as the archive grows.

Run: .venv/bin/python tests/bench/bench_scan.py --files 1000 [--database-url URL] [--classify 1000]
     [--work DIR] [--out bench-scan.json]     (one size per run gives clean peak-memory numbers)

For each size: build an archive of real DICOM files (pydicom's MR_small.dcm
and CT_small.dcm, byte-copied with new UIDs patched in, 100 files a series),
then time (1) a first scan that walks, reads headers and registers into an
empty database (no classification: an executor that only counts ids), and
(2) a second scan of the unchanged archive (the ledger lookup alone). Files/s
is reported overall and per tenth of the run, with the number of SQL
statements per 1 000 files (constant means no per-file query) and the RSS.
``--classify N`` adds an end-to-end scan of N files with a tiny untrained
model (decode pool + batched inference + bulk writes). Prints a table, writes JSON.
Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sorter.db.session import open_database
from sorter.scan import REGISTER_BATCH, Scan
from sorter.summary import RunSummary

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archive  # a sibling module of this script, not a package


def build_archive(root: Path, files: int) -> float:
    """Write ``files`` real DICOM files under new UIDs; returns seconds taken."""
    started = time.perf_counter()
    archive.build(root, files, "small")
    return time.perf_counter() - started


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CountingExecutor:
    """Stands in for classification: takes the ids after each commit and does nothing with them."""

    def __init__(self) -> None:
        self.ids = 0

    def submit(self, ids: Iterable[int]) -> None:
        self.ids += len(list(ids))

    def drain(self) -> None:
        pass

    def already_submitted(self, ids: Sequence[int]) -> int:
        return 0


class Windows:
    """Files/s and RSS per tenth of the run, from the progress callbacks."""

    def __init__(self, total: int) -> None:
        self.total: float | None = total  # known, so the scan does not count files in a thread
        self.done, self.started = 0, time.perf_counter()
        self.edges = [max(1, total * k // 10) for k in range(1, 11)]
        self.rows: list[dict[str, float]] = []
        self.last_time, self.last_done = self.started, 0

    def update(self, n: float | None = 1) -> bool | None:
        self.done += int(n or 0)
        if not self.edges or self.done < self.edges[0]:
            return None
        while self.edges and self.done >= self.edges[0]:
            self.edges.pop(0)  # one row per crossing, however many tenths a batch spans
        now = time.perf_counter()
        files = self.done - self.last_done
        self.rows.append(
            {
                "upto": self.done,
                "files_per_s": round(files / (now - self.last_time), 1),
                "rss_mb": round(rss_mb(), 1),
            }
        )
        self.last_time, self.last_done = now, self.done
        return None

    def refresh(self) -> None:
        pass


def timed_scan(url: str, root: Path, files: int) -> dict[str, Any]:
    """One registration-only scan; files/s, statements per 1 000 files, RSS."""
    engine, sessions = open_database(url)
    statements = 0

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    sa.event.listen(engine, "before_cursor_execute", count)
    windows = Windows(files)
    executor = CountingExecutor()
    rss_before = rss_mb()
    started = time.perf_counter()
    summary = Scan(sessions, executor, RunSummary(), progress=windows).run([str(root)])
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {
        "files": summary.files,
        "registered": summary.registered,
        "unchanged": summary.unchanged,
        "seconds": round(elapsed, 2),
        "files_per_s": round(summary.files / elapsed, 1),
        "us_per_file": round(elapsed / summary.files * 1e6, 1),
        "sql_statements": statements,
        "statements_per_1000_files": round(statements / summary.files * 1000, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_max_mb": max([round(rss_before, 1)] + [w["rss_mb"] for w in windows.rows]),
        "windows": windows.rows,
    }


def classify_run(url: str, root: Path, limit: int) -> dict[str, Any]:
    """``python -m sorter scan`` on the first ``limit`` files with a tiny untrained model, in a child process.

    A child process keeps torch out of this one (its import alone maps ~800 MiB), so the
    register-path RSS above stays honest; the child's peak RSS is reported separately.
    """
    subset = root.parent / f"classify-{limit}"
    if not subset.exists():
        for path in sorted(root.rglob("*.dcm"))[:limit]:
            target = subset / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    model = root.parent / "tiny.pt"
    script = (
        "import sys, torch; from pathlib import Path; from sorter.domain import ALL_LABELS; "
        "from sorter.model.artefact import save_artefact; from sorter.model.network import build_network; "
        "from sorter.model.spec import ModelSpec, PreprocessParams; torch.manual_seed(0); "
        "spec = ModelSpec(arch='mobilenet_v3_small', labels=ALL_LABELS, "
        "preprocess=PreprocessParams(input_size=64)); "
        "save_artefact(build_network(spec), spec, Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", script, str(model)], check=True)
    out = root.parent / "classify.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sorter",
            "scan",
            "--model",
            str(model),
            "--no-progress",
            "--json-summary",
            str(out),
            "--database-url",
            url,
            str(subset),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    data = json.loads(out.read_text())
    return {
        "files": data["files"],
        "classified": data["classified"],
        "seconds": data["elapsed_s"],
        "files_per_s": data["files_per_s"],
        "model": "mobilenet_v3_small, 64 px, untrained",
        "child_peak_rss_mb": round(max(peak, before) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, action="append", help="archive size (repeatable; default 1000)")
    parser.add_argument("--database-url", help="default: a fresh SQLite file per size in the work folder")
    parser.add_argument(
        "--classify", type=int, default=0, help="also scan N files end to end with a tiny model"
    )
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary folder, removed after)")
    parser.add_argument("--out", type=Path, default=Path("bench-scan.json"))
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scan-"))
    rows = []
    try:
        for files in args.files or [1000]:
            root = work / f"archive-{files}"
            build_s = build_archive(root, files) if not root.exists() else 0.0
            url = args.database_url or f"sqlite:///{work / f'bench-{files}.db'}"
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
            first = timed_scan(url, root, files)
            again = timed_scan(url, root, files)
            row: dict[str, Any] = {
                "files": files,
                "build_s": round(build_s, 1),
                "database": url.split(":")[0],
                "first_scan": first,
                "rescan": again,
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
            if args.classify:
                classify_url = f"sqlite:///{work / f'classify-{files}.db'}"
                Path(classify_url.removeprefix("sqlite:///")).unlink(missing_ok=True)
                row["classify"] = classify_run(classify_url, root, min(args.classify, files))
            rows.append(row)
            print(
                f"{files:>7} files  first scan {first['files_per_s']:>8} files/s "
                f"({first['us_per_file']} us/file, {first['statements_per_1000_files']} SQL/1000 files)  "
                f"rescan {again['files_per_s']:>8} files/s  "
                f"RSS {first['rss_before_mb']} -> {first['rss_max_mb']} MiB",
                flush=True,
            )
            if "classify" in row:
                print(
                    f"         end to end ({row['classify']['files']} files, tiny model): "
                    f"{row['classify']['files_per_s']} files/s, "
                    f"child peak RSS {row['classify']['child_peak_rss_mb']} MiB",
                    flush=True,
                )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": sys.version.split()[0],
        "register_batch": REGISTER_BATCH,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
