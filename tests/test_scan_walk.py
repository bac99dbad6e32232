"""The archive walk: order, links, loops and special files, without a database."""

from __future__ import annotations

import os
from pathlib import Path

from sorter.scan import source_of
from sorter.walk import count_files, distinct_roots, walk


def _names(root: Path) -> list[tuple[str, str | None]]:
    return [(os.path.relpath(e.path, root), e.reason) for e in walk([root])]


def test_files_come_depth_first_in_name_order(tmp_path):
    for rel in ("b/2", "b/1", "a/z/9", "a/3", "top"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert _names(tmp_path) == [("top", None), ("a/3", None), ("a/z/9", None), ("b/1", None), ("b/2", None)]
    assert count_files([tmp_path]) == 5


def test_a_folder_reachable_by_link_is_walked_once_under_its_real_path(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "up").symlink_to("..")
    entries = _names(tmp_path)
    assert ("real/f", None) in entries
    assert ("alias", "symlink_duplicate") in entries
    assert ("real/up", "symlink_loop") in entries
    assert len(entries) == 3


def test_special_files_and_broken_links_are_reported_not_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "self").symlink_to("self")
    assert sorted(_names(tmp_path)) == [
        ("dangling", "broken_symlink"),
        ("pipe", "not_regular_file"),
        ("self", "symlink_loop"),
    ]


def test_excluded_paths_are_never_yielded_and_roots_may_be_files(tmp_path):
    (tmp_path / "sorter.db").write_text("db")
    (tmp_path / "image.dcm").write_text("x")
    found = [e.path for e in walk([tmp_path], exclude=frozenset({str(tmp_path / "sorter.db")}))]
    assert found == [str(tmp_path / "image.dcm")]
    assert [e.size for e in walk([tmp_path / "image.dcm"])] == [1]


def test_roots_given_twice_or_inside_another_are_walked_once(tmp_path):
    """``sorter scan /a /a /a/b`` read and counted every file of /a/b three times."""
    for rel in ("a/1", "a/b/2", "c/3"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    a, b, c = tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c"
    (tmp_path / "alias").symlink_to(a)
    roots = [b, a, f"{a}{os.sep}", tmp_path / "alias", b / "2", c]
    assert distinct_roots(roots) == [str(a), str(tmp_path / "alias"), str(c)]
    assert sorted(os.path.relpath(e.path, tmp_path) for e in walk(roots)) == ["a/1", "a/b/2", "c/3"]
    assert count_files(roots) == 5  # cheap and approximate: the alias is counted, not walked
    # Only ancestors contain: a sibling sharing a prefix is its own root, "/" holds everything.
    assert distinct_roots(["/x/y", "/x/yz", "/x/y/z", "/x/y/z/"]) == ["/x/y", "/x/yz"]
    assert distinct_roots(["/data/a.dcm", "/", "/data"]) == ["/"]
    # 5 000 files named on the command line (xargs) took 7 s of pairwise comparing; one each now.
    many = [f"/archive/s{i // 100}/f{i}.dcm" for i in range(5000)]
    assert distinct_roots([*many, "/archive/s7"]) == [m for m in many if not m.startswith("/archive/s7/")] + [
        "/archive/s7"
    ]


def test_the_default_source_is_the_first_folder_under_the_root():
    assert source_of("/archive/siteA/2020/x.dcm", "/archive") == "siteA"
    assert source_of("/archive/x.dcm", "/archive") == "archive"


def test_registration_batches_start_small_and_double_up_to_the_full_size():
    from sorter.scan import _batched

    sizes = [len(chunk) for chunk in _batched(((i, "root") for i in range(2000)), 500, 64)]  # type: ignore[misc]
    assert sizes == [64, 128, 256, 500, 500, 500, 52]
    assert [len(c) for c in _batched(((i, "r") for i in range(3)), 500, 64)] == [3]  # type: ignore[misc]
    assert list(_batched(iter([]), 500, 64)) == []
