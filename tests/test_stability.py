"""The file-stability tracker with a fake clock: no files, no sleeps."""

from __future__ import annotations

from sorter.stability import Candidate, StabilityTracker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(settle: float = 2.0, **kw: int) -> tuple[StabilityTracker, FakeClock]:
    clock = FakeClock()
    return StabilityTracker(settle, clock=clock, **kw), clock


def test_a_file_is_ready_only_after_it_stayed_the_same_for_the_settle_time():
    t, clock = tracker()
    t.observe("/d/a.dcm", 10, 1)
    clock.now += 1.9
    assert t.ready() == []
    clock.now += 0.1
    assert t.ready() == [Candidate("/d/a.dcm", 10, 1)]


def test_a_growing_file_restarts_its_settle_time():
    t, clock = tracker()
    t.observe("/d/a.dcm", 10, 1)
    clock.now += 1.5
    t.observe("/d/a.dcm", 20, 2)  # still being written
    clock.now += 1.5
    assert t.ready() == []
    t.observe("/d/a.dcm", 20, 2)  # the same again: does not restart the time
    clock.now += 0.5
    assert t.ready() == [Candidate("/d/a.dcm", 20, 2)]


def test_an_mtime_change_alone_restarts_the_settle_time():
    t, clock = tracker()
    t.observe("/d/a.dcm", 10, 1)
    clock.now += 1.5
    t.observe("/d/a.dcm", 10, 5)
    clock.now += 1.5
    assert t.ready() == []


def test_ready_takes_an_explicit_now():
    t, _clock = tracker()
    t.observe("/d/a.dcm", 10, 1)
    assert t.ready(now=101.0) == []
    assert [c.path for c in t.ready(now=102.0)] == ["/d/a.dcm"]


def test_handed_out_files_are_not_handed_out_again_unless_they_change():
    t, clock = tracker()
    t.observe("/d/a.dcm", 10, 1)
    clock.now += 2
    assert len(t.ready()) == 1
    assert len(t) == 0
    t.observe("/d/a.dcm", 10, 1)  # a rescan sees the same file again
    clock.now += 5
    assert t.ready() == []
    t.observe("/d/a.dcm", 11, 2)  # rewritten in place
    clock.now += 2
    assert t.ready() == [Candidate("/d/a.dcm", 11, 2)]


def test_forget_drops_a_vanished_file_and_its_handed_out_signature():
    t, clock = tracker()
    t.observe("/d/a.dcm", 10, 1)
    t.forget("/d/a.dcm")
    clock.now += 10
    assert t.ready() == []
    t.observe("/d/b.dcm", 10, 1)
    clock.now += 2
    assert len(t.ready()) == 1
    t.forget("/d/b.dcm")  # e.g. processing failed: the next observation counts again
    t.observe("/d/b.dcm", 10, 1)
    clock.now += 2
    assert [c.path for c in t.ready()] == ["/d/b.dcm"]
    t.forget("/d/never-seen.dcm")  # harmless


def test_limit_leaves_the_rest_for_the_next_call():
    t, clock = tracker()
    for i in range(5):
        t.observe(f"/d/{i}.dcm", 1, 1)
    clock.now += 2
    first = t.ready(limit=2)
    assert [c.path for c in first] == ["/d/0.dcm", "/d/1.dcm"]
    assert [c.path for c in t.ready()] == ["/d/2.dcm", "/d/3.dcm", "/d/4.dcm"]


def test_only_settled_files_are_returned_among_many():
    t, clock = tracker()
    t.observe("/d/old.dcm", 1, 1)
    clock.now += 1.5
    t.observe("/d/new.dcm", 1, 1)
    clock.now += 0.5
    assert [c.path for c in t.ready()] == ["/d/old.dcm"]
    assert len(t) == 1


def test_memory_is_bounded_for_waiting_and_handed_out_files():
    t, clock = tracker(max_tracked=3)
    for i in range(10):
        t.observe(f"/d/{i}.dcm", 1, 1)
    assert len(t) == 3 and t.dropped == 7
    clock.now += 2
    assert [c.path for c in t.ready()] == ["/d/7.dcm", "/d/8.dcm", "/d/9.dcm"]
    for i in range(10, 20):
        t.observe(f"/d/{i}.dcm", 1, 1)
        clock.now += 2
        t.ready()
    assert len(t._handed) == 3  # only the most recent signatures are remembered
    t.observe("/d/7.dcm", 1, 1)  # forgotten signature: tracked again (the DB ledger catches it)
    assert len(t) == 1


def test_zero_settle_time_hands_out_at_once():
    t, _clock = tracker(settle=0.0)
    t.observe("/d/a.dcm", 1, 1)
    assert len(t.ready()) == 1
