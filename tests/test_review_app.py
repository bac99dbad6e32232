"""The review app against a real database (SQLite and PostgreSQL) after a real scan.

Starlette's TestClient drives the ASGI app in-process; the database, the model, the stored files
and the pictures are real. The browser test is tests/test_review_browser.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from db_support import query, scan, sorter
from PIL import Image
from review_support import PER_SERIES, make_archive
from starlette.testclient import TestClient
from support import free_port, wait_for_port

from sorter.db.session import open_database
from sorter.model.artefact import DEFAULT_MODEL_PATH
from sorter.review.security import Access
from sorter.review.web import create_app

pytest_plugins = ["db_fixtures"]
pytestmark = pytest.mark.corpus

ORIGIN = {"origin": "http://testserver"}


@pytest.fixture()
def scanned(db_url: str, corpus: Path, tmp_path: Path) -> tuple[str, dict[str, str]]:
    uids = make_archive(corpus, tmp_path / "archive")
    summary = scan(db_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    assert summary["classified"] == PER_SERIES * 3
    return db_url, uids


def _client(url: str, access: Access | None = None) -> TestClient:
    _engine, sessions = open_database(url)
    return TestClient(create_app(sessions, access or Access(reviewer="ana")))


def _decide(client: TestClient, uid: str, decision: str, level: str = "series", **form: str):
    """Post a decision from the series page's own form (its CSRF token, the page's origin)."""
    page = client.get(f"/series/{uid}")
    data = {"csrf": _csrf(page.text), "level": level, "uid": uid, "decision": decision, **form}
    return client.post("/review", data=data, headers=ORIGIN, follow_redirects=False)


def _overview(client: TestClient, timeout_s: float = 60.0):
    """The overview page once its numbers are ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/")
        if 'id="computing"' not in response.text or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def test_queue_series_page_thumbnails_and_a_confirmed_decision(scanned):
    url, uids = scanned
    client = _client(url)
    first = client.get("/")  # computed in the background: the first visit says so
    assert first.status_code == 200 and ('id="computing"' in first.text or "Header label" in first.text)
    overview = _overview(client)
    assert "Header label" in overview.text and ">4</a>" in overview.text  # 4 MR-headed CT slices

    queue = client.get("/queue?level=series")
    assert queue.status_code == 200
    assert uids["ct_labelled_mr"] in queue.text
    assert uids["ct_honest"] not in queue.text and uids["mr_honest"] not in queue.text

    page = client.get(f"/series/{uids['ct_labelled_mr']}")
    assert page.status_code == 200
    thumbs = re.findall(r'src="(/instances/\d+/thumb\.png)"', page.text)
    assert len(thumbs) == PER_SERIES
    picture = client.get(thumbs[0])
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(picture.content))
    assert image.size == (256, 256) and len(np.unique(np.asarray(image))) > 20  # a picture, not a flat square
    assert "Modality" in page.text and "CT Image Storage" in page.text

    decided = _decide(client, uids["ct_labelled_mr"], "confirm", label="CT", note="CT slices")
    assert decided.status_code == 303, decided.text
    [row] = query(url, "SELECT * FROM reviews")
    assert (row.level, row.uid, row.decision, row.label, row.reviewer) == (
        "series",
        uids["ct_labelled_mr"],
        "confirm",
        "CT",
        "ana",
    )
    assert (row.header_label, row.shown_label, row.is_current, row.note) == ("MR", "CT", True, "CT slices")
    assert row.model_id is not None and row.shown_confidence > 0.5

    # the views carry the state; the default queue (unreviewed) is now empty
    states = {
        r.review_decision
        for r in query(
            url,
            "SELECT review_decision FROM latest_predictions "
            f"WHERE series_instance_uid = '{uids['ct_labelled_mr']}'",
        )
    }
    assert states == {"confirm"}
    assert uids["ct_labelled_mr"] not in client.get("/queue?level=series").text
    assert uids["ct_labelled_mr"] in client.get("/queue?level=series&review=confirm").text
    listed = sorter("discrepancies", "--level", "series", "--unreviewed", "--format", "csv", url=url).output
    assert uids["ct_labelled_mr"] not in listed

    # a second decision supersedes the first; both stay (the audit trail)
    assert _decide(client, uids["ct_labelled_mr"], "reject").status_code == 303
    rows = query(url, "SELECT decision, is_current, label FROM reviews ORDER BY id")
    assert [(r.decision, bool(r.is_current), r.label) for r in rows] == [
        ("confirm", False, "CT"),
        ("reject", True, "MR"),
    ]


