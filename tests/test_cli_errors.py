"""Every command checks its inputs and dependencies at start: one line that says what to do, a
non-zero status, no traceback (issue 13, "Errors a user can act on")."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom.data import get_testdata_file
from support import free_port

from sorter.cli import main
from sorter.config import Settings
from sorter.errors import QueueUnavailable


def _run(args: list[str], env: dict[str, str] | None = None) -> Result:
    # SORTER_ variables of the developer's shell must not change what is tested.
    clean: dict[str, str | None] = {name: None for name in os.environ if name.startswith("SORTER_")}
    return CliRunner().invoke(main, args, env={**clean, **(env or {})})


def _one_line_error(result: Result, status: int, *fragments: str) -> str:
    """The result failed with ``status`` and a single ``Error:`` line holding every fragment."""
    assert result.exit_code == status, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    folder = tmp_path / "archive" / "site"
    folder.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    return tmp_path / "archive"


def _instances(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "instances" not in tables:
            return 0
        return int(connection.execute("SELECT count(*) FROM instances").fetchone()[0])


# -- the broker -------------------------------------------------------------------------------


def test_scan_with_the_broker_down_says_so_and_registers_nothing(archive, tmp_path):
    db = tmp_path / "s.db"
    broker = f"redis://:secret@127.0.0.1:{free_port()}/0"
    result = _run(["scan", str(archive), "--database-url", f"sqlite:///{db}"], {"SORTER_BROKER_URL": broker})
    line = _one_line_error(result, 1, "cannot reach the broker", "unset SORTER_BROKER_URL")
    assert "secret" not in line  # the password is masked
    assert _instances(db) == 0


def test_watch_with_the_broker_down_says_so(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    result = _run(
        ["watch", str(drop), "--database-url", f"sqlite:///{tmp_path / 'w.db'}"],
        {"SORTER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"},
    )
    _one_line_error(result, 1, "cannot reach the broker")


def test_an_enqueue_that_fails_is_named_as_such_not_as_a_registration(tmp_path):
    """The listener logged "cannot register" when only the broker was away."""
    from sorter.jobs.celery_app import make_celery
    from sorter.jobs.queue import CeleryExecutor

    app = make_celery(Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    app.conf.broker_connection_timeout = 1
    executor = CeleryExecutor(app, batch_size=2, queue="sorter-test")
    with pytest.raises(QueueUnavailable, match="cannot send 2 registered instances to the queue"):
        executor.submit([1, 2])
    assert executor.sent == 0


# -- the device -------------------------------------------------------------------------------


def _skip_with_cuda() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA GPU: --device cuda is valid here")


@pytest.mark.parametrize("command", ["classify", "scan"])
def test_device_cuda_without_a_gpu_is_refused_at_start(command, archive, tmp_path):
    _skip_with_cuda()
    db = tmp_path / "d.db"
    extra = ["--database-url", f"sqlite:///{db}"] if command == "scan" else []
    result = _run([command, str(archive), "--device", "cuda", *extra])
    _one_line_error(result, 1, "--device cuda: no CUDA GPU", "--device cpu")
    assert _instances(db) == 0


def test_the_worker_refuses_a_device_it_cannot_use_instead_of_failing_every_task():
    _skip_with_cuda()
    result = _run(["worker", "--device", "cuda:0", "--broker-url", f"redis://127.0.0.1:{free_port()}/0"])
    _one_line_error(result, 1, "no CUDA GPU")


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_a_device_that_is_no_device_is_refused(device, archive):
    result = _run(["classify", str(archive), "--device", device])
    _one_line_error(result, 1, f"--device '{device}' is not a device", "cpu, cuda or cuda:N")


@pytest.mark.parametrize(
    ("device", "said"), [("tpu", "'tpu' is not a device"), ("cuda", "cuda: no CUDA GPU")]
)
def test_the_python_api_refuses_a_device_in_the_same_words(device, said):
    """`Classifier.load(device="cuda")` without a GPU raised torch's "Found no NVIDIA driver on
    your system", and "tpu" its list of twenty device types."""
    from sorter import Classifier
    from sorter.errors import ModelError

    if device == "cuda":
        _skip_with_cuda()
    with pytest.raises(ModelError, match=re.escape(f"device {said}")):
        Classifier.load(device=device)


