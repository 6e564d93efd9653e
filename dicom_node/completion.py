"""Stable-study detection (DESIGN step 2).

A study is complete when no instance of it arrived for ``stable_seconds`` and no association that carried
it is still open; it is forced complete ``max_wait_seconds`` after it started receiving, even with an
association still open.

An association that ends without A-RELEASE (A-ABORT, dropped connection, network timeout) is not the end of
its studies: the sender was cut off and will probably send again. Such a study is *interrupted*: it waits for
a later association to bring an instance of it (and then for the usual stable window), or for
``max_wait_seconds``. Studies re-armed after a restart of the node get a fresh stable window and a fresh
``max_wait_seconds`` from the restart, since no sender could reach the node while it was down; those whose last
association had not been released (the node died under it) are interrupted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.params import CompletionParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Tracked:
    receiving_since: float
    last_received: float
    open_associations: set[int] = field(default_factory=set)
    interrupted: bool = False


class CompletionTracker:
    """Watches receiving studies and calls ``on_stable(study_uid)`` once each becomes complete.

    If ``on_stable`` raises, the study stays tracked and is tried again after another ``stable_seconds``.
    """

    def __init__(
        self,
        params: CompletionParams,
        on_stable: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.params = params
        self._on_stable = on_stable
        self._clock = clock
        self._studies: dict[str, _Tracked] = {}
        self._associations: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, study_uid: str, *, interrupted: bool = False) -> None:
        """Track a study known to be receiving (from the database after a restart): its stable window and
        its ``max_wait_seconds`` start now."""
        now = self._clock()
        with self._lock:
            tracked = self._studies.get(study_uid)
            if tracked is None:
                self._studies[study_uid] = _Tracked(now, now, interrupted=interrupted)
            else:
                tracked.last_received = now
                tracked.interrupted = tracked.interrupted or interrupted

    def instance_received(self, study_uid: str, association: int) -> None:
        """An instance of ``study_uid`` arrives on ``association`` (call before recording it)."""
        now = self._clock()
        with self._lock:
            tracked = self._studies.get(study_uid)
            if tracked is None:
                tracked = self._studies[study_uid] = _Tracked(now, now)
            self._touch(tracked, study_uid, association, now)

    def duplicate_received(self, study_uid: str, association: int) -> None:
        """An instance already stored arrives again: a sender re-sending a study after an interruption. It
        counts as activity of the study if the study is being tracked (it opens nothing)."""
        now = self._clock()
        with self._lock:
            tracked = self._studies.get(study_uid)
            if tracked is not None:
                self._touch(tracked, study_uid, association, now)

    def _touch(self, tracked: _Tracked, study_uid: str, association: int, now: float) -> None:
        tracked.last_received = now
        tracked.interrupted = False  # a later association took over from the one that was cut off
        tracked.open_associations.add(association)
        self._associations.setdefault(association, set()).add(study_uid)

    def association_closed(self, association: int, *, released: bool = True) -> None:
        """``association`` ended: with A-RELEASE (``released``) or cut off, which interrupts its studies."""
        with self._lock:
            for study_uid in self._associations.pop(association, set()):
                tracked = self._studies.get(study_uid)
                if tracked is not None:
                    tracked.open_associations.discard(association)
                    if not released:
                        tracked.interrupted = True
                        log.warning("study %s: its association was cut off; waiting for the sender to send "
                                    "again (or max_wait_seconds)", study_uid)

    def tracked(self) -> list[str]:
        with self._lock:
            return sorted(self._studies)

    def due(self) -> list[str]:
        """Studies complete now; they stop being tracked (until their next instance)."""
        now = self._clock()
        ready = []
        with self._lock:
            for study_uid, tracked in list(self._studies.items()):
                stable = (not tracked.open_associations and not tracked.interrupted
                          and now - tracked.last_received >= self.params.stable_seconds)
                forced = now - tracked.receiving_since >= self.params.max_wait_seconds
                if stable or forced:
                    if forced and not stable:
                        log.warning("study %s forced complete after max_wait_seconds", study_uid)
                    ready.append(study_uid)
                    del self._studies[study_uid]
        return ready

    def check(self) -> None:
        """Report every study that is complete now."""
        for study_uid in self.due():
            try:
                self._on_stable(study_uid)
            except Exception:
                log.exception("completion callback failed for study %s; retrying later", study_uid)
                self.arm(study_uid)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="study-completion", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.params.poll_seconds):
            self.check()
