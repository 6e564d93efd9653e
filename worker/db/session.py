"""Engine and session helpers.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` (a committed row survives power
loss) and foreign keys on. Sessions from :meth:`Database.session` begin with ``BEGIN IMMEDIATE`` so concurrent
writers queue on the busy timeout instead of failing with "database is locked" when a read lock is upgraded.
Sessions from :meth:`Database.reading` begin a deferred transaction (plain ``BEGIN``): in WAL mode a reader
sees a snapshot and never takes the write lock, so API readers and metrics scrapes never stand in the way of
the C-STORE path. A reading session must not write; it is closed without commit when it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "retinalgpt_read_only"
"""Execution option of the connections :meth:`Database.reading` uses: their transactions are deferred."""


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url`` with the SQLite settings above; parent folders of a SQLite file are created."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        from pathlib import Path

        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, echo=echo, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let the "begin" hook below issue BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


class Database:
    """An engine plus a session factory. ``with db.session() as s:`` commits on success, rolls back on error."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, echo=echo)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.readers = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False,
                                    autoflush=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads only: a deferred transaction (a snapshot, no write lock). It is closed, never
        committed, at the end (its transaction ends without writing); loaded objects stay readable."""
        with self.readers() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
