"""The queue path end to end: ``sorter scan`` with a broker, real Redis, real ``sorter worker`` processes.

Each test run uses its own queue name (parallel runs never share work) and
deletes only that queue's keys. The workers use a throwaway PostgreSQL
database and a tiny untrained model. Skipped when Redis is unreachable.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from db_support import (
    copies_of_one_instance,
    copy_dicom,
    pydicom_file,
    query,
    scalar,
    scan,
    small_archive,
    sorter,
    tree_rules,
    truncate,
)
from pydicom.uid import generate_uid
from support import free_port

from sorter.db.session import create_db_engine

pytest_plugins = ["db_fixtures"]

REDIS_URL = os.environ.get("SORTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Short redelivery and sweep periods, so that recovery after kill -9 takes seconds.
VISIBILITY_S = "4"
SWEEP_INTERVAL_S = "2"
SWEEP_AGE_S = "3"


@pytest.fixture(scope="module")
def queue() -> Iterator[str]:
    """A queue name of our own on a reachable Redis; its keys are deleted afterwards."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        message = f"Redis unreachable at {REDIS_URL} ({type(exc).__name__}); Celery worker tests skipped"
        if os.environ.get("SORTER_TEST_REQUIRE_REDIS") == "1":  # CI: a missing service fails
            pytest.fail(message)
        pytest.skip(message)
    name = f"sorter-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        _forget_queue(client, name)
        client.close()