@pytest.mark.parametrize("device", ["CPU", " cpu"])
def test_cpu_in_any_case_is_the_cpu(device, archive):
    """The --device check took "CPU" as the CPU, then torch refused it with a traceback."""
    result = _run(["classify", str(archive), "--device", device])
    assert result.exit_code == 0, result.output
    assert "1 of 1 files classified" in result.output


# -- the listener -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--ae-title", "A_TITLE_OF_17_CHR", "at most 16"),
        ("--ae-title", "   ", "empty"),
        ("--allow-ae", "PACS\\01", "no backslash"),
    ],
)
def test_an_ae_title_dicom_does_not_allow_is_refused(option, value, why, tmp_path):
    args = ["listen", "--port", str(free_port()), "--spool", str(tmp_path / "spool")]
    args += ["--ae-title", "SORTER"] if option != "--ae-title" else []
    result = _run([*args, option, value])
    _one_line_error(result, 2, "is not a DICOM AE title", why)


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_port_out_of_range_is_refused(port, tmp_path):
    result = _run(["listen", "--ae-title", "SORTER", "--port", port, "--spool", str(tmp_path / "s")])
    _one_line_error(result, 2, "'--port'", "1<=x<=65535")


@pytest.mark.parametrize(
    ("option", "value", "bound"),
    [("--max-associations", "0", "x>=1"), ("--timeout", "0", "x>0"), ("--min-free-mb", "-1", "x>=0")],
)
def test_a_listener_limit_that_would_refuse_everything_is_refused(option, value, bound, tmp_path):
    result = _run(
        ["listen", "--ae-title", "SORTER", "--port", "11112", "--spool", str(tmp_path / "s"), option, value]
    )
    _one_line_error(result, 2, f"'{option}'", bound)


def test_a_spool_that_cannot_be_a_folder_is_named_as_the_problem(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _run(
        ["listen", "--ae-title", "SORTER", "--port", str(free_port()), "--spool", str(blocker / "spool")],
        {"SORTER_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}"},
    )
    line = _one_line_error(result, 1, "cannot use the spool folder", "--spool")
    assert "cannot listen" not in line


# -- the database -----------------------------------------------------------------------------


def test_a_postgresql_url_without_its_driver_says_what_to_install(archive):
    # pg8000 is not a dependency: the same path as psycopg missing from a lean install.
    result = _run(["scan", str(archive), "--database-url", "postgresql+pg8000://sorter@127.0.0.1/test"])
    _one_line_error(result, 1, "driver is not installed", "dicom-sorter[postgres]")


def test_a_url_that_is_no_url_is_refused(archive):
    result = _run(["report", "--database-url", "not a url"])
    _one_line_error(result, 1, "is not a database URL", "sqlite:///")


@pytest.mark.parametrize("command", [["report"], ["scan"], ["db", "upgrade"]])
def test_a_postgresql_server_that_is_not_there_is_one_line_with_the_driver_s_words(command, archive):
    # psycopg's message comes on two lines and SQLAlchemy's text adds a web link: one line here.
    url = f"postgresql://sorter:secret@127.0.0.1:{free_port()}/test"
    args = command + ([str(archive)] if command == ["scan"] else []) + ["--database-url", url]
    line = _one_line_error(_run(args), 1, "Connection refused", "server running")
    assert "sqlalche.me" not in line and "secret" not in line


@pytest.mark.parametrize("command", [["report"], ["scan"], ["db", "upgrade"]])
def test_a_file_that_is_no_sqlite_database_is_one_line(command, archive, tmp_path):
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("the archive's notes, not a database\n")
    args = (
        command
        + ([str(archive)] if command == ["scan"] else [])
        + ["--database-url", f"sqlite:///{not_a_database}"]
    )
    _one_line_error(_run(args), 1, "file is not a database", "point --database-url at a results database")
    assert not_a_database.read_text() == "the archive's notes, not a database\n"


def test_a_database_that_cannot_be_written_ends_a_scan_with_one_line(archive, tmp_path):
    """The failure comes from the first write, past the opening checks (seen as a traceback with
    the model's 28 000-character spec in it); root writes files whatever their mode, so the
    database is opened read-only by its URL here."""
    db = tmp_path / "results.db"
    assert _run(["db", "upgrade", "--database-url", f"sqlite:///{db}"]).exit_code == 0
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"
    line = _one_line_error(_run(["scan", str(archive), "--database-url", read_only]), 1, "readonly database")
    assert "INSERT" not in line and "sqlalche.me" not in line
    assert _instances(db) == 0
    assert _run(["report", "--database-url", read_only]).exit_code == 0  # reading it still works


@pytest.mark.parametrize(
    "command",
    [
        ["find", "--label", "ct"],
        ["discrepancies"],
        ["report"],
        ["status"],
        ["failures"],
        ["models", "list"],
        ["export", "--out", "manifest.csv"],
    ],
)
def test_a_query_where_nothing_was_scanned_says_so_and_leaves_no_database(command, tmp_path, monkeypatch):
    """Run in the wrong directory, a query once created an empty sorter.db and printed no rows."""
    monkeypatch.chdir(tmp_path)
    _one_line_error(_run(command), 1, "no results database at", str(tmp_path / "sorter.db"), "sorter scan")
    assert not (tmp_path / "sorter.db").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--balanced"], "--balanced needs --per-label N"),
        (["--per-label", "5"], "--per-label only applies with --balanced"),
        (["--by-source"], "--by-source only applies with --balanced --per-label N"),
        (
            ["--reviewed", "--label-from", "header"],
            "--reviewed and --label-from cannot both choose the label",
        ),
    ],
)
def test_export_options_that_choose_nothing_are_refused(options, message, tmp_path, monkeypatch):
    """``--by-source`` without a quota wrote every row, as if it had not been asked for."""
    monkeypatch.chdir(tmp_path)
    _one_line_error(_run(["export", "--out", "manifest.csv", *options]), 2, message)
    assert not (tmp_path / "manifest.csv").exists()


