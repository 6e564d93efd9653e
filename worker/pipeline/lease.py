"""Leases: work claimed in the database stays claimed only while its worker keeps renewing it.

A running job or a delivery being sent refreshes its row's ``updated_at`` every ``pipeline.heartbeat_seconds``
from a background thread; the bookkeeper takes work back only when that heartbeat has been silent for
``pipeline.stale_after_seconds`` (the worker died or hangs), never merely because the work is slow.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session

from worker.db import Database

log = logging.getLogger(__name__)


class Lease:
    """``with Lease(db, renew, interval, name):`` calls ``renew(session)`` in its own transaction every
    ``interval`` seconds until the block ends. ``renew`` returns how many rows it renewed; at 0 the claim was
    taken over (an operator or the bookkeeper moved the rows on) and renewing stops."""

    def __init__(self, db: Database, renew: Callable[[Session], int], interval: float, name: str) -> None:
        self._db, self._renew, self._interval, self._name = db, renew, interval, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._db.session() as session:
                    renewed = self._renew(session)
            except Exception:
                log.exception("renewing the lease of %s failed", self._name)
                continue
            if not renewed:
                log.warning("%s: the claim was taken over; no longer renewing it", self._name)
                return
