"""Fuzzed compressed files through every way in: ``sorter scan``, ``sorter watch`` and the Celery task.

The files are pydicom's compressed test files with bits flipped and tails cut
off (seeded: :mod:`fuzz_support`), plus one that makes pylibjpeg-rle's Rust
decoder panic. Whatever the codecs do with them, every file must end ``done``,
or ``failed``/``skipped`` with a reason, nothing may stay ``pending``, and the
run must go on.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from db_support import query, scalar, scan
from fuzz_support import Mutant, fuzz_archive, panicking_rle

# The queue fixtures (queue, pg_url, broker_env) and the worker process of the Celery tests.
from test_celery_worker import Worker, _wait_for, broker_env, pg_url, queue  # noqa: F401
from test_watch import wait_for, watching

from sorter.dicom.pixels import load_image
from sorter.errors import DecodeError

pytest_plugins = ["db_fixtures"]

#: Mutants per source file (16 sources): 192 files, each decoded in a few milliseconds.
PER_SOURCE = 12


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Mutant]]:
    """The fuzzed archive, and the panicking RLE file beside the mutants."""
    root = tmp_path_factory.mktemp("fuzz") / "archive"
    mutants = fuzz_archive(root, seed=0, per_source=PER_SOURCE)
    if panicking_rle(root / "panic" / "panic.dcm") is None:
        pytest.fail("no bit flip of MR_small_RLE.dcm makes pylibjpeg-rle panic any more: find a new one")
    return root, mutants


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.dcm"))


def _rows(url: str) -> dict[str, tuple[str, str | None]]:
    """``path -> (status, error)`` of every file the ledger holds."""
    sql = "SELECT f.path, i.status, i.error FROM files f JOIN instances i ON i.id = f.instance_id"
    return {r.path: (r.status, r.error) for r in query(url, sql)}


def _check_every_file_recorded(url: str, root: Path) -> Counter[tuple[str, str | None]]:
    rows = _rows(url)
    files = _files(root)
    assert sorted(rows) == files, "a fuzzed file has no ledger row"
    outcomes = Counter(rows.values())
    assert not [k for k in outcomes if k[0] == "pending"], outcomes
    assert not [k for k in outcomes if k[0] != "done" and not k[1]], f"a failure without a reason: {outcomes}"
    assert int(scalar(url, "SELECT count(*) FROM instances WHERE status = 'pending'")) == 0
    return outcomes


def test_the_panicking_file_never_raises_past_the_decoder(fuzzed):
    """pylibjpeg-rle panics; the next plugin (GDCM) gets its turn, and a failure is a DecodeError."""
    root, _ = fuzzed
    try:
        image = load_image(root / "panic" / "panic.dcm")
    except DecodeError as exc:
        assert "PanicException" in exc.detail
    else:
        assert image.frames.shape == (1, 64, 64)


def test_scan_records_every_fuzzed_file_and_finishes(fuzzed, sqlite_url, tiny_model, tmp_path):
    root, mutants = fuzzed
    summary = scan(sqlite_url, tiny_model, root, tmp=tmp_path)
    outcomes = _check_every_file_recorded(sqlite_url, root)
    assert summary["files"] == len(mutants) + 1
    # The codecs really were exercised: some mutants decode, others fail in the decoder.
    assert outcomes[("done", None)] > 0 and outcomes[("failed", "decode_error")] > 0, outcomes
    again = scan(sqlite_url, tiny_model, root, tmp=tmp_path)  # the next run has nothing left to do
    assert again["unchanged"] == len(mutants) + 1 and again["resumed"] == 0, again


def test_watch_records_every_fuzzed_file(fuzzed, sqlite_url, tiny_model, tmp_path):
    root, _ = fuzzed
    drop = tmp_path / "drop"
    drop.mkdir()  # before the watcher starts: a missing folder gets no file events, only rescans
    from sorter.db.session import open_database

    engine, _ = open_database(sqlite_url)
    engine.dispose()
    with watching(sqlite_url, tiny_model, drop, settle=0.2, rescan=3600):
        for path in _files(root):  # dropped in while the watcher runs: events, not the startup pass
            target = drop / os.path.relpath(path, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(path).read_bytes())
        wanted = len(_files(root))
        wait_for(
            lambda: (
                int(
                    scalar(
                        sqlite_url,
                        "SELECT count(*) FROM files f JOIN instances i ON i.id = f.instance_id "
                        "WHERE i.status != 'pending'",
                    )
                )
                >= wanted
            ),
            timeout=120,
            what="every dropped file in a terminal state",
        )
    _check_every_file_recorded(sqlite_url, drop)


def test_the_celery_task_records_every_fuzzed_file(fuzzed, pg_url, tiny_model, broker_env, tmp_path):  # noqa: F811
    root, _ = fuzzed
    scan(pg_url, tiny_model, root, tmp=tmp_path)  # registered and queued; the worker classifies
    worker = Worker(pg_url, tiny_model, broker_env, tmp_path / "worker.log")
    try:
        _wait_for(
            pg_url,
            "SELECT count(*) FROM instances WHERE status = 'pending'",
            lambda n: n == 0,
            worker,
            timeout=180,
        )
    finally:
        worker.stop()
    outcomes = _check_every_file_recorded(pg_url, root)
    given_up = {k: n for k, n in outcomes.items() if k[1] in ("task_error", "retries_exhausted")}
    assert not given_up, f"batches were given up instead of failing single files: {outcomes}"
    log = worker.output()
    assert "MaybeEncodingError" not in log and "PicklingError" not in log, log
