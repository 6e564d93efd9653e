"""Stable-study detection (DESIGN step 2) with a controllable clock."""

from __future__ import annotations

from dicom_node.completion import CompletionTracker
from dicom_node.params import CompletionParams


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tracker(clock, fired, stable=10.0, max_wait=60.0):
    return CompletionTracker(CompletionParams(stable_seconds=stable, max_wait_seconds=max_wait), fired.append, clock)


def test_complete_only_after_stable_seconds_and_association_closed():
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired)
    tracker.instance_received("1.2.3", association=1)
    clock.now += 11
    tracker.check()
    assert fired == []  # association 1 still open
    tracker.association_closed(1)
    tracker.check()
    assert fired == ["1.2.3"]
    clock.now += 100
    tracker.check()
    assert fired == ["1.2.3"]  # fires once


def test_new_instance_restarts_the_stable_window():
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired)
    tracker.instance_received("1.2.3", association=1)
    tracker.association_closed(1)
    clock.now += 9
    tracker.instance_received("1.2.3", association=2)
    tracker.association_closed(2)
    clock.now += 9
    tracker.check()
    assert fired == []
    clock.now += 1
    tracker.check()
    assert fired == ["1.2.3"]


def test_forced_after_max_wait_even_with_open_association():
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired, stable=10, max_wait=30)
    for _ in range(4):
        tracker.instance_received("1.2.3", association=7)
        clock.now += 8
        tracker.check()
    assert fired == ["1.2.3"]


def test_armed_study_from_before_a_restart_gets_a_fresh_stable_window():
    """Re-armed after a restart: stable_seconds from the restart, whenever its last instance arrived."""
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired)
    tracker.arm("1.2.3")
    clock.now += 9
    tracker.check()
    assert fired == []
    clock.now += 1
    tracker.check()
    assert fired == ["1.2.3"]


def test_aborted_association_waits_for_a_later_association():
    """A sender cut off (A-ABORT, dropped connection) is not the end of its study: a later association that
    brings an instance (even one already stored) and is released makes it stable again."""
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired, stable=10, max_wait=600)
    tracker.instance_received("1.2.3", association=1)
    tracker.association_closed(1, released=False)
    clock.now += 100
    tracker.check()
    assert fired == []
    tracker.duplicate_received("1.2.3", association=2)
    tracker.instance_received("1.2.3", association=2)
    tracker.association_closed(2)
    clock.now += 10
    tracker.check()
    assert fired == ["1.2.3"]


def test_aborted_association_or_interrupted_restart_forced_after_max_wait():
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired, stable=10, max_wait=60)
    tracker.instance_received("1.2.3", association=1)
    tracker.association_closed(1, released=False)
    tracker.arm("4.5.6", interrupted=True)
    clock.now += 59
    tracker.check()
    assert fired == []
    clock.now += 1
    tracker.check()
    assert sorted(fired) == ["1.2.3", "4.5.6"]


def test_duplicate_of_an_untracked_study_arms_nothing():
    clock, fired = Clock(), []
    tracker = _tracker(clock, fired)
    tracker.duplicate_received("1.2.3", association=1)
    assert tracker.tracked() == []


def test_failing_callback_is_retried():
    clock, calls = Clock(), []

    def flaky(study_uid: str) -> None:
        calls.append(study_uid)
        if len(calls) == 1:
            raise RuntimeError("database busy")

    tracker = CompletionTracker(CompletionParams(stable_seconds=10, max_wait_seconds=60), flaky, clock)
    tracker.instance_received("1.2.3", association=1)
    tracker.association_closed(1)
    clock.now += 10
    tracker.check()
    assert tracker.tracked() == ["1.2.3"]
    clock.now += 10
    tracker.check()
    assert calls == ["1.2.3", "1.2.3"] and tracker.tracked() == []
