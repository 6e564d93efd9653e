"""Pipeline roles and operations: ``worker``, ``up``, ``analyze``, ``jobs list`` / ``jobs retry``."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from worker.cli.common import (
    CommandError,
    ConfigOption,
    JsonOption,
    console,
    one_line_errors,
    print_json,
    settings,
)

QueuesOption = Annotated[str, typer.Option("--queues", "-Q", help="Comma-separated: inference, delivery.")]


@one_line_errors
def worker(
    config: ConfigOption = None,
    queues: QueuesOption = "inference,delivery",
    concurrency: Annotated[int | None, typer.Option(min=1, help="Worker processes/threads.")] = None,
) -> None:
    """Run a Celery worker for the inference and/or delivery queue."""
    from worker.roles import parse_queues, run_worker

    effective = settings(config)
    try:
        chosen = parse_queues(queues)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    run_worker(effective, chosen, concurrency)


@one_line_errors
def up(
    config: ConfigOption = None,
    api: Annotated[bool, typer.Option("--api/--no-api", help="Also run the HTTP API.")] = True,
) -> None:
    """Run node, inference worker, delivery worker and API as one process tree (embedded default)."""
    from worker.db.migrate import upgrade
    from worker.roles import Supervisor, up_roles

    effective = settings(config)
    upgrade(effective.database.url)
    supervisor = Supervisor(effective._toml_file, up_roles(with_api=api and _api_available()))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, supervisor.request_stop)
    supervisor.start()
    console.print(f"RetinalGPT up: {', '.join(c.name for c in supervisor.children)} (Ctrl-C stops all)")
    raise typer.Exit(supervisor.wait())


def _api_available() -> bool:
    from importlib.util import find_spec

    return find_spec("worker.api") is not None


@one_line_errors
def analyze(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files, plain images or folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    config: ConfigOption = None,
) -> None:
    """Run the whole pipeline offline (no network, no broker) and write analysis.json, sr.dcm,
    fhir-bundle.json, key images and the PDF report."""
    from worker.pipeline.offline import analyze_offline
    from worker.pipeline.sources import SourceError

    effective = settings(config)
    try:
        folders = analyze_offline(effective, paths, out, progress=console)
    except SourceError as exc:  # an unreadable file or a hostile UID: one line, nothing written
        raise CommandError(str(exc)) from None
    for folder in folders:
        console.print(f"results in [bold]{folder}[/]", highlight=False)


jobs_app = typer.Typer(help="Pipeline jobs.", no_args_is_help=True)


@jobs_app.command("list")
@one_line_errors
def jobs_list(
    config: ConfigOption = None,
    json_output: JsonOption = False,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state (queued, running, failed, dead…).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 100,
) -> None:
    """List jobs and deliveries, newest first."""
    from worker.pipeline.operations import list_jobs

    rows = list_jobs(settings(config), state=state, limit=limit)
    if json_output:
        print_json(rows)
        return
    table = Table("Kind", "ID", "Study", "Rev", "Target", "State", "Attempts", "Updated", "Reason", "Error")
    for row in rows:
        table.add_row(row["kind"], str(row["id"]), row["study_instance_uid"], str(row["revision"]), row["target"],
                      row["state"], str(row["attempts"]), row["updated_at"][:19], row["reason"] or "",
                      (row["error"] or "")[:60])
    console.print(table)


@jobs_app.command("retry")
@one_line_errors
def jobs_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Job IDs; default: every failed or dead job.")] = None,
    config: ConfigOption = None,
) -> None:
    """Queue failed or dead analysis jobs (and dead deliveries of their studies) again."""
    from worker.pipeline.operations import retry_jobs

    for line in retry_jobs(settings(config), ids or [], progress=console):
        console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("up")(up)
    app.command("analyze")(analyze)
    app.add_typer(jobs_app, name="jobs")
