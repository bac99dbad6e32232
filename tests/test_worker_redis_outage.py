"""Redis lost while a batch is in flight: ``sorter worker`` survives, and each instance is classified once.

Real components only: a ``redis-server`` of this test's own on a free port (append-only file, as in
deploy/docker-compose.yml), real ``sorter worker`` processes, and the session's throwaway PostgreSQL
database.

The batch is held in flight by a real lock: the test holds the ``models`` row ``FOR UPDATE``, so the
batch's prediction insert (whose foreign key takes ``FOR KEY SHARE`` on that row) waits. With that
batch held and the other pool process idle, the worker's channel has an unacknowledged message *and*
an outstanding ``BRPOP`` when Redis is killed: the state in which kombu's teardown of the broken
connection raised ``AttributeError: 'NoneType' object has no attribute 'hostname'`` (in
``QoS.restore_unacked``) and Celery stopped the worker, with exit status 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa
from db_support import copy_dicom, pydicom_file, scalar, scan, truncate
from pydicom.uid import generate_uid
from support import free_port

from sorter.db.session import create_db_engine

pytest_plugins = ["db_fixtures"]

#: Long enough that nothing is redelivered while the batch is held: the test is about the outage.
VISIBILITY_S = "10"
#: The sweep runs (and fails to send while Redis is away) but leaves the held instances alone.
SWEEP_INTERVAL_S, SWEEP_AGE_S = "2", "30"
FIRST, SECOND = 24, 8  # instances in the batch held across the outage, and in one sent after it
#: Celery's line for a finished task: the number after the colon is what ``classify_ids`` returned.
SUCCEEDED = re.compile(r"Task sorter\.classify_ids\[[^\]]+\] succeeded in [0-9.e-]+s: (\d+)")
DONE = "SELECT count(*) FROM instances WHERE status = 'done'"
WAITING_ON_A_LOCK = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


class RedisServer:
    """A ``redis-server`` on a port of its own; its data (the append-only file) survives a restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again) on the same port and folder; return once it answers PING."""
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        command += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        with (self.folder / "redis.log").open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited ({self.process.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        pytest.fail(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes at once, as a crashed or OOM-killed Redis does."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        if os.environ.get("SORTER_TEST_REQUIRE_REDIS") == "1":  # CI: a missing service fails
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture()
def pg_url(postgres_database: str) -> str:
    truncate(postgres_database)
    return postgres_database


def _archive(root: Path, files: int) -> Path:
    series = generate_uid()
    for i in range(files):
        name = "CT_small.dcm" if i % 2 else "MR_small.dcm"
        copy_dicom(pydicom_file(name), root / f"{i:03d}.dcm", series=series)
    return root


def _start_worker(
    url: str, model: Path, env: dict[str, str], log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``sorter worker`` in its own process group, configured by ``env`` and ``extra`` flags."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    command = [sys.executable, "-m", "sorter", "worker", "--loglevel", "INFO", "--model", str(model)]
    command += ["--device", "cpu", "--hostname", f"outage-{uuid.uuid4().hex[:6]}@%h", "--database-url", url]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**clean, **env},
            start_new_session=True,
        )


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def _text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _tail(log: Path) -> str:
    return _text(log)[-6000:]


def _wait(
    what: str, check: Callable[[], bool], worker: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    """Poll ``check`` until true; fail with the worker's log when the worker exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            pytest.fail(f"sorter worker exited ({worker.returncode}) while waiting for {what}:\n{_tail(log)}")
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log)}")


def _classify_messages_left(port: int, queue: str) -> int:
    """``classify_ids`` messages still in Redis: queued, or delivered and never acknowledged."""
    import redis

    client = redis.Redis(port=port)
    try:
        raw = list(client.lrange(queue, 0, -1)) + [json.loads(v)[0] for v in client.hvals("unacked")]
    finally:
        client.close()
    messages = [json.loads(m) if isinstance(m, bytes) else m for m in raw]
    return sum(1 for m in messages if m["headers"]["task"] == "sorter.classify_ids")


