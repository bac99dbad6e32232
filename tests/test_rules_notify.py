"""Notify rules against a real HTTP receiver on loopback: one call per complete series, retried."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from db_support import query, scan, small_archive, sorter
from support import free_port

pytest_plugins = ["db_fixtures"]


class Receiver:
    """A webhook endpoint that refuses its first ``refuse`` calls with 503 and records the rest."""

    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.received: list[dict[str, Any]] = []
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.refused < receiver.refuse:
                    receiver.refused += 1
                    self.send_response(503)
                else:
                    receiver.received.append(body)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    found = Receiver(refuse=1)
    found.thread.start()
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()


def _rules(tmp_path: Path, url: str, quiet_s: float) -> Path:
    path = tmp_path / "notify.toml"
    path.write_text(
        f'mode = "all"\n[[rule]]\nname = "hook"\n[rule.notify]\nurl = "{url}"\nquiet_s = {quiet_s}\n'
    )
    return path


def test_one_call_per_complete_series_retried_after_a_refusal(db_url, tiny_model, tmp_path, receiver):
    drop = tmp_path / "drop"
    small_archive(drop)  # a CT series of 3, an MR series of 3, one colour image: 3 series
    # Queued while the series are "arriving" (a long quiet time), sent once they are complete.
    scan(
        db_url,
        tiny_model,
        drop,
        tmp=tmp_path,
        extra=("--apply-rules", str(_rules(tmp_path, receiver.url, 3600))),
    )
    assert receiver.refused == 0 and receiver.received == []
    rules = _rules(tmp_path, receiver.url, 0)
    sorter("rules", "apply", str(rules), url=db_url, expect=3)
    assert receiver.refused == 1 and len(receiver.received) == 2
    refused = query(db_url, "SELECT DISTINCT error, attempts FROM rule_actions WHERE status = 'failed'")
    assert refused == [("webhook_refused", 1)]

    result = sorter("rules", "apply", "--retry-now", str(rules), url=db_url)
    assert "hook:" in result.output
    sorter("rules", "apply", "--retry-now", str(rules), url=db_url)  # nothing left to send

    series = {
        row[0]
        for row in query(db_url, "SELECT DISTINCT series_instance_uid FROM instances WHERE status = 'done'")
    }
    assert sorted(body["series_instance_uid"] for body in receiver.received) == sorted(series)
    assert len(receiver.received) == 3
    ct = next(body for body in receiver.received if body["header_modality"] == "CT")
    assert (
        ct["n_instances"] == 3
        and ct["rule"] == "hook"
        and ct["verdict"] in {"agree", "disagree", "uncertain"}
    )
    assert not {"PatientName", "PatientID", "path"} & set(ct)  # never a patient, never a file name
    assert query(db_url, "SELECT DISTINCT status FROM rule_actions") == [("done",)]


def test_a_series_that_is_not_quiet_yet_waits(sqlite_url, tiny_model, tmp_path, receiver):
    drop = tmp_path / "drop"
    small_archive(drop)
    rules = _rules(tmp_path, receiver.url, 3600)
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path, extra=("--apply-rules", str(rules)))
    assert receiver.received == [] and receiver.refused == 0
    assert query(sqlite_url, "SELECT DISTINCT status, attempts FROM rule_actions") == [("pending", 0)]


def test_a_webhooks_secrets_are_never_shown(sqlite_url, tiny_model, tmp_path, receiver):
    """The path, query and user info of a webhook URL stay out of the database and the output."""
    drop = tmp_path / "drop"
    small_archive(drop)
    secret_url = f"http://hookuser:pa55word@127.0.0.1:{receiver.port}/services/T0/B0/t0ps3cret?token=k3y"
    summary = scan(
        sqlite_url,
        tiny_model,
        drop,
        tmp=tmp_path,
        extra=("--apply-rules", str(_rules(tmp_path, secret_url, 3600))),
    )
    outputs = [
        str(summary),
        sorter("rules", "apply", str(_rules(tmp_path, secret_url, 0)), url=sqlite_url, expect=3).output,
    ]
    assert receiver.refused == 1 and len(receiver.received) == 2  # the secret URL really was used
    outputs.append(sorter("rules", "failed", url=sqlite_url).output)
    rows = query(sqlite_url, "SELECT * FROM rule_actions")
    written = "\n".join([*outputs, *(str(value) for row in rows for value in row)])
    assert "webhook_refused" in written and f"http://127.0.0.1:{receiver.port}/... #" in written
    for secret in ("hookuser", "pa55word", "services", "t0ps3cret", "k3y"):
        assert secret not in written, secret


def test_a_webhook_that_is_down_is_tried_once_per_run(sqlite_url, tiny_model, tmp_path, caplog):
    """The first series whose call cannot connect leaves the others for the next run, with one
    warning for the series, not one per instance."""
    drop = tmp_path / "drop"
    small_archive(drop)  # 3 series, 7 instances
    scan(sqlite_url, tiny_model, drop, tmp=tmp_path)
    rules = _rules(tmp_path, f"http://127.0.0.1:{free_port()}/hook", 0)  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="sorter.rules.engine"):
        result = sorter("rules", "apply", str(rules), url=sqlite_url, expect=3)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "sorter.rules.engine"]
    assert "(webhook_unreachable, try 1)" in warning and "wait for the next run" in warning
    counts = dict(query(sqlite_url, "SELECT status, count(*) FROM rule_actions GROUP BY status"))
    assert counts["failed"] in (1, 3) and counts["failed"] + counts["pending"] == 7
    assert f"{counts['failed']} failed, {counts['pending']} wait for the next run" in result.output