def test_a_scan_creates_the_database_that_queries_then_read(archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scanned = _run(["scan", str(archive), "--no-progress"])
    assert scanned.exit_code == 0, scanned.output
    result = _run(["find", "--label", "ct", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 2  # the header and CT_small


def test_a_scan_of_the_folder_holding_its_database_leaves_the_database_alone(archive, monkeypatch):
    monkeypatch.chdir(archive)  # sorter.db and its journals land inside the scanned tree
    for _ in range(2):
        scanned = _run(["scan", ".", "--no-progress"])
        assert scanned.exit_code == 0, scanned.output
    failed = _run(["failures", "--format", "csv"])
    assert failed.exit_code == 0 and failed.output.splitlines()[1:] == [], failed.output


def test_a_database_at_a_revision_this_sorter_does_not_know_is_refused(archive, tmp_path):
    db = tmp_path / "future.db"
    url = f"sqlite:///{db}"
    assert _run(["db", "upgrade", "--database-url", url]).exit_code == 0
    with sqlite3.connect(db) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    result = _run(["scan", str(archive), "--database-url", url])
    _one_line_error(result, 1, "revision 9999_from_the_future", "does not know", "upgrade dicom-sorter")
    result = _run(["db", "upgrade", "--database-url", url])
    _one_line_error(result, 1, "9999_from_the_future", "sorter db history")


def test_db_history_downgrade_and_stamp(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    history = _run(["db", "history"])
    assert history.exit_code == 0, history.output
    revisions = [line.split()[0] for line in history.output.splitlines()]
    assert revisions[-1] == "0001" and len(revisions) >= 4
    head = revisions[0]
    assert _run(["db", "upgrade", "--database-url", url]).exit_code == 0
    down = _run(["db", "downgrade", revisions[1], "--database-url", url])
    assert down.exit_code == 0 and f"database at revision {revisions[1]}" in down.output, down.output
    stamped = _run(["db", "stamp", head, "--database-url", url])
    assert stamped.exit_code == 0 and f"stamped at revision {head}" in stamped.output, stamped.output
    assert f"current {head}, head {head}" in _run(["db", "current", "--database-url", url]).output
    _one_line_error(_run(["db", "downgrade", "nope", "--database-url", url]), 1, "nope")


def test_every_scan_flag_has_its_variable(archive, tmp_path):
    """ARCHITECTURE §6: ``sorter scan`` runs configured by the environment alone (a container, cron)."""
    from sorter.commands.scan import scan

    missing = [p.opts[0] for p in scan.params if p.param_type_name == "option" and not p.envvar]
    assert missing == []
    (archive / "site" / "notes.txt").write_text("not DICOM")
    summary = tmp_path / "summary.json"
    env = {
        "SORTER_DATABASE_URL": f"sqlite:///{tmp_path / 'env.db'}",
        "SORTER_FAIL_ON": "discrepancy failed",
        "SORTER_JSON_SUMMARY": str(summary),
        "SORTER_PROGRESS": "0",
        "SORTER_RETRY_FAILED": "1",
    }
    result = _run(["scan", str(archive)], env)
    assert result.exit_code == 3, result.output  # the text file failed
    assert json.loads(summary.read_text())["failed"] == {"not_dicom": 1}


@pytest.mark.parametrize(
    "command",
    [
        ["scan", "{archive}", "--json-summary", "{blocked}/summary.json"],
        ["export", "--out", "{blocked}/manifest.csv"],
        ["adapt", "--out", "{blocked}/work"],
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(command, archive, tmp_path):
    """A summary written after the whole scan, into a folder that could not be made, ended the run
    with a traceback (the folder's place taken by a file here)."""
    blocked = tmp_path / "taken"
    blocked.write_text("a file where a folder should be")
    db = tmp_path / "out.db"
    args = [a.format(archive=archive, blocked=blocked) for a in command] + [
        "--database-url",
        f"sqlite:///{db}",
    ]
    if command[0] != "scan":
        assert _run(["scan", str(archive), "--database-url", f"sqlite:///{db}"]).exit_code == 0
    before = _instances(db)
    _one_line_error(_run(args), 2, "cannot write in the folder", str(blocked), "Not a directory")
    assert _instances(db) == before  # the scan did not start


def test_a_summary_goes_into_folders_made_for_it(archive, tmp_path):
    summary = tmp_path / "reports" / "nightly" / "summary.json"
    result = _run(
        [
            "scan",
            str(archive),
            "--json-summary",
            str(summary),
            "--database-url",
            f"sqlite:///{tmp_path / 's.db'}",
        ]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(summary.read_text())["classified"] == 1


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
def test_a_file_the_os_refuses_to_read_is_one_line(archive, tmp_path):
    # /proc/self/mem exists and is a file, and reading it from its start fails with EIO.
    result = _run(
        [
            "scan",
            str(archive),
            "--model",
            "/proc/self/mem",
            "--database-url",
            f"sqlite:///{tmp_path / 'm.db'}",
        ]
    )
    _one_line_error(result, 1, "Input/output error")


def test_frames_0_is_refused_before_any_image_is_failed_for_it(archive, tmp_path):
    """``--frames 0`` once recorded every image of the scan as failed (decode_error)."""
    db = tmp_path / "frames.db"
    result = _run(["scan", str(archive), "--frames", "0", "--database-url", f"sqlite:///{db}"])
    _one_line_error(result, 1, "SORTER_FRAMES (--frames) must be at least 1, not 0")
    assert _instances(db) == 0


def test_a_bad_variable_the_command_does_not_use_is_still_one_line(archive, tmp_path):
    # One environment file serves every service: a typo in the worker's variable reaches scan too.
    result = _run(
        ["scan", str(archive), "--database-url", f"sqlite:///{tmp_path / 'v.db'}"],
        {"SORTER_SWEEP_AGE": "abc"},
    )
    _one_line_error(result, 1, "SORTER_SWEEP_AGE='abc' is not a valid float")


def test_failures_takes_known_reasons_only(archive, tmp_path):
    """A typo in --reason listed nothing, as if nothing had failed."""
    (archive / "site" / "notes.txt").write_text("not DICOM")
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert _run(["scan", str(archive), "--database-url", url]).exit_code == 0
    listed = _run(["failures", "--reason", "Not-DICOM", "--format", "csv", "--database-url", url])
    assert listed.exit_code == 0, listed.output
    assert "not_dicom" in listed.output and "notes.txt" in listed.output
    _one_line_error(
        _run(["failures", "--reason", "not_dicm", "--database-url", url]),
        2,
        "no reason not_dicm",
        "not_dicom, truncated",
    )
    # A reason of the other status listed nothing without a word (a link loop is skipped).
    (archive / "site" / "loop").symlink_to(archive)
    assert _run(["scan", str(archive), "--database-url", url]).exit_code == 0
    looped = _run(["failures", "--reason", "symlink_loop", "--database-url", url])
    assert (
        "0 failed" in looped.output
        and "skipped instances have that reason: list them with --skipped" in looped.output
    )
    listed = _run(["failures", "--reason", "symlink_loop", "--skipped", "--database-url", url])
    assert "loop" in listed.output and "have that reason" not in listed.output
    inverse = _run(["failures", "--skipped", "--reason", "not_dicom", "--database-url", url])
    assert "failed instances have that reason: list them without --skipped" in inverse.output