def test_redis_killed_mid_batch_the_worker_survives_and_classifies_each_instance_once(
    tmp_path, pg_url, tiny_model, redis_server, monkeypatch
):
    queue = f"sorter-outage-{uuid.uuid4().hex[:8]}"
    env = {
        "SORTER_BROKER_URL": redis_server.url,
        "SORTER_QUEUE": queue,
        "SORTER_VISIBILITY_TIMEOUT": VISIBILITY_S,
    }
    for key, value in env.items():  # for the producer: `sorter scan` in this process
        monkeypatch.setenv(key, value)
    log = tmp_path / "worker.log"
    # Two pool processes: one holds the batch, the other leaves a BRPOP waiting on Redis.
    extra = ("--concurrency", "2", "--sweep-interval", SWEEP_INTERVAL_S, "--sweep-age", SWEEP_AGE_S)
    worker = _start_worker(pg_url, tiny_model, env, log, extra)
    lock_engine = create_db_engine(pg_url)
    lock = lock_engine.connect()
    try:
        _wait(
            "the worker and its two pool processes (model registered)",
            lambda: (
                " ready." in _text(log) and len(re.findall(r"worker process \d+: model", _text(log))) == 2
            ),
            worker,
            log,
            timeout=90,
        )
        held = lock.begin()
        lock.execute(sa.text("SELECT id FROM models FOR UPDATE")).all()
        first = _archive(tmp_path / "first", FIRST)
        scan(pg_url, tiny_model, first, tmp=tmp_path, extra=("--batch-size", "1000"))  # one task
        _wait(
            "the batch to wait on the models lock",
            lambda: scalar(pg_url, WAITING_ON_A_LOCK) > 0,
            worker,
            log,
            60,
        )

        redis_server.kill()  # mid-batch
        _wait(
            "the worker to see Redis gone", lambda: "Connection to broker lost" in _text(log), worker, log, 30
        )
        time.sleep(1.0)  # the consumer has torn its connection down by now (before the fix: died doing so)
        redis_server.start()
        held.rollback()  # the batch goes on and commits; its ack reaches the restarted Redis

        _wait(f"{FIRST} instances done", lambda: scalar(pg_url, DONE) == FIRST, worker, log, 60)
        # The worker consumes again after the outage: a batch sent now is classified too.
        scan(
            pg_url,
            tiny_model,
            _archive(tmp_path / "second", SECOND),
            tmp=tmp_path,
            extra=("--batch-size", "1000"),
        )
        _wait(
            f"{FIRST + SECOND} instances done",
            lambda: scalar(pg_url, DONE) == FIRST + SECOND,
            worker,
            log,
            60,
        )
        time.sleep(
            1.0
        )  # a duplicate delivery, if there were one, would have been classified and logged by now
        assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{_tail(log)}"
    finally:
        lock.close()
        lock_engine.dispose()
        _stop(worker)

    text = _text(log)
    sent = FIRST + SECOND
    classified = sum(int(n) for n in SUCCEEDED.findall(text))  # each batch's own count, redeliveries included
    rows = {
        "pending": int(scalar(pg_url, "SELECT count(*) FROM instances WHERE status = 'pending'")),
        "done": int(scalar(pg_url, DONE)),
        "predictions": int(scalar(pg_url, "SELECT count(*) FROM predictions")),
        "duplicate_predictions": int(
            scalar(
                pg_url,
                "SELECT count(*) FROM (SELECT instance_id FROM predictions GROUP BY instance_id, model_id "
                "HAVING count(*) > 1) AS d",
            )
        ),
    }
    left = _classify_messages_left(redis_server.port, queue)
    print(f"\nRedis outage mid-batch: sent {sent}, classified {classified}, {rows}, messages left {left}")
    assert "Unrecoverable error" not in text, _tail(log)
    assert rows == {"pending": 0, "done": sent, "predictions": sent, "duplicate_predictions": 0}, rows
    assert classified == sent, f"{classified} classifications for {sent} instances:\n{_tail(log)}"
    assert left == 0, "a batch's acknowledgement was lost: Redis would deliver it again"
    assert worker.returncode == 0, f"SIGTERM (a stop asked for) gave exit status {worker.returncode}"


def test_a_worker_stopped_by_an_error_exits_non_zero(tmp_path, sqlite_url, tiny_model):
    """What a supervisor sees (systemd ``Restart=on-failure``): Celery's "Unrecoverable error" is a failure.

    A Redis URL whose database is not a number makes kombu raise ``ValueError`` in the consumer,
    which Celery reports as an unrecoverable error (status 1); ``sorter worker`` used to exit 0.
    """
    log = tmp_path / "worker.log"
    env = {"SORTER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/not-a-number"}
    worker = _start_worker(sqlite_url, tiny_model, env, log, ("--concurrency", "1", "--sweep-interval", "0"))
    try:
        worker.wait(timeout=120)
    finally:
        _stop(worker)
    assert "Unrecoverable error" in _text(log), _tail(log)
    assert worker.returncode == 1, f"exit status {worker.returncode}:\n{_tail(log)}"
