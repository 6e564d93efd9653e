"""``retinalgpt node``: run the DICOM listener (C-ECHO, C-STORE), the completion → pipeline hand-off and the
bookkeeper until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

import typer

from worker.cli.common import ConfigOption, console, one_line_errors, settings


@one_line_errors
def node(config: ConfigOption = None) -> None:
    """Run the DICOM node: receive studies, store them durably, detect completion, queue the analysis."""
    from worker.db.migrate import upgrade
    from worker.roles import start_node_role

    effective = settings(config)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger().setLevel(effective.log_level)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    upgrade(effective.database.url)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        running = start_node_role(effective)
    except OSError as exc:
        from worker.cli.common import fail

        fail(f"cannot listen on {effective.dicom.bind_address}:{effective.dicom.port}: {exc}")
    console.print(
        f"DICOM node [bold]{effective.dicom.ae_title}[/] on {effective.dicom.bind_address}:{running.port}",
        highlight=False,
    )
    try:
        stop.wait()
    finally:
        running.stop()
        console.print("DICOM node stopped")


def register(app: typer.Typer) -> None:
    app.command("node")(node)
