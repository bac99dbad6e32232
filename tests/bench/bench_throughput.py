"""Throughput in one run: stage rates, end-to-end ``sorter scan``, and the seed-style baseline.

Run: .venv/bin/python tests/bench/bench_throughput.py [--files 1000 --files 20000] [--sample 400]
     [--repeat 3] [--postgres-url postgresql+psycopg://127.0.0.1/test] [--skip compile ...]
     [--work DIR] [--out bench-throughput.json]

Archives (tests/bench/archive.py) are real files copied under new UIDs: ``ct512``
(512 x 512 CT, uncompressed) at every ``--files`` size, and ``mixed`` (half
that, half compressed CT, radiographs up to 2 140 x 1 760 and small MR) for
the stage rates. Stages, each on the same machine in the same run:

* ``header``: header-only read (``read_header``), files/s on one core;
* ``decode``: read + decode + preprocess (``decode_one``), files/s on one core,
  and on a process pool of one process per core: the pure decode rate that
  bounds a CPU-only scan;
* ``inference``: images/s per architecture, input size, batch size and runtime
  (eager torch, channels-last, ``torch.compile``, ONNX Runtime; bf16 and fp16
  on CUDA when present), with as many threads as cores;
* ``db``: registration and prediction bulk writes per second, SQLite and
  PostgreSQL;
* ``scan``: ``python -m sorter scan`` with the bundled model on each archive,
  files/s and the peak RSS of its whole process tree (sampled every 0.2 s);
* ``baseline``: the seed code's way: sequential pydicom read, per-image
  min-max, 224 x 224 resize, ResNet-18 (1 channel) in batches of 32, no pool.

* ``archives``: for each of ``--archive-kind`` (default ``ct512``, ``mixed``, ``archive``,
  ``ct512j2k``; tests/bench/archive.py): ``sorter scan`` as shipped (JPEG 2000 and JPEG frames
  decoded at a reduced resolution) and with ``SORTER_FULL_DECODE=1`` (every pixel, as before), and
  the seed-style baseline on an evenly spaced sample of the same archive (its multi-frame objects
  decoded whole, as the seed code did); files/s and MB/s, and the ratios between them.

The ct512 scans and the baseline run ``--repeat`` times (default 3); the run
with the median files/s is reported, every run's rate beside it, and the
ratios are taken between medians.

Prints a table and writes JSON. Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import archive

CORES = os.cpu_count() or 1
STAGES = ("header", "decode", "inference", "compile", "db", "scan", "baseline", "archives")
#: Files per archive of the ``archives`` stage (``archive`` in multiples of 400: its exact mix).
ARCHIVE_FILES = {"ct512": 1000, "mixed": 1000, "archive": 1200, "ct512j2k": 1000}


def rate(count: int, seconds: float) -> float:
    """Items per second, rounded for the table."""
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """Run ``fn`` (which returns a count); the count and the seconds it took."""
    started = time.perf_counter()
    count = fn()
    return count, time.perf_counter() - started


# ---------------------------------------------------------------- stage rates


def stage_header(files: list[Path]) -> dict[str, Any]:
    """Header-only reads on one core."""
    from sorter.dicom.headers import read_header

    def run() -> int:
        for path in files:
            read_header(path)
        return len(files)

    count, seconds = timed(run)
    return {"files": count, "files_per_s": rate(count, seconds)}


def _items(files: list[Path]) -> list[Any]:
    from sorter.db.queries import Claimed

    return [Claimed(i, str(path), None) for i, path in enumerate(files)]


def _params() -> Any:
    from sorter.model.artefact import DEFAULT_MODEL_PATH, read_spec

    return read_spec(DEFAULT_MODEL_PATH)[0].preprocess


def stage_decode(files: list[Path]) -> dict[str, Any]:
    """Read + decode + preprocess on one core, then on a pool of one process per core."""
    from sorter.decode import Prepared, decode_one, init_decode_process
    from sorter.jobs.local import _pool_context

    items, params = _items(files), _params()

    def one_core() -> int:
        return sum(isinstance(decode_one(item, params), Prepared) for item in items)

    decode_one(items[0], params)  # imports and first-call set-up stay out of the timing
    ok, seconds = timed(one_core)
    with ProcessPoolExecutor(CORES, mp_context=_pool_context(), initializer=init_decode_process) as pool:
        list(pool.map(int, range(CORES * 4)))  # every process started

        def pooled() -> int:
            futures = pool.map(decode_one, items, [params] * len(items), chunksize=8)
            return sum(isinstance(r, Prepared) for r in futures)

        pool_ok, pool_seconds = timed(pooled)
    return {
        "files": len(items),
        "decoded": ok,
        "files_per_s_one_core": rate(len(items), seconds),
        "ms_per_file_one_core": round(seconds / len(items) * 1e3, 2),
        "files_per_s_pool": rate(len(items), pool_seconds),
        "pool_processes": CORES,
        "pool_decoded": pool_ok,
    }


def _images_per_s(run: Callable[[], Any], batch: int, seconds: float) -> float:
    for _ in range(3):
        run()
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        run()
        done += batch
    return round(done / (time.perf_counter() - began), 1)


def inference_cases(with_compile: bool) -> list[dict[str, Any]]:
    """Architecture x input x batch x runtime combinations worth a row."""
    import torch

    from sorter.model.artefact import load_artefact

    default = load_artefact().spec
    cases = []
    for batch in (1, 32, 128):
        compiled = ("compile",) if with_compile and batch == 32 else ()  # minutes to compile each shape
        for runtime in ("eager", "channels_last", "onnxruntime", *compiled):
            cases.append({"arch": default.arch, "spec": default, "batch": batch, "runtime": runtime})
    for arch, size, channels in (
        ("resnet18", 224, 1),
        ("resnet18", 128, 2),
        ("mobilenet_v3_large", 128, 2),
        ("efficientnet_b0", 128, 2),
        ("mobilenet_v3_small", 96, 2),
    ):
        for runtime in ("eager", "onnxruntime"):
            cases.append({"arch": arch, "size": size, "channels": channels, "batch": 32, "runtime": runtime})
    if torch.cuda.is_available():
        for dtype in ("bf16", "fp16"):
            for batch in (32, 256):
                cases.append(
                    {"arch": default.arch, "spec": default, "batch": batch, "runtime": f"cuda-{dtype}"}
                )
        for arch, size, channels in (("resnet18", 224, 1), ("resnet50", 224, 1), ("resnet18", 128, 2)):
            cases.append(
                {"arch": arch, "size": size, "channels": channels, "batch": 256, "runtime": "cuda-bf16"}
            )
    return cases


def stage_inference(with_compile: bool, seconds: float) -> list[dict[str, Any]]:
    """Images/s for each case, on random input of the right shape."""
    import torch

    from sorter.domain import ALL_LABELS
    from sorter.model.artefact import load_artefact
    from sorter.model.network import build_network
    from sorter.model.spec import ModelSpec, PreprocessParams

    torch.set_num_threads(CORES)
    rows = []
    for case in inference_cases(with_compile):
        spec = case.get("spec")
        if spec is None:
            names = ("scaled", "hu")[: case["channels"]]
            spec = ModelSpec(
                arch=case["arch"],
                labels=ALL_LABELS,
                preprocess=PreprocessParams(input_size=case["size"], channels=names),
            )
            network = build_network(spec).eval()
        else:
            network = load_artefact().network.eval()
        size, channels = spec.preprocess.input_size, len(spec.preprocess.channels)
        batch, runtime = case["batch"], case["runtime"]
        x = torch.rand(batch, channels, size, size)
        f = torch.rand(batch, len(spec.preprocess.features))
        row = {"arch": spec.arch, "input": f"{channels}x{size}x{size}", "batch": batch, "runtime": runtime}
        try:
            row["images_per_s"] = _run_case(network, spec, x, f, runtime, seconds)
        except Exception as exc:  # a runtime that fails here is a finding, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(
            f"  inference {row['arch']:<20} {row['input']:<10} batch {batch:<4} {runtime:<14} "
            f"{row.get('images_per_s', row.get('error'))}",
            flush=True,
        )
    return rows


def _run_case(network: Any, spec: Any, x: Any, f: Any, runtime: str, seconds: float) -> float:
    import torch

    from sorter.model.ort import OnnxRunner
    from sorter.model.runtime import export_onnx

    batch = len(x)
    if runtime == "onnxruntime":
        runner = OnnxRunner(export_onnx(network, spec), CORES)
        xn, fn = x.numpy(), f.numpy()
        return _images_per_s(lambda: runner(xn, fn), batch, seconds)
    if runtime.startswith("cuda-"):
        dtype = torch.bfloat16 if runtime.endswith("bf16") else torch.float16
        net = network.cuda().to(memory_format=torch.channels_last)
        xc, fc = x.cuda().to(memory_format=torch.channels_last), f.cuda()

        def run_cuda() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                net(xc, fc)
            torch.cuda.synchronize()

        return _images_per_s(run_cuda, batch, seconds)
    if runtime == "channels_last":
        network = network.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if runtime == "compile":
        network = torch.compile(network)

    def run() -> None:
        with torch.inference_mode():
            network(x, f)

    return _images_per_s(run, batch, seconds)


def stage_db(url: str, rows: int, template: Path) -> dict[str, Any]:
    """Bulk registration (500 per transaction) and prediction writes (32 and 256 per transaction)."""
    from sorter.db import queries
    from sorter.db.session import open_database
    from sorter.dicom.headers import read_header
    from sorter.domain import Label, Prediction, Status, Verdict
    from sorter.ingest import from_header, register
    from sorter.pipeline import Outcome, write_outcomes

    engine, sessions = open_database(url)
    header = read_header(template)  # one real header, copied under new paths and UIDs
    tag = f"{time.time_ns()}"
    registrations = [
        from_header(
            dataclasses.replace(header, path=f"/bench/{tag}/{i}.dcm", sop_instance_uid=f"2.25.{tag}{i}"),
            source="bench",
            size=1,
            mtime_ns=1,
        )
        for i in range(rows)
    ]
    ids: list[int] = []

    def write_registrations() -> int:
        for start in range(0, rows, 500):
            with sessions() as session:
                ids.extend(r.instance_id for r in register(session, registrations[start : start + 500]))
                session.commit()
        return rows

    _, register_s = timed(write_registrations)
    with sessions() as session:
        model_id = queries.model_id_for(
            session,
            {
                "sha256": f"bench-{tag}",
                "arch": "bench",
                "labels": "CT,MR",
                "min_confidence": 0.8,
                "min_margin": 0.2,
                "path": "bench",
                "spec": {},
            },
        )
        session.commit()
    probabilities = {label: 1.0 / len(Label) for label in Label}
    prediction = Prediction(Label.CT, 0.9, Label.MR, 0.05, probabilities)
    out: dict[str, Any] = {
        "database": url.split(":")[0].split("+")[0],
        "rows": rows,
        "register_rows_per_s": rate(rows, register_s),
    }
    for size in (32, 256):
        half = ids[: rows // 2] if size == 32 else ids[rows // 2 :]

        def write_predictions(half: list[int] = half, size: int = size) -> int:
            for start in range(0, len(half), size):
                outcomes = [
                    Outcome(i, Status.DONE, Label.CT, prediction, Verdict.AGREE)
                    for i in half[start : start + size]
                ]
                with sessions() as session:
                    write_outcomes(session, model_id, outcomes)
                    session.commit()
            return len(half)

        count, seconds = timed(write_predictions)
        out[f"predictions_per_s_batch_{size}"] = rate(count, seconds)
    engine.dispose()
    return out


# ---------------------------------------------------------------- end to end


def _tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MiB."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE") / 2**20


def stage_scan(
    root: Path, url: str, work: Path, model: Path | None = None, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """``python -m sorter scan`` with the bundled model (or ``model``): files/s and the peak RSS of
    its process tree. ``env_extra``: ``SORTER_`` settings for this scan (``SORTER_FULL_DECODE``)."""
    for path in archive.archive_files(root):  # a warm page cache: the scan is measured, not the disk
        path.read_bytes()
    summary = work / f"summary-{root.name}-{url.split(':')[0]}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    env["SORTER_CACHE_DIR"] = str(work / "graph-cache")  # warmed by warm_graph_cache()
    env.update(env_extra or {})
    command = [sys.executable, "-m", "sorter", "scan", "--no-progress", "--json-summary", str(summary)]
    if model is not None:
        command += ["--model", str(model)]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--database-url", url, str(root)],
        env=env,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _tree_rss_mb(process.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"sorter scan failed ({process.returncode}) on {root}")
    data = json.loads(summary.read_text())
    return {
        "archive": root.name,
        "model": str(model) if model is not None else "bundled",
        "database": url.split(":")[0].split("+")[0],
        "files": data["files"],
        "classified": data["classified"],
        "scan_s": round(data["elapsed_s"], 2),
        "wall_s": round(wall, 2),
        "files_per_s": rate(data["files"], data["elapsed_s"]),
        "files_per_s_wall": rate(data["files"], wall),
        "us_per_file": round(data["elapsed_s"] / data["files"] * 1e6, 1),
        "peak_tree_rss_mb": round(peak, 1),
        # What bounded the scan (sorter.summary.RunSummary.stage_line): model_share
        # near 1 with decode_wait_share near 0 means the model stage did.
        "model_runtime": data.get("model_runtime"),
        "stage_s": data.get("stage_s"),
        "model_share": round(data.get("stage_s", {}).get("model", 0.0) / data["elapsed_s"], 3),
        "decode_wait_share": round(data.get("stage_s", {}).get("decode_wait", 0.0) / data["elapsed_s"], 3),
    }


def warm_graph_cache(work: Path, model: Path | None = None) -> None:
    """Export the bundled model's (or ``model``'s) graph into the scans' cache, as any earlier run would have.

    Only a model's first CPU run exports it (and imports torch: seconds of
    start-up, outside the scan's own elapsed time); every scan measured here is
    a later run.
    """
    from sorter.model.classifier import Classifier
    from sorter.model.graph_cache import GraphCache

    Classifier.load(model, device="cpu", cache=GraphCache(work / "graph-cache"))


def median_run(measure: Callable[[], dict[str, Any]], repeat: int) -> dict[str, Any]:
    """``measure()`` ``repeat`` times; the run with the median files/s, with every run's rate beside it.

    Short measurements on a shared VM move by 20 % from one run to the next;
    the median of a few says more than any one of them.
    """
    runs = [measure() for _ in range(max(1, repeat))]
    chosen = dict(sorted(runs, key=lambda r: r["files_per_s"])[len(runs) // 2])
    if len(runs) > 1:
        chosen["runs_files_per_s"] = [r["files_per_s"] for r in runs]
        if "peak_tree_rss_mb" in chosen:
            chosen["peak_tree_rss_mb"] = max(r["peak_tree_rss_mb"] for r in runs)
    return chosen


def stage_baseline(files: list[Path]) -> dict[str, Any]:
    """The seed code's pipeline: sequential pydicom, min-max, 224 x 224 resize, ResNet-18 batches of 32."""
    import pydicom
    import torch
    from PIL import Image
    from torchvision.models import resnet18

    torch.set_num_threads(CORES)
    network = resnet18(num_classes=8)
    network.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    network.eval()

    def run() -> int:
        batch: list[np.ndarray] = []
        done = 0
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float32)  # every frame of a multi-frame object
            if int(ds.get("NumberOfFrames") or 1) > 1:
                pixels = pixels[len(pixels) // 2]
            if int(ds.get("SamplesPerPixel") or 1) > 1:
                pixels = pixels.mean(axis=-1)
            low, high = pixels.min(), pixels.max()
            pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
            batch.append(
                np.asarray(Image.fromarray(pixels, mode="F").resize((224, 224), Image.Resampling.BILINEAR))
            )
            if len(batch) == 32 or i == len(files) - 1:
                with torch.no_grad():
                    network(torch.from_numpy(np.stack(batch))[:, None]).argmax(dim=1)
                done += len(batch)
                batch = []
        return done

    count, seconds = timed(run)
    return {"files": count, "files_per_s": rate(count, seconds), "torch_threads": CORES}


def stage_archive(kind: str, root: Path, work: Path, repeat: int, baseline_files: int) -> dict[str, Any]:
    """One archive: ``sorter scan`` reduced and full (median of ``repeat``), and the baseline."""
    files = archive.archive_files(root)
    megabytes = sum(path.stat().st_size for path in files) / 2**20
    scans = {}
    for mode, env in (("reduced", {}), ("full", {"SORTER_FULL_DECODE": "1"})):

        def measure(env: dict[str, str] = env, mode: str = mode) -> dict[str, Any]:
            return stage_scan(root, _fresh_sqlite(work, f"arch-{kind}-{mode}"), work, None, env)

        scans[mode] = median_run(measure, repeat)
        scans[mode]["mb_per_s"] = round(megabytes / scans[mode]["scan_s"], 1)
        print(f"archives {kind} {mode}: {scans[mode]['files_per_s']} files/s", flush=True)
    sample = _sample(files, baseline_files)
    baseline = median_run(lambda: stage_baseline(sample), repeat if kind == "ct512" else 1)
    baseline["mb_per_s"] = round(
        sum(p.stat().st_size for p in sample) / 2**20 * baseline["files_per_s"] / len(sample), 1
    )
    print(f"archives {kind} baseline: {baseline['files_per_s']} files/s", flush=True)
    return {
        "archive": kind,
        "files": len(files),
        "megabytes": round(megabytes, 1),
        "scan": scans["reduced"],
        "scan_full_decode": scans["full"],
        "baseline": baseline,
        "scan_vs_full_decode": round(scans["reduced"]["files_per_s"] / scans["full"]["files_per_s"], 2),
        "scan_vs_baseline": round(scans["reduced"]["files_per_s"] / baseline["files_per_s"], 2),
        "full_decode_vs_baseline": round(scans["full"]["files_per_s"] / baseline["files_per_s"], 2),
    }


# ---------------------------------------------------------------- driver


def _sample(files: list[Path], n: int) -> list[Path]:
    step = max(1, len(files) // n)
    return files[::step][:n]


def _postgres(url: str | None) -> str | None:
    if not url:
        return None
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:
        print(f"PostgreSQL at {url} unreachable ({type(exc).__name__}); its rows are skipped", flush=True)
        return None
    return url


def _fresh_sqlite(work: Path, name: str) -> str:
    path = work / f"{name}.db"
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def _fresh_postgres(url: str) -> str:
    """A new empty database beside ``url``'s, so that end-to-end scans start from nothing."""
    import sqlalchemy as sa

    name = f"sorter_bench_{time.time_ns()}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return str(sa.make_url(url).set(database=name).render_as_string(hide_password=False))


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files", type=int, action="append", help="ct512 archive sizes (default 1000 and 20000)"
    )
    parser.add_argument("--sample", type=int, default=400, help="files per stage-rate measurement")
    parser.add_argument("--db-rows", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per inference case")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each ct512 scan and of the baseline; the median counts"
    )
    parser.add_argument("--postgres-url", default="postgresql+psycopg://127.0.0.1:5432/test")
    parser.add_argument("--skip", action="append", default=[], choices=STAGES)
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="a candidate artefact: it also scans the smallest ct512 archive (--repeat runs, median)",
    )
    parser.add_argument(
        "--archive-kind",
        action="append",
        choices=sorted(ARCHIVE_FILES),
        help="archives of the `archives` stage (default: all four)",
    )
    parser.add_argument(
        "--baseline-files", type=int, default=400, help="files of each archive the `archives` baseline reads"
    )
    parser.add_argument("--work", type=Path, help="work folder, kept (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=Path("bench-throughput.json"))
    args = parser.parse_args(list(argv) if argv is not None else None)
    sizes = sorted(args.files or [1000, 20000])
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    postgres = _postgres(args.postgres_url)
    import torch

    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {CORES} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "archives": [],
    }
    try:
        archives: dict[str, Path] = {}
        for kind, size in [("ct512", n) for n in sizes] + [("mixed", max(args.sample, 1000))]:
            root = work / f"{kind}-{size}"
            if not root.exists():
                built = archive.build(root, size, kind)
                result["archives"].append(built)
                print(f"built {root.name}: {built['seconds']} s", flush=True)
            archives[f"{kind}-{size}"] = root
        samples = {
            kind: _sample(archive.archive_files(archives[name]), args.sample)
            for kind, name in (("ct512", f"ct512-{sizes[0]}"), ("mixed", f"mixed-{max(args.sample, 1000)}"))
        }
        stages: dict[str, Any] = {}
        if "header" not in args.skip:
            stages["header"] = {kind: stage_header(files) for kind, files in samples.items()}
            print(f"header: {stages['header']}", flush=True)
        if "decode" not in args.skip:
            stages["decode"] = {kind: stage_decode(files) for kind, files in samples.items()}
            print(f"decode: {stages['decode']}", flush=True)
        if "inference" not in args.skip:
            stages["inference"] = stage_inference("compile" not in args.skip, args.seconds)
        if "db" not in args.skip:
            template = samples["ct512"][0]
            stages["db"] = [stage_db(_fresh_sqlite(work, "db-stage"), args.db_rows, template)]
            if postgres:
                stages["db"].append(stage_db(_fresh_postgres(postgres), args.db_rows, template))
            print(f"db: {stages['db']}", flush=True)
        if "scan" not in args.skip:
            runs = []
            warm_graph_cache(work)
            for size in sizes:
                root = archives[f"ct512-{size}"]
                runs.append(
                    median_run(
                        lambda root=root, size=size: stage_scan(
                            root, _fresh_sqlite(work, f"scan-{size}"), work
                        ),
                        args.repeat,
                    )
                )
                print(f"scan: {runs[-1]}", flush=True)
            mixed = archives[f"mixed-{max(args.sample, 1000)}"]
            runs.append(stage_scan(mixed, _fresh_sqlite(work, "scan-mixed"), work))
            print(f"scan: {runs[-1]}", flush=True)
            if postgres:
                runs.append(stage_scan(archives[f"ct512-{sizes[0]}"], _fresh_postgres(postgres), work))
                print(f"scan: {runs[-1]}", flush=True)
            stages["scan"] = runs
            candidates = []
            for model in args.model:
                warm_graph_cache(work, model)
                root = archives[f"ct512-{sizes[0]}"]
                candidates.append(
                    median_run(
                        lambda root=root, model=model: stage_scan(
                            root, _fresh_sqlite(work, "scan-candidate"), work, model
                        ),
                        args.repeat,
                    )
                )
                print(f"scan: {candidates[-1]}", flush=True)
            stages["candidate_scans"] = candidates
        if "baseline" not in args.skip:
            files = archive.archive_files(archives[f"ct512-{sizes[0]}"])[:1000]
            stages["baseline"] = median_run(lambda: stage_baseline(files), args.repeat)
            print(f"baseline: {stages['baseline']}", flush=True)
        if "archives" not in args.skip:
            warm_graph_cache(work)
            stages["archives"] = []
            for kind in args.archive_kind or list(ARCHIVE_FILES):
                root = work / f"arch-{kind}-{ARCHIVE_FILES[kind]}"
                if not root.exists():
                    built = archive.build(root, ARCHIVE_FILES[kind], kind)
                    result["archives"].append(built)
                    print(f"built {root.name}: {built['seconds']} s", flush=True)
                stages["archives"].append(stage_archive(kind, root, work, args.repeat, args.baseline_files))
        result["stages"] = stages
        result["ratios"] = ratios(stages)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