def test_export_reviewed_writes_the_reviewers_labels(scanned, tmp_path):
    url, uids = scanned
    client = _client(url)
    assert _decide(client, uids["ct_labelled_mr"], "confirm").status_code == 303
    out = tmp_path / "reviewed.csv"
    sorter("export", "--reviewed", "--out", str(out), url=url)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == PER_SERIES
    assert {r["label"] for r in rows} == {"CT"} and {r["header_modality"] for r in rows} == {"MR"}
    report = sorter("report", "--format", "json", url=url).output
    assert '"review_precision"' in report and '"confirmed": 1' in report


def test_a_study_decision_covers_its_flagged_series_only(scanned):
    url, uids = scanned
    client = _client(url)
    page = client.get(f"/series/{uids['ct_labelled_mr']}")
    data = {"csrf": _csrf(page.text), "level": "study", "uid": uids["study_x"], "decision": "reject"}
    assert client.post("/review", data=data, headers=ORIGIN, follow_redirects=False).status_code == 303
    rows = query(url, "SELECT uid, via, decision FROM reviews")
    assert [(r.uid, r.via, r.decision) for r in rows] == [(uids["ct_labelled_mr"], "study", "reject")]


def test_state_changes_need_the_csrf_token_and_the_pages_origin(scanned):
    url, uids = scanned
    client = _client(url)
    page = client.get(f"/series/{uids['ct_labelled_mr']}")
    form = {"level": "series", "uid": uids["ct_labelled_mr"], "decision": "skip"}
    assert client.post("/review", data=form, headers=ORIGIN).status_code == 403  # no token
    assert client.post("/review", data={**form, "csrf": "0" * 64}, headers=ORIGIN).status_code == 403
    evil = {"origin": "http://127.0.0.1:9999"}
    assert client.post("/review", data={**form, "csrf": _csrf(page.text)}, headers=evil).status_code == 403
    other = TestClient(client.app)  # another browser: its own session, so the first one's token fails
    other.get("/")
    assert other.post("/review", data={**form, "csrf": _csrf(page.text)}, headers=ORIGIN).status_code == 403
    assert query(url, "SELECT count(*) FROM reviews")[0][0] == 0
    bad = client.post("/review", data={**form, "csrf": _csrf(page.text), "decision": "maybe"}, headers=ORIGIN)
    assert bad.status_code == 400 and "decision must be one of" in bad.text


def test_thumbnails_only_by_registered_id_and_no_patient_data_in_pages(scanned):
    url, uids = scanned
    client = _client(url)
    assert client.get("/instances/999999/thumb.png").status_code == 404
    assert client.get("/instances/..%2F..%2Fetc%2Fpasswd/thumb.png").status_code == 404
    page = client.get(f"/series/{uids['ct_labelled_mr']}").text
    names = {r[0] for r in query(url, "SELECT path FROM instances")}
    assert not any(Path(p).name in page for p in names)  # no file paths either
    assert "PatientName" not in page and "PatientID" not in page
    headers = client.get("/").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"


def test_token_login_and_bearer_scripts(scanned):
    url, uids = scanned
    token = "s3cret-token-of-some-length"
    client = _client(url, Access(token=token, reviewer="ana"))
    assert client.get("/queue", follow_redirects=False).headers["location"] == "/login"
    assert client.get("/api/queue").status_code == 401
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303
    assert uids["ct_labelled_mr"] in client.get("/queue").text
    bearer = TestClient(client.app, headers={"authorization": f"Bearer {token}"})
    body = bearer.get("/api/queue?level=series").json()
    assert [r["series_instance_uid"] for r in body["rows"]] == [uids["ct_labelled_mr"]]


