"""``sorter watch`` with a real folder, a real watchdog observer thread, real DICOM files and SQLite."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from db_support import copy_dicom, pydicom_file, query, scalar, tree_rules
from prometheus_client import CollectorRegistry
from support import stop_process_group, wait_for

from sorter.cli import main
from sorter.commands.watch import serve
from sorter.config import Settings
from sorter.metrics import Metrics
from sorter.summary import RunSummary
from sorter.watch import After, move_without_overwrite

pytest_plugins = ["db_fixtures"]

TIMEOUT_S = 20.0


def state(url: str, path: Path) -> tuple[str, str | None, str] | None:
    """``(status, error, instance path)`` of the instance the ledger links ``path`` to."""
    rows = query(
        url,
        "SELECT i.status, i.error, i.path FROM files f JOIN instances i ON i.id = f.instance_id "
        "WHERE f.path = :p",
        p=str(path),
    )
    return tuple(rows[0]) if rows else None


def terminal(url: str, path: Path) -> tuple[str, str | None, str] | None:
    found = state(url, path)
    return found if found is not None and found[0] != "pending" else None


def dicom_bytes(tmp_path: Path, name: str = "CT_small.dcm") -> bytes:
    """A real DICOM file under fresh UIDs, as bytes (written into the folder by the test)."""
    staged = copy_dicom(pydicom_file(name), tmp_path / "staging" / f"{time.monotonic_ns()}.dcm")
    return staged.read_bytes()


@contextmanager
def watching(
    url: str, model: Path, root: Path, *, after: str = "keep", settle: float = 0.3, rescan: float = 0.3
) -> Iterator[threading.Thread]:
    """Run the watcher in a thread; stop it and check that it ended cleanly."""
    settings = Settings.from_env(
        {},
        database_url=url,
        model=model,
        workers=1,
        batch_size=4,
        after=after,
        settle=settle,
        rescan=rescan,
    )
    stop = threading.Event()
    errors: list[BaseException] = []
    results: list[RunSummary] = []

    def target() -> None:
        try:
            results.append(serve(settings, root, stop))
        except BaseException as exc:  # surfaced in the test's thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name="watcher", daemon=True)
    thread.start()
    try:
        # The model row is committed just before the observer starts.
        wait_for(lambda: errors or scalar(url, "SELECT count(*) FROM models"), what="watcher start")
        assert not errors, errors
        yield thread
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "the watcher did not stop"
    assert not errors, errors
    assert len(results) == 1


@pytest.fixture()
def url(sqlite_url: str, tmp_path: Path) -> str:
    # The schema exists before the polling starts (the watcher would create it anyway).
    from sorter.db.session import open_database

    engine, _ = open_database(sqlite_url)
    engine.dispose()
    return sqlite_url


def test_startup_pass_then_events_for_files_renamed_into_place(url, tiny_model, tmp_path):
    root = tmp_path / "drop"
    before = copy_dicom(pydicom_file("CT_small.dcm"), root / "siteA" / "before.dcm")
    with watching(url, tiny_model, root, rescan=3600) as thread:  # no rescan: startup pass and events only
        assert wait_for(lambda: terminal(url, before), what="pre-existing file")[0] == "done"

        temp = root / "siteB" / "mr.dcm.tmp"
        temp.parent.mkdir()
        temp.write_bytes(dicom_bytes(tmp_path, "MR_small.dcm"))
        time.sleep(0.5)  # longer than the settle time: a temporary name is never read
        assert scalar(url, "SELECT count(*) FROM files WHERE path = :p", p=str(temp)) == 0
        final = root / "siteB" / "mr.dcm"
        os.rename(temp, final)
        assert wait_for(lambda: terminal(url, final), what="renamed file")[0] == "done"
        assert thread.is_alive()
    sources = {row.path: row.source for row in query(url, "SELECT path, source FROM instances")}
    assert sources == {str(before): "siteA", str(final): "siteB"}
    assert scalar(url, "SELECT count(*) FROM predictions") == 2


def test_a_slowly_copied_file_is_read_only_once_it_has_settled(url, tiny_model, tmp_path):
    root = tmp_path / "drop"
    root.mkdir()
    data = dicom_bytes(tmp_path)
    target = root / "slow.dcm"
    with watching(url, tiny_model, root, settle=1.0, rescan=0.2):
        with target.open("wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(0.6)  # a pause shorter than the settle time, with rescans meanwhile
            assert state(url, target) is None, "read before it settled"
            out.write(data[len(data) // 2 :])
        assert wait_for(lambda: terminal(url, target), what="slow file") == ("done", None, str(target))
    assert scalar(url, "SELECT count(*) FROM instances") == 1  # no leftover 'truncated' failure


def test_broken_files_fail_with_a_reason_and_the_watcher_keeps_going(url, tiny_model, tmp_path):
    root = tmp_path / "drop"
    root.mkdir()
    good_data = dicom_bytes(tmp_path)
    with watching(url, tiny_model, root) as thread:
        truncated = root / "truncated.dcm"
        truncated.write_bytes(good_data[:200])
        notes = root / "notes.txt"
        notes.write_text("not an image\n")
        assert wait_for(lambda: terminal(url, truncated), what="truncated")[:2] == ("failed", "truncated")
        assert wait_for(lambda: terminal(url, notes), what="text file")[:2] == ("failed", "not_dicom")

        good = root / "good.dcm"
        good.write_bytes(good_data)
        assert wait_for(lambda: terminal(url, good), what="good file")[0] == "done"
        assert thread.is_alive()
    statuses = sorted(tuple(r) for r in query(url, "SELECT status, error FROM instances"))
    assert statuses == [("done", None), ("failed", "not_dicom"), ("failed", "truncated")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_recorded(url, tiny_model, tmp_path):
    root = tmp_path / "drop"
    root.mkdir()
    locked = root / "locked.dcm"
    locked.write_bytes(dicom_bytes(tmp_path))
    locked.chmod(0)
    with watching(url, tiny_model, root):
        assert wait_for(lambda: terminal(url, locked))[:2] == ("failed", "permission_denied")


def test_after_move_keeps_the_relative_path_and_never_overwrites(url, tiny_model, tmp_path):
    root, done_dir = tmp_path / "drop", tmp_path / "sorted"
    existing = done_dir / "siteA" / "ct.dcm"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"already here")
    pre = copy_dicom(pydicom_file("MR_small.dcm"), root / "siteB" / "mr.dcm")
    with watching(url, tiny_model, root, after=f"move:{done_dir}"):
        src = root / "siteA" / "ct.dcm"
        src.parent.mkdir()
        src.write_bytes(dicom_bytes(tmp_path))
        moved = done_dir / "siteA" / "ct-1.dcm"
        wait_for(lambda: moved.exists() and not src.exists(), what="move of the new file")
        wait_for(lambda: (done_dir / "siteB" / "mr.dcm").exists() and not pre.exists(), what="pre-existing")
    assert existing.read_bytes() == b"already here"
    rows = {Path(r.path).name: tuple(r) for r in query(url, "SELECT path, status FROM instances")}
    # Moved only once classified; the database follows the file to its new place.
    assert rows == {"ct-1.dcm": (str(moved), "done"), "mr.dcm": (str(done_dir / "siteB" / "mr.dcm"), "done")}
    assert state(url, moved) is not None


def test_after_delete_removes_only_files_recorded_as_finished(url, tiny_model, tmp_path):
    root = tmp_path / "drop"
    root.mkdir()
    with watching(url, tiny_model, root, after="delete"):
        good, notes = root / "ct.dcm", root / "notes.txt"
        good.write_bytes(dicom_bytes(tmp_path))
        notes.write_text("not an image\n")
        wait_for(lambda: not good.exists() and not notes.exists(), what="deletion")
    assert sorted(tuple(r) for r in query(url, "SELECT status, error FROM instances")) == [
        ("done", None),
        ("failed", "not_dicom"),
    ]


def test_move_without_overwrite_picks_a_free_name(tmp_path):
    (tmp_path / "a").write_text("A")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("old")
    (tmp_path / "out" / "a-1").write_text("old-1")
    assert move_without_overwrite(tmp_path / "a", tmp_path / "out" / "a") == tmp_path / "out" / "a-2"
    assert (tmp_path / "out" / "a-2").read_text() == "A" and not (tmp_path / "a").exists()
    assert (tmp_path / "out" / "a").read_text() == "old"


def test_after_parsing():
    assert After.parse("keep") == After("keep")
    assert After.parse("delete") == After("delete")
    assert After.parse("move:/x/y") == After("move", Path("/x/y"))
    with pytest.raises(ValueError):
        After.parse("move:")
    with pytest.raises(ValueError):
        After.parse("archive")


def test_cli_refuses_to_move_into_the_watched_folder(tmp_path, sqlite_url):
    root = tmp_path / "drop"
    root.mkdir()
    result = CliRunner().invoke(
        main, ["watch", str(root), "--after", f"move:{root / 'done'}", "--database-url", sqlite_url]
    )
    assert result.exit_code != 0 and "inside the watched folder" in result.output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_runs_until_a_signal_and_exits_cleanly(url, tiny_model, tmp_path, signum):
    root = tmp_path / "drop"
    copy_dicom(pydicom_file("CT_small.dcm"), root / "ct.dcm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SORTER_")}
    env |= {"SORTER_SETTLE": "0.2", "SORTER_RESCAN": "0.5", "SORTER_WORKERS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sorter",
            "watch",
            str(root),
            "--model",
            str(tiny_model),
            "--database-url",
            url,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: terminal(url, root / "ct.dcm"), timeout=60, what="classification by the CLI")
        assert process.poll() is None, "the watcher exited on its own"
        process.send_signal(signum)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            stop_process_group(process)
    assert process.returncode == (143 if signum == signal.SIGTERM else 0), output
    assert "stopped watching" in output and "1 classified" in output
    elapsed = float(re.search(r"\n1 file in ([0-9.]+) s", output)[1])  # type: ignore[index]
    assert elapsed > 0.2, output  # the watch's time, not 0.0 as when it was never recorded


def test_without_file_events_the_rescan_still_finds_files(url, tiny_model, tmp_path, monkeypatch):
    """As on NFS, or once inotify's queue overflowed: no events arrive, the periodic rescan covers."""
    import errno

    import sorter.watch

    def no_events(self: Any) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(sorter.watch.Observer, "start", no_events)
    root = tmp_path / "drop"
    root.mkdir()
    with watching(url, tiny_model, root, rescan=0.3) as thread:
        late = root / "late.dcm"
        late.write_bytes(dicom_bytes(tmp_path))
        assert wait_for(lambda: terminal(url, late), what="file found by the rescan")[0] == "done"
        assert thread.is_alive()


