"""``retinalgpt send FILE… --to DEST`` and ``retinalgpt echo DEST``: DICOM SCU utilities."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from worker.cli.common import ConfigOption, JsonOption, console, fail, one_line_errors, print_json, settings
from worker.dicom_params import peer_params


@one_line_errors
def send(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to send.", exists=True, dir_okay=False)],
    to: Annotated[str, typer.Option("--to", help="Name of a destination of kind dicom.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Send DICOM files to a configured destination by C-STORE; exit 1 if any instance failed."""
    from dicom_node.sender import send_files

    _quiet_network_library()
    peer = peer_params(settings(config), to)
    result = send_files(peer, files)
    if json_output:
        print_json({
            "peer": result.peer,
            "ok": result.ok,
            "association_error": result.association_error,
            "failure": result.failure,
            "instances": [
                {"source": r.source, "sop_instance_uid": r.sop_instance_uid, "status": r.status,
                 "ok": r.ok, "warning": r.warning, "failure": r.failure, "message": r.message}
                for r in result.instances
            ],
        })
    else:
        table = Table("File", "SOP Instance UID", "Status", "Result")
        for r in result.instances:
            status = f"0x{r.status:04X}" if r.status is not None else "-"
            outcome = ("[yellow]stored with warning[/]" if r.warning else "[green]stored[/]") if r.ok else (
                f"[red]{r.failure}[/] {r.message}")
            table.add_row(r.source, r.sop_instance_uid or "-", status, outcome)
        if result.instances:
            console.print(table)
    if result.association_error:
        fail(f"{result.association_error} ({result.association_failure})")
    if not result.ok:
        failed = sum(1 for r in result.instances if not r.ok)
        fail(f"{failed} of {len(result.instances)} instances not stored by {result.peer} ({result.failure})")
    if not json_output:
        console.print(f"{len(result.instances)} instances stored by {result.peer}", highlight=False)


@one_line_errors
def echo(
    destination: Annotated[str, typer.Argument(help="Name of a destination of kind dicom.")],
    config: ConfigOption = None,
) -> None:
    """Verify a DICOM destination with C-ECHO."""
    from dicom_node.sender import echo as c_echo

    _quiet_network_library()
    result = c_echo(peer_params(settings(config), destination))
    if not result.ok:
        fail(f"C-ECHO to {result.peer} failed: {result.message or f'status 0x{result.status:04X}'} ({result.failure})")
    console.print(f"C-ECHO to {result.peer}: success", highlight=False)


def _quiet_network_library() -> None:
    """pynetdicom logs every step; our commands report outcomes themselves in one line."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def register(app: typer.Typer) -> None:
    app.command("send")(send)
    app.command("echo")(echo)