def test_api_queue_limit_is_checked(scanned):
    """``limit=-5`` was a 500 with a traceback in the log, ``limit=0`` an empty page that looked
    like an empty queue, ``limit=abc`` Python's own words."""
    url, _uids = scanned
    client = _client(url)
    for limit in ("-5", "0", "abc"):
        response = client.get(f"/api/queue?level=series&limit={limit}")
        assert response.status_code == 400, response.text
        assert response.json()["error"] == f"limit must be a whole number from 1 to 500, not '{limit}'"
    for level in ("series", "study", "instance"):
        rows = client.get(f"/api/queue?level={level}&limit=100000").json()["rows"]  # capped, not refused
        assert rows and len(rows) <= 500
    assert len(client.get("/api/queue?level=instance&limit=1").json()["rows"]) == 1


def test_basic_auth_names_the_reviewer(scanned):
    url, uids = scanned
    access = Access(basic_user="bo", basic_password="pw-long-enough", reviewer="nobody")
    client = _client(url, access)
    assert client.get("/").status_code == 401
    client.auth = ("bo", "pw-long-enough")
    assert _decide(client, uids["ct_labelled_mr"], "skip").status_code == 303
    assert [r.reviewer for r in query(url, "SELECT reviewer FROM reviews")] == ["bo"]


def test_gradcam_overlay_for_the_predicted_label(scanned):
    url, uids = scanned
    client = _client(url)
    page = client.get(f"/series/{uids['ct_labelled_mr']}").text
    cam = re.findall(r'data-cam="(/instances/\d+/gradcam\.png\?label=\w+)"', page)[0]
    response = client.get(cam.replace("&amp;", "&"))
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "RGB" and image.size == (256, 256)
    assert client.get(cam.split("?")[0] + "?label=ZZ").status_code == 422
    # Without a label (or in lower case), the predicted label's map, not "the model has no label ".
    predicted = cam.rsplit("=", 1)[1]
    for suffix in ("", f"?label={predicted.lower()}"):
        other = client.get(cam.split("?")[0] + suffix)
        assert other.status_code == 200 and other.content == response.content, other.text


def test_a_thumbnail_of_a_deleted_file_says_why_without_its_path(scanned):
    """A file deleted since it was classified (spool retention, `watch --after delete`): the page
    said "cannot decode the stored file: UnreadableFile"."""
    url, _uids = scanned
    [(instance_id, path)] = query(
        url, "SELECT id, path FROM instances WHERE status = 'done' ORDER BY id LIMIT 1"
    )
    Path(path).unlink()
    response = _client(url).get(f"/instances/{instance_id}/thumb.png")
    assert response.status_code == 422
    assert response.text == (
        "cannot decode the stored file (unreadable: No such file or directory; it was deleted or moved "
        "since it was classified)"
    )
    assert Path(path).name not in response.text


def test_under_a_root_path_login_redirects_cookies_and_the_api_stay_under_it(scanned):
    """``--root-path /sorter`` (a reverse proxy's https://host/sorter/): what the browser test
    cannot see: the login's redirects, the session cookie's path, a decision's ``next`` that
    leaves the prefix, the JSON API, and the bare root pointing at the prefix."""
    url, uids = scanned
    token, target = "s3cret-token-of-some-length", uids["ct_labelled_mr"]
    _engine, sessions = open_database(url)
    client = TestClient(create_app(sessions, Access(token=token, reviewer="ana"), root_path="/sorter"))
    assert client.get("/", follow_redirects=False).headers["location"] == "/sorter/login"
    assert client.get("/sorter/queue", follow_redirects=False).headers["location"] == "/sorter/login"
    assert client.get("/sorter/api/queue").status_code == 401
    login_page = client.get("/sorter/login").text
    assert 'action="/sorter/login"' in login_page and 'href="/sorter/static/review.css"' in login_page
    logged_in = client.post("/sorter/login", data={"token": token}, follow_redirects=False)
    assert logged_in.headers["location"] == "/sorter/"
    assert "Path=/sorter/" in logged_in.headers["set-cookie"]
    page = client.get(f"/sorter/series/{target}")
    assert page.status_code == 200 and 'src="/sorter/instances/' in page.text
    assert 'href="/queue' not in page.text and 'src="/instances' not in page.text
    form = {"csrf": _csrf(page.text), "level": "series", "uid": target, "decision": "skip"}
    for given, landed in (
        ("/sorter/queue?level=study", "/sorter/queue?level=study"),
        ("/queue", "/sorter/queue"),
    ):
        done = client.post(
            "/sorter/review", data={**form, "next": given}, headers=ORIGIN, follow_redirects=False
        )
        assert done.status_code == 303 and done.headers["location"] == landed, given
    bearer = TestClient(client.app, headers={"authorization": f"Bearer {token}"})
    assert bearer.get("/sorter/api/queue?level=series&review=any").json()["rows"]
    assert client.get("/sorter/healthz").text == "ok\n"
    # The session cookie is the prefix's: a bare-root visit logs in again; without a token, the
    # bare root points at the prefix.
    assert client.get("/", follow_redirects=False).headers["location"] == "/sorter/login"
    open_page = TestClient(create_app(sessions, Access(reviewer="ana"), root_path="/sorter"))
    assert open_page.get("/", follow_redirects=False).headers["location"] == "/sorter/"
    for bad in ("sorter", "/a b", "/../x", "//evil.example", "/x?y"):
        refused = sorter("serve", "--root-path", bad, url=url, expect=2)
        assert "--root-path must be a URL path such as /sorter" in refused.output, bad