def test_a_watched_folder_deleted_and_made_again_is_watched_anew(url, tiny_model, tmp_path, caplog):
    """``rm -rf`` and ``mkdir``, or a share unmounted and mounted again: the old folder's file
    events are gone with it. Before, the new folder's files waited for the rescan, and the folder
    itself was recorded as a failed instance ("vanished")."""
    root = tmp_path / "drop"
    first = copy_dicom(pydicom_file("CT_small.dcm"), root / "first.dcm")
    with watching(
        url, tiny_model, root, rescan=3600
    ) as thread:  # no rescan: events alone after the first pass
        assert wait_for(lambda: terminal(url, first), what="the first file")[0] == "done"
        shutil.rmtree(root)
        wait_for(lambda: "is gone" in caplog.text, timeout=10, what="the folder's loss logged")
        root.mkdir()
        wait_for(lambda: "there again" in caplog.text, timeout=10, what="the folder's return logged")
        again = root / "again.dcm"
        again.write_bytes(dicom_bytes(tmp_path))
        assert wait_for(lambda: terminal(url, again), what="a file in the new folder")[0] == "done"
        assert thread.is_alive()
    assert scalar(url, "SELECT count(*) FROM instances WHERE path = :p", p=str(root)) == 0
    assert scalar(url, "SELECT count(*) FROM instances WHERE status = 'failed'") == 0