def ratios(stages: dict[str, Any]) -> dict[str, Any]:
    """The targets of the throughput issue, as ratios measured in this run."""
    out: dict[str, Any] = {}
    scans = [
        s for s in stages.get("scan", []) if s["archive"].startswith("ct512") and s["database"] == "sqlite"
    ]
    if scans and "baseline" in stages:
        best = scans[-1]
        out["scan_vs_baseline"] = round(best["files_per_s"] / stages["baseline"]["files_per_s"], 2)
        out["scan_wall_vs_baseline"] = round(best["files_per_s_wall"] / stages["baseline"]["files_per_s"], 2)
    for scan in stages.get("candidate_scans", []):
        if "baseline" in stages:
            ratio = round(scan["files_per_s"] / stages["baseline"]["files_per_s"], 2)
            out.setdefault("candidate_scan_vs_baseline", {})[scan["model"]] = ratio
    if scans and "decode" in stages:
        out["scan_vs_pure_decode"] = round(
            scans[-1]["files_per_s"] / stages["decode"]["ct512"]["files_per_s_pool"], 3
        )
    if len(scans) >= 2:
        out["per_file_cost_largest_vs_smallest"] = round(
            scans[-1]["us_per_file"] / scans[0]["us_per_file"], 3
        )
        out["peak_rss_largest_vs_smallest"] = round(
            scans[-1]["peak_tree_rss_mb"] / scans[0]["peak_tree_rss_mb"], 3
        )
    return out