def test_serve_refuses_a_public_address_without_a_guard(tmp_path):
    result = sorter("serve", "--bind", "0.0.0.0", url=f"sqlite:///{tmp_path / 'x.db'}", expect=2)
    assert "refusing to serve" in result.output
    short = sorter(
        "serve", "--bind", "0.0.0.0", "--token", "short", url=f"sqlite:///{tmp_path / 'x.db'}", expect=2
    )
    assert "at least 16 characters" in short.output


@pytest.mark.slow
def test_the_loop_scan_review_export_fit_reclassify(sqlite_url, corpus, tmp_path):
    """The README's loop end to end: the reviewed labels reach a training run beside the corpus,
    and the model it makes classifies the archive again; the decisions stay with the series."""
    from train.cli import main as train_main
    from train.config import FitConfig
    from train.runs import select_rows

    uids = make_archive(corpus, tmp_path / "archive")
    scan(sqlite_url, DEFAULT_MODEL_PATH, tmp_path / "archive", tmp=tmp_path)
    client = _client(sqlite_url)
    assert _decide(client, uids["ct_labelled_mr"], "confirm").status_code == 303
    reviewed = tmp_path / "export" / "reviewed.csv"
    sorter("export", "--reviewed", "--out", str(reviewed), url=sqlite_url)

    both = (reviewed, corpus / "manifest.csv")
    rows = select_rows(both, FitConfig())
    mine = [r for r in rows if r.extra.get("sop_instance_uid")]
    assert len(mine) == PER_SERIES and {str(r.label) for r in mine} == {"CT"}
    assert all(r.path.is_file() for r in mine)  # each path against its own manifest's folder

    out = tmp_path / "run"
    args = ["fit", "--manifest", str(reviewed), "--manifest", str(corpus / "manifest.csv"), "--out", str(out)]
    result = CliRunner().invoke(
        train_main, [*args, "--dry-run", "--cache-dir", str(tmp_path / "cache"), "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    sorter("reclassify", "--model", str(out / "model.pt"), "--workers", "1", "--no-progress", url=sqlite_url)
    shown = query(
        sqlite_url,
        "SELECT DISTINCT model_sha256, review_decision FROM latest_predictions "
        f"WHERE series_instance_uid = '{uids['ct_labelled_mr']}'",
    )
    assert len(shown) == 1 and shown[0].review_decision == "confirm"


def test_without_a_login_only_loopback_host_names_are_served(scanned):
    """DNS rebinding: a page on evil.example that resolves itself to 127.0.0.1 sends Host:
    evil.example; without a login only loopback names (and the bound address) are served."""
    url, _uids = scanned
    access = Access(reviewer="ana", allowed_hosts=("127.0.0.1", "localhost"))
    client = _client(url, access)
    assert client.get("/", headers={"host": "evil.example:8080"}).status_code == 400
    assert client.get("/", headers={"host": "127.0.0.1:8080"}).status_code == 200


def test_scripts_review_through_the_json_api(scanned):
    url, uids = scanned
    token = "s3cret-token-of-some-length"
    client = _client(url, Access(token=token, reviewer="script"))
    bearer = TestClient(client.app, headers={"authorization": f"Bearer {token}"})
    body = {"level": "series", "uid": uids["ct_labelled_mr"], "decision": "confirm", "label": "CT"}
    response = bearer.post("/api/review", json=body)
    assert response.status_code == 200 and len(response.json()["recorded"]) == 1
    assert (
        bearer.post("/api/review", json={**body, "label": "MR"}).json()["error"].startswith("confirm means")
    )
    for other in ([body], "confirm", None):  # JSON, but not an object: each was a 500 with a traceback
        refused = bearer.post(
            "/api/review", content=json.dumps(other), headers={"content-type": "application/json"}
        )
        assert refused.status_code == 400 and refused.json()["error"].startswith(
            "the body must be a JSON object"
        )
    # a cookie client (the page's own script) needs the CSRF token
    local = _client(url)
    assert local.post("/api/review", json=body, headers=ORIGIN).status_code == 403
    csrf = local.get("/api/csrf").json()["csrf"]
    ok = local.post("/api/review", json=body, headers={**ORIGIN, "x-csrf-token": csrf})
    assert ok.status_code == 200
    assert [r.reviewer for r in query(url, "SELECT reviewer FROM reviews ORDER BY id")] == ["script", "ana"]


def _drop_queue_table(url: str) -> None:
    """Break the database under the page: the queue's table gone, every series list fails in SQL."""
    engine, _sessions = open_database(url)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE series_state"))
    engine.dispose()


def test_a_database_failure_is_a_503_with_one_line_not_a_traceback(sqlite_url, caplog):
    _drop_queue_table(sqlite_url)
    engine, sessions = open_database(sqlite_url)
    client = TestClient(create_app(sessions, Access(reviewer="ana")), raise_server_exceptions=False)
    page = client.get("/queue?level=series")
    assert page.status_code == 503 and "not answering" in page.text
    assert client.get("/api/queue").json()["error"].startswith("The results database")
    assert "Traceback" not in caplog.text and "no such table" in caplog.text
    engine.dispose()


def test_serve_says_in_one_line_when_it_cannot_read_the_database(sqlite_url):
    _drop_queue_table(sqlite_url)
    result = sorter("serve", "--port", "1", url=sqlite_url, expect=1)
    assert "cannot use the results database: no such table: series_state" in result.output
    assert "(is it migrated? sorter db check)" in result.output
    assert "Traceback" not in result.output


def _serve(port: int, database: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sorter", "serve", "--port", str(port)],
        env={**os.environ, "SORTER_DATABASE_URL": f"sqlite:///{database}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def test_serve_on_a_busy_port_says_so_in_one_line_and_announces_no_page(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = _serve(taken.getsockname()[1], tmp_path / "sorter.db")
        output, _ = process.communicate(timeout=60)
    # uvicorn used to log its own line after the page was announced, and exit with status 3.
    assert process.returncode == 1, output
    assert "Error: cannot serve on 127.0.0.1:" in output and "Address already in use" in output
    assert "review page on" not in output and "Traceback" not in output and "ERROR" not in output


def test_ctrl_c_stops_serve_with_status_0_as_watch_and_listen(tmp_path):
    port = free_port()
    process = _serve(port, tmp_path / "sorter.db")
    try:
        wait_for_port(port, process, timeout=60)  # type: ignore[arg-type]
    except BaseException:
        process.kill()
        raise
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output  # was 1, with click's "Aborted!"
    assert "review page stopped" in output and "Aborted" not in output


def test_the_overview_lists_the_stations_the_pixels_contradict(sqlite_url):
    from test_reports import _station_results

    _station_results(sqlite_url)
    table = _overview(_client(sqlite_url)).text.split('id="contradictions"')[1].split("</table>")[0]
    assert "CT_AS_NM" in table and "CT_SOMETIMES_PT" in table and "0.030" in table
    assert "0.0300 / 0.0" in table  # the mean the rule compared, and its bound
    assert "NM_HONEST" not in table and "CT_HONEST" not in table and "NM_LOOKS_PT" not in table
