"""The watcher records every path that is no readable file, with the reason ``sorter scan`` gives.

Real symlink loops, self-links, dangling links, a FIFO, a UNIX socket and a
link to a device; an unreadable folder is produced at the OS boundary (tests
may run as root, who reads every folder), as in ``test_scan_bad_input``.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

import pytest
from db_support import copy_dicom, pydicom_file, query, scan
from test_watch import wait_for, watching

from sorter.db.session import open_database

pytest_plugins = ["db_fixtures"]


def _zoo(root: Path) -> list[socket.socket]:
    """File-system entries that are not readable files, beside one good file; returns open sockets."""
    copy_dicom(pydicom_file("CT_small.dcm"), root / "ok" / "good.dcm")
    links = root / "links"
    links.mkdir()
    (links / "loop").symlink_to("..")  # a folder link back to an ancestor
    (links / "self").symlink_to("self")
    (links / "ring-a").symlink_to("ring-b")
    (links / "ring-b").symlink_to("ring-a")
    (links / "dangling.dcm").symlink_to(root / "nowhere.dcm")
    (links / "null").symlink_to("/dev/null")
    os.mkfifo(links / "fifo")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(links / "socket"))
    copy_dicom(pydicom_file("MR_small.dcm"), root / "locked" / "inside.dcm")
    return [server]


@pytest.fixture()
def locked_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """``scandir`` of any folder named ``locked`` fails with EACCES, in the scan and in the watcher."""
    real_scandir = os.scandir

    def scandir(path="."):  # type: ignore[no-untyped-def]
        if not isinstance(path, int) and Path(os.fsdecode(path)).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def _recorded(url: str, root: Path) -> set[tuple[str, str, str | None]]:
    rows = query(
        url, "SELECT f.path, i.status, i.error FROM files f JOIN instances i ON i.id = f.instance_id"
    )
    return {(os.path.relpath(r.path, root), r.status, r.error) for r in rows}


def test_the_watcher_records_what_the_scan_records(tmp_path, tiny_model, locked_folder):
    scanned_root, watched_root = tmp_path / "scanned", tmp_path / "watched"
    sockets = _zoo(scanned_root) + _zoo(watched_root)
    try:
        scan_url, watch_url = (f"sqlite:///{tmp_path / name}" for name in ("scan.db", "watch.db"))
        scan(scan_url, tiny_model, scanned_root, tmp=tmp_path)
        _create_schema(watch_url)
        expected = _recorded(scan_url, scanned_root)
        assert ("links/fifo", "skipped", "not_regular_file") in expected
        assert ("locked", "failed", "permission_denied") in expected
        assert len(expected) == 10, expected

        with watching(watch_url, tiny_model, watched_root, rescan=0.3):
            wait_for(lambda: _recorded(watch_url, watched_root) == expected, what="the scan's rows")
            # A later rescan does not record the same problems again.
            before = query(watch_url, "SELECT max(updated_at), count(*) FROM instances")[0]
            time.sleep(1.0)  # three rescans
        assert query(watch_url, "SELECT max(updated_at), count(*) FROM instances")[0] == before
    finally:
        for server in sockets:
            server.close()


def test_entries_that_appear_while_watching_are_recorded_from_their_events(
    url_for_watch, tiny_model, tmp_path
):
    root = tmp_path / "drop"
    root.mkdir()
    with watching(url_for_watch, tiny_model, root, rescan=3600):  # events only, no rescan
        os.mkfifo(root / "late-fifo")
        (root / "late-dangling.dcm").symlink_to(root / "not-there.dcm")
        (root / "late-self").symlink_to("late-self")
        wait_for(lambda: len(_recorded(url_for_watch, root)) == 3, what="three recorded entries")
    assert _recorded(url_for_watch, root) == {
        ("late-fifo", "skipped", "not_regular_file"),
        ("late-dangling.dcm", "failed", "broken_symlink"),
        ("late-self", "skipped", "symlink_loop"),
    }


def _create_schema(url: str) -> None:
    """The schema exists before the test polls it (the watcher would create it anyway)."""
    engine, _ = open_database(url)
    engine.dispose()


@pytest.fixture()
def url_for_watch(sqlite_url: str) -> str:
    _create_schema(sqlite_url)
    return sqlite_url