def print_table(result: dict[str, Any]) -> None:
    """The summary table of the run."""
    stages = result.get("stages", {})
    print(f"\n{result['machine']}; Python {result['python']}, torch {result['torch']}")
    for kind, row in stages.get("header", {}).items():
        print(f"{'header read':<36} {kind:<8} {row['files_per_s']:>10} files/s (1 core)")
    for kind, row in stages.get("decode", {}).items():
        print(f"{'decode+preprocess':<36} {kind:<8} {row['files_per_s_one_core']:>10} files/s (1 core)")
        print(
            f"{'decode+preprocess, pool':<36} {kind:<8} {row['files_per_s_pool']:>10} files/s "
            f"({CORES} processes)"
        )
    for row in stages.get("inference", []):
        what = f"{row['arch']} {row['input']} b{row['batch']} {row['runtime']}"
        print(f"{'inference':<12}{what:<60} {row.get('images_per_s', row.get('error', '')):>10} img/s")
    for row in stages.get("db", []):
        print(
            f"{'db ' + row['database']:<36} register {row['register_rows_per_s']} rows/s, predictions "
            f"{row['predictions_per_s_batch_32']} (batch 32) / "
            f"{row['predictions_per_s_batch_256']} (batch 256) rows/s"
        )
    for row in stages.get("scan", []):
        print(
            f"{'sorter scan ' + row['archive'] + ' ' + row['database']:<36} {row['files_per_s']:>10} files/s "
            f"({row['files_per_s_wall']} with start-up), {row['us_per_file']} us/file, "
            f"peak RSS {row['peak_tree_rss_mb']} MiB"
        )
    if "baseline" in stages:
        print(f"{'seed-style baseline':<36} {'ct512':<8} {stages['baseline']['files_per_s']:>10} files/s")
    for row in stages.get("archives", []):
        print(
            f"{'archive ' + row['archive']:<20} scan {row['scan']['files_per_s']} files/s "
            f"{row['scan']['mb_per_s']} MB/s | full decode {row['scan_full_decode']['files_per_s']} files/s "
            f"{row['scan_full_decode']['mb_per_s']} MB/s | baseline {row['baseline']['files_per_s']} files/s "
            f"{row['baseline']['mb_per_s']} MB/s | scan/full {row['scan_vs_full_decode']}x, "
            f"scan/baseline {row['scan_vs_baseline']}x, full/baseline {row['full_decode_vs_baseline']}x"
        )
    for key, value in result.get("ratios", {}).items():
        print(f"{key:<36} {value}")


if __name__ == "__main__":
    main()