def _forget_queue(client: Any, name: str) -> None:
    """Delete ``name``'s keys, and its messages in kombu's shared ``unacked`` hash (those of a
    killed worker), which another run's worker would otherwise restore into ``name`` later."""
    for tag, raw in client.hgetall("unacked").items():
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key == name:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    keys = list(client.scan_iter(match=f"*{name}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture()
def pg_url(postgres_database: str) -> str:
    truncate(postgres_database)
    return postgres_database


@pytest.fixture()
def broker_env(monkeypatch: pytest.MonkeyPatch, queue: str) -> dict[str, str]:
    """``SORTER_`` variables for the producer (this process) and the workers."""
    env = {"SORTER_BROKER_URL": REDIS_URL, "SORTER_QUEUE": queue, "SORTER_VISIBILITY_TIMEOUT": VISIBILITY_S}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


class Worker:
    """A ``sorter worker`` in its own process group, killed with it."""

    def __init__(
        self, url: str, model: Path, env: dict[str, str], log: Path, extra: Sequence[str] = ()
    ) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
        self.log = log
        command = [
            sys.executable,
            "-m",
            "sorter",
            "worker",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--sweep-interval",
            SWEEP_INTERVAL_S,
            "--sweep-age",
            SWEEP_AGE_S,
            "--hostname",
            f"{uuid.uuid4().hex[:8]}@%h",
            "--database-url",
            url,
            *extra,
        ]
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**clean, **env}, start_new_session=True
            )

    def kill(self) -> None:
        """kill -9 the worker and its pool processes (a machine lost mid-batch)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _wait_for(url: str, sql: str, predicate: object, worker: Worker, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    value = 0
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            pytest.fail(f"the worker exited ({worker.process.returncode}):\n{worker.output()}")
        value = int(scalar(url, sql))
        if predicate(value):  # type: ignore[operator]
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out waiting on {sql!r} (last {value}):\n{worker.output()}")


def _counts(url: str) -> dict[str, int]:
    rows = {
        status: int(scalar(url, "SELECT count(*) FROM instances WHERE status = :s", s=status))
        for status in ("pending", "done", "failed", "skipped")
    }
    rows["predictions"] = int(scalar(url, "SELECT count(*) FROM predictions"))
    rows["duplicate_predictions"] = int(
        scalar(
            url,
            "SELECT count(*) FROM (SELECT instance_id FROM predictions GROUP BY instance_id, model_id "
            "HAVING count(*) > 1) AS d",
        )
    )
    rows["given_up"] = int(
        scalar(url, "SELECT count(*) FROM instances WHERE error IN ('retries_exhausted', 'task_error')")
    )
    return rows


def test_scan_with_a_broker_flows_to_done(tmp_path, pg_url, tiny_model, broker_env):
    small_archive(tmp_path / "archive")
    summary = scan(pg_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == 0  # nothing classified in the producer: all of it was queued
    assert int(scalar(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'")) == 7
    # What this run queued is not "resumed" (a fresh scan said "7 registered, 7 resumed"), and the
    # summary says where it went; a second scan before any worker ran resumes them, and says so.
    assert (summary["queued"], summary["resumed"]) == (7, 0), summary
    again = sorter("scan", "--model", str(tiny_model), "--no-progress", str(tmp_path / "archive"), url=pg_url)
    assert "0 registered, 9 unchanged" in again.output and "7 resumed" in again.output, again.output
    assert "queued: 7 instances for `sorter worker` to classify" in again.output

    worker = Worker(pg_url, tiny_model, broker_env, tmp_path / "worker.log")
    try:
        _wait_for(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'", lambda n: n == 0, worker)
    finally:
        worker.stop()
    counts = _counts(pg_url)
    assert counts["done"] == 7 and counts["predictions"] == 7, counts  # 3 CT, 3 MR, 1 colour
    assert counts["duplicate_predictions"] == 0 and counts["given_up"] == 0, counts
    assert (
        int(scalar(pg_url, "SELECT count(*) FROM instances WHERE prediction_id IS NULL AND status = 'done'"))
        == 0
    )


def test_a_worker_on_another_database_says_so(tmp_path, pg_url, tiny_model, broker_env):
    """`sorter scan` with the broker but the default database (sqlite:///sorter.db in its working
    directory) and a worker on PostgreSQL: the worker claimed nothing, said nothing, and the
    scanned instances stayed pending for ever."""
    small_archive(tmp_path / "archive")
    elsewhere = f"sqlite:///{tmp_path / 'sorter.db'}"
    assert scan(elsewhere, tiny_model, tmp_path / "archive", tmp=tmp_path)["queued"] == 7
    worker = Worker(pg_url, tiny_model, broker_env, tmp_path / "worker.log")
    said = "does not hold: the process that queued them writes to another database"
    try:
        deadline = time.monotonic() + 60
        while said not in worker.output() and time.monotonic() < deadline:
            assert worker.process.poll() is None, worker.output()
            time.sleep(0.2)
    finally:
        worker.stop()
    [line] = [line for line in worker.log.read_text(errors="replace").splitlines() if said in line][:1]
    assert "this worker's database (postgresql" in line and "SORTER_DATABASE_URL" in line, line
    assert int(scalar(elsewhere, "SELECT count(*) FROM instances WHERE status = 'pending'")) == 7


def test_a_worker_with_rules_files_each_batch_it_commits(
    tmp_path, pg_url, tiny_model, broker_env, monkeypatch
):
    small_archive(tmp_path / "archive")
    root = tmp_path / "sorted"
    rules = tree_rules(tmp_path / "rules.toml", root)
    # SORTER_RULES set for the whole deployment: the producer goes on, the workers apply them.
    monkeypatch.setenv("SORTER_RULES", str(rules))
    scan(pg_url, tiny_model, tmp_path / "archive", tmp=tmp_path)
    assert not root.exists()
    worker = Worker(pg_url, tiny_model, {**broker_env, "SORTER_RULES": str(rules)}, tmp_path / "worker.log")
    try:
        _wait_for(pg_url, "SELECT count(*) FROM rule_actions WHERE status = 'done'", lambda n: n == 7, worker)
    finally:
        worker.stop()
    filed = {p.stem: p.parent.name for p in root.rglob("*.dcm")}
    labels = dict(
        query(
            pg_url,
            "SELECT i.sop_instance_uid, p.label FROM instances i "
            "JOIN predictions p ON p.id = i.prediction_id",
        )
    )
    assert filed == labels


def test_tried_instances_are_retried_alone_and_failed_after_the_last_attempt(
    tmp_path, pg_url, tiny_model, broker_env
):
    """What a poison file (its decoder hangs or kills the worker) leaves behind, replayed."""
    from sorter.jobs.tasks import MAX_ATTEMPTS

    small_archive(tmp_path / "archive")
    scan(pg_url, tiny_model, tmp_path / "archive", tmp=tmp_path)  # queued: one batch of 7
    ids = [r.id for r in query(pg_url, "SELECT id FROM instances WHERE status = 'pending' ORDER BY id")]
    poison, survivor = ids[0], ids[1]
    engine = create_db_engine(pg_url)
    with engine.begin() as connection:  # as if earlier tries had died on them
        connection.execute(
            sa.text("UPDATE instances SET attempts = :n WHERE id = :i"), {"n": MAX_ATTEMPTS, "i": poison}
        )
        connection.execute(sa.text("UPDATE instances SET attempts = 1 WHERE id = :i"), {"i": survivor})
    engine.dispose()

    worker = Worker(pg_url, tiny_model, broker_env, tmp_path / "worker.log")
    try:
        _wait_for(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'", lambda n: n == 0, worker)
    finally:
        worker.stop()
    rows = {r.id: r for r in query(pg_url, "SELECT id, status, error, attempts FROM instances")}
    assert (rows[poison].status, rows[poison].error, rows[poison].attempts) == (
        "failed",
        "attempts_exhausted",
        MAX_ATTEMPTS,
    )
    assert (rows[survivor].status, rows[survivor].attempts) == ("done", 2)  # retried alone, counted
    assert {(rows[i].status, rows[i].attempts) for i in ids[2:]} == {("done", 1)}
    assert _counts(pg_url)["duplicate_predictions"] == 0


def test_a_worker_reads_an_instance_from_its_next_copy_when_the_first_is_cut_short(
    tmp_path, pg_url, tiny_model, broker_env
):
    """The worker that fails an instance at its first path queues it again at a whole copy."""
    paths = copies_of_one_instance(tmp_path / "archive", {"a": -1500, "b": None})
    scan(pg_url, tiny_model, tmp_path / "archive", tmp=tmp_path)

    worker = Worker(pg_url, tiny_model, broker_env, tmp_path / "worker.log")
    try:
        _wait_for(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'", lambda n: n == 0, worker)
    finally:
        worker.stop()
    rows = query(pg_url, "SELECT path, status, error FROM instances ORDER BY path")
    assert [tuple(r) for r in rows] == [
        (str(paths["a"]), "failed", "truncated"),
        (str(paths["b"]), "done", None),
    ]


def test_kill_9_mid_batch_then_a_new_worker_finishes_each_instance_once(
    tmp_path, pg_url, tiny_model, broker_env
):
    files = 80
    root = tmp_path / "archive"
    for i in range(files):
        if i % 20 == 0:
            series = generate_uid()
        name = "CT_small.dcm" if i % 2 else "MR_small.dcm"
        copy_dicom(pydicom_file(name), root / f"s{i // 20}" / f"{i:03d}.dcm", series=series)
    scan(pg_url, tiny_model, root, tmp=tmp_path, extra=("--batch-size", "2"))
    assert int(scalar(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'")) == files

    log = tmp_path / "worker.log"
    first = Worker(pg_url, tiny_model, broker_env, log)
    try:
        _wait_for(pg_url, "SELECT count(*) FROM predictions", lambda n: n >= 6, first)
    finally:
        first.kill()
    left = int(scalar(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'"))
    assert left > 0, "the worker finished everything before it could be killed"

    second = Worker(pg_url, tiny_model, broker_env, log)
    try:
        _wait_for(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'", lambda n: n == 0, second)
    finally:
        second.stop()
    counts = _counts(pg_url)
    assert counts["done"] == files and counts["predictions"] == files, counts
    assert counts["duplicate_predictions"] == 0 and counts["given_up"] == 0, counts


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text: str = response.read().decode()
    return text


def _sample(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_worker_metrics_sum_the_pool_processes_and_are_scraped_over_http(
    tmp_path, pg_url, tiny_model, broker_env
):
    small_archive(tmp_path / "archive")
    scan(pg_url, tiny_model, tmp_path / "archive", tmp=tmp_path, extra=("--batch-size", "2"))
    assert int(scalar(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'")) == 7

    port = free_port()
    folder = tmp_path / "multiproc"  # given by the deployment: wiped of a previous run's files
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"stale")
    env = {**broker_env, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    extra = ("--concurrency", "2", "--metrics-port", str(port), "--metrics-bind", "127.0.0.1")
    worker = Worker(pg_url, tiny_model, env, tmp_path / "worker.log", extra=extra)
    try:
        done = _wait_for(
            pg_url, "SELECT count(*) FROM instances WHERE status = 'done'", lambda n: n == 7, worker
        )
        # A batch is observed just after its commit: poll the endpoint briefly.
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            try:
                text = _scrape(port)
            except (urllib.error.URLError, ConnectionError):
                text = ""
            if _sample(text, "sorter_instances_classified_total") == done:
                break
            time.sleep(0.1)
        pids = {path.stem.split("_")[-1] for path in folder.glob("*.db")}
    finally:
        worker.stop()
    assert _sample(text, "sorter_instances_classified_total") == done == 7, worker.output() + text
    # Every instance went through exactly one observed batch (a redelivered one claims none).
    assert _sample(text, "sorter_batch_size_sum") == 7, text
    assert _sample(text, "sorter_inference_seconds_count") == _sample(text, "sorter_batch_size_count")
    assert _sample(text, 'sorter_queue_latency_seconds_bucket{le="+Inf"}') == 7, text
    assert "sorter_instances_failed_total{" not in text  # nothing failed: no labelled sample
    assert pids and "1" not in pids, pids  # the stale file was removed; the pool processes wrote theirs
    assert int(scalar(pg_url, "SELECT count(*) FROM predictions")) == 7


# --- without a worker: configuration, the producer's batching, giving a batch up ---------------------


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int], str]] = []

    def send_task(self, name: str, args: list[list[int]], queue: str) -> None:
        self.sent.append((name, args[0], queue))


def test_app_is_json_only_with_late_acks_and_prefetch_one():
    from sorter.config import Settings
    from sorter.jobs.celery_app import make_celery

    conf = make_celery(Settings(broker_url="redis://127.0.0.1:1/0", queue="q")).conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1 and conf.task_default_queue == "q"
    with pytest.raises(ValueError, match="SORTER_BROKER_URL"):
        make_celery(Settings())


def test_executor_sends_full_batches_then_the_rest_each_id_once():
    from sorter.jobs.celery_app import CLASSIFY_TASK
    from sorter.jobs.queue import CeleryExecutor

    app = _Recorder()
    with CeleryExecutor(app, batch_size=3, queue="q") as executor:  # type: ignore[arg-type]
        executor.submit([1, 2, 3, 4])
        assert [ids for _, ids, _ in app.sent] == [[1, 2, 3]]
        executor.submit([4, 5, 1])  # a scan's resume re-submits what it has just queued
    assert app.sent == [(CLASSIFY_TASK, [1, 2, 3], "q"), (CLASSIFY_TASK, [4, 5], "q")]
    assert executor.sent == 5


def test_a_batch_given_up_on_fails_its_pending_instances(tmp_path, sqlite_url, tiny_model, monkeypatch):
    import sqlalchemy as sa

    from sorter.config import Settings
    from sorter.jobs import celery_app
    from sorter.jobs.tasks import MAX_RETRIES, TRANSIENT, classify_ids

    assert classify_ids.acks_late and classify_ids.max_retries == MAX_RETRIES
    assert tuple(classify_ids.autoretry_for) == TRANSIENT
    small_archive(tmp_path / "archive")
    scan(sqlite_url, tiny_model, tmp_path / "archive" / "siteA", tmp=tmp_path)  # in-process: all done
    done = [int(i) for (i,) in query(sqlite_url, "SELECT id FROM instances WHERE status = 'done'")]
    scan_pending = scalar(sqlite_url, "SELECT count(*) FROM instances WHERE status = 'pending'")
    assert scan_pending == 0 and len(done) == 3
    # The worker's state lives on its app (made current by make_celery), not in module globals.
    app = celery_app.make_celery(
        Settings(database_url=sqlite_url, model=tiny_model, broker_url="redis://127.0.0.1:1/0")
    )
    state = celery_app.worker_state(app)
    assert celery_app.worker_state() is state  # the current app's
    try:
        with state.sessions() as session:
            session.execute(sa.text("UPDATE instances SET status = 'pending' WHERE id = :i"), {"i": done[0]})
            session.commit()
        error = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        classify_ids.on_failure(error, "task-1", ([done[0], done[1]],), {}, None)
    finally:
        state.engine.dispose()
    rows = dict(
        query(
            sqlite_url,
            "SELECT id, coalesce(error, status) FROM instances WHERE id IN (:a, :b)",
            a=done[0],
            b=done[1],
        )
    )
    assert rows == {done[0]: "retries_exhausted", done[1]: "done"}  # a finished instance is left alone
