"""``retinalgpt demo``: the main job end to end on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import console, fail


def demo(
    home: Annotated[Path | None, typer.Option(help="Folder for the demo's files (default: a new temp folder).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the results.")] = 900.0,
) -> None:
    """Start node and workers in a temporary home, send a two-eye OP study from skimage's retina image by
    C-STORE, wait for the SR, key images, PDF and FHIR bundle, and print a summary."""
    from worker.demo import DemoError, print_summary, run_demo

    try:
        result = run_demo(home, console=console, timeout=timeout)
    except DemoError as exc:
        fail(str(exc))
    print_summary(result, console)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
