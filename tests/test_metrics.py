"""Prometheus metrics: a real scan in-process, observed by the executor, scraped over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from db_support import copy_dicom, pydicom_file, query, small_archive

from sorter.commands.common import database
from sorter.commands.listen import counted
from sorter.commands.runs import sqlite_files
from sorter.config import Settings
from sorter.jobs.executor import open_local_executor
from sorter.metrics import Metrics, start_metrics_server
from sorter.scan import Scan
from sorter.summary import RunSummary

pytest_plugins = ["db_fixtures"]


def broken_archive(root: Path) -> None:
    """The small real archive plus a CT whose pixel data is cut short (fails in the decoder)."""
    small_archive(root)
    cut = copy_dicom(pydicom_file("CT_small.dcm"), root / "siteA" / "cut.dcm")
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) - 4000])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text: str = response.read().decode()
    return text


def _value(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$" if labels else rf"^{re.escape(name)} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match is not None, f"{name}{labels} not in the scrape:\n{text}"
    return float(match.group(1))


@pytest.fixture()
def metrics_server():
    metrics = Metrics()
    server = start_metrics_server(0, "127.0.0.1", metrics)
    try:
        yield metrics, server.server_port
    finally:
        server.shutdown()
        server.server_close()


def test_a_scan_moves_the_counters_and_histograms_seen_over_http(
    metrics_server, sqlite_url, tiny_model, tmp_path
):
    metrics, port = metrics_server
    before = _scrape(port)
    assert _value(before, "sorter_instances_classified_total") == 0
    broken_archive(tmp_path / "archive")
    settings = Settings.from_env({}, database_url=sqlite_url, model=tiny_model, workers=1, batch_size=4)
    summary = RunSummary()

    with database(sqlite_url, create=True) as (engine, sessions):
        observer = metrics.batch_observer(sessions)
        with open_local_executor(settings, sessions, summary, observer=observer) as executor:
            Scan(
                sessions, executor, summary, exclude=sqlite_files(engine), on_rejected=metrics.unclassified
            ).run([str(tmp_path / "archive")])

    text = _scrape(port)
    assert summary.classified == 7
    assert _value(text, "sorter_instances_classified_total") == 7
    # Failures are counted by reason, those of the decoder and those found at registration.
    assert _value(text, "sorter_instances_failed_total", '{reason="truncated"}') == 1
    rows = [(r.status, r.error) for r in query(sqlite_url, "SELECT status, error FROM instances")]
    for status, reason in [("failed", "not_dicom"), ("skipped", "non_image")]:
        expected = rows.count((status, reason))
        assert expected > 0
        assert _value(text, f"sorter_instances_{status}_total", f'{{reason="{reason}"}}') == expected
    # Every claimed instance went through a batch; every classified one got a latency sample.
    assert _value(text, "sorter_batch_size_sum") == 8
    assert _value(text, "sorter_batch_size_count") >= 2  # batches of at most 4
    assert _value(text, "sorter_inference_seconds_count") == _value(text, "sorter_batch_size_count")
    assert _value(text, "sorter_inference_seconds_sum") > 0
    assert _value(text, "sorter_queue_latency_seconds_count") == 7
    assert _value(text, 'sorter_queue_latency_seconds_bucket{le="+Inf"}') == 7
    # Discrepancies are labelled by header and predicted label only, and add up to the summary's.
    found = re.findall(
        r'^sorter_discrepancies_total\{header_label="(\w+)",label="(\w+)"\} (\S+)$', text, re.M
    )
    assert sum(float(v) for *_, v in found) == summary.discrepancies
    # No UIDs and no paths in any label.
    assert "1.2.826" not in text and str(tmp_path) not in text


def test_the_listener_sink_counts_received_instances_by_calling_ae(metrics_server):
    metrics, port = metrics_server
    offered: list[tuple[Path, str]] = []
    sink = counted(lambda path, ae: offered.append((path, ae)), metrics)

    sink(Path("/spool/a.dcm"), "MODALITY1 ")
    sink(Path("/spool/b.dcm"), "MODALITY1")
    sink(Path("/spool/c.dcm"), "")

    assert offered == [
        (Path("/spool/a.dcm"), "MODALITY1 "),
        (Path("/spool/b.dcm"), "MODALITY1"),
        (Path("/spool/c.dcm"), ""),
    ]
    text = _scrape(port)
    assert _value(text, "sorter_instances_received_total", '{calling_ae="MODALITY1"}') == 2
    assert _value(text, "sorter_instances_received_total", '{calling_ae="-"}') == 1


def test_metrics_are_off_by_default_and_the_sink_is_untouched():
    sink = print
    assert counted(sink, None) is sink
    assert Settings.from_env({}).metrics_port == 0
    assert Settings.from_env({"SORTER_METRICS_PORT": "9108"}).metrics_port == 9108
    assert Settings.from_env({}).metrics_bind == "127.0.0.1"


_MULTIPROCESS_SCRIPT = r"""
import json, multiprocessing, os, urllib.request
from sorter.metrics import (
    Metrics, multiprocess_dir, multiprocess_enabled, process_exited, remove_multiprocess_dir,
    start_multiprocess_server,
)

folder, made = multiprocess_dir()  # as ``sorter worker`` does, after prometheus_client was imported


def child(n):
    metrics = Metrics()  # made after the fork, as in worker_process_init
    for _ in range(n):
        metrics.instances_classified.inc()
    metrics.instances_failed.labels(reason="truncated").inc()
    process_exited(os.getpid())


context = multiprocessing.get_context("fork")
children = [context.Process(target=child, args=(n,)) for n in (3, 4)]
for p in children:
    p.start()
for p in children:
    p.join()
server = start_multiprocess_server(0, "127.0.0.1", folder)
with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
    text = response.read().decode()
server.shutdown()
server.server_close()
remove_multiprocess_dir(folder, made)
print(json.dumps({"text": text, "made": made, "gone": not folder.exists(), "on": multiprocess_enabled()}))
"""


def test_multiprocess_mode_sums_the_counters_of_exited_processes_and_removes_its_folder():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    }
    result = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_SCRIPT],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert out["on"] and out["made"] and out["gone"]
    assert _value(out["text"], "sorter_instances_classified_total") == 7  # 3 + 4, both processes exited
    assert _value(out["text"], "sorter_instances_failed_total", '{reason="truncated"}') == 2