def test_a_failed_batch_is_retried(url, tiny_model, tmp_path, monkeypatch):
    from sorter.jobs.local import LocalExecutor

    real_drain = LocalExecutor.drain
    calls: list[int] = []

    def flaky_drain(self: LocalExecutor) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database went away")
        real_drain(self)

    monkeypatch.setattr(LocalExecutor, "drain", flaky_drain)
    root = tmp_path / "drop"
    root.mkdir()
    with watching(url, tiny_model, root, rescan=0.3) as thread:
        ct = root / "ct.dcm"
        ct.write_bytes(dicom_bytes(tmp_path))
        assert wait_for(lambda: terminal(url, ct), what="retried file")[0] == "done"
        assert thread.is_alive()
    assert len(calls) >= 2


def test_rules_file_each_batch_of_a_watched_folder(url, tiny_model, tmp_path):
    """`sorter watch --apply-rules`: the drop folder is sorted into a tree as files arrive."""
    root, tree = tmp_path / "drop", tmp_path / "sorted"
    root.mkdir()
    rules = tree_rules(tmp_path / "rules.toml", tree)
    settings = Settings.from_env(
        {}, database_url=url, model=tiny_model, workers=1, batch_size=2, settle=0.3, rescan=0.3, rules=rules
    )
    stop = threading.Event()
    metrics = Metrics(CollectorRegistry())
    thread = threading.Thread(
        target=serve, args=(settings, root, stop), kwargs={"metrics": metrics}, daemon=True
    )
    thread.start()
    try:
        for i in range(3):
            (root / f"{i}.dcm").write_bytes(dicom_bytes(tmp_path))
        wait_for(lambda: len(list(tree.rglob("*.dcm"))) == 3, what="three filed instances")
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
    assert query(url, "SELECT DISTINCT rule, status FROM rule_actions") == [("tree", "done")]
    done = metrics.registry.get_sample_value("sorter_rule_actions_total", {"rule": "tree", "result": "done"})
    assert done == 3
