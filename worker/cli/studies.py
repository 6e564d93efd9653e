"""``retinalgpt studies list`` / ``studies show UID``: what the node received, where each study is, and what its
current result says."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from model.schema import StudyAnalysis
from reporting import summary
from worker.cli.common import CommandError, ConfigOption, JsonOption, console, one_line_errors, print_json, settings
from worker.db import Database, StudyState
from worker.db.migrate import is_current
from worker.db.queries import current_analysis, get_study, list_studies, study_detail

studies_app = typer.Typer(help="Studies received by the node.", no_args_is_help=True)


def _database(config) -> Database:
    db = Database(settings(config).database.url)
    if not is_current(db.engine):
        db.dispose()
        raise CommandError("database schema is not current: run `retinalgpt db upgrade`")
    return db


@studies_app.command("list")
@one_line_errors
def list_command(
    config: ConfigOption = None,
    json_output: JsonOption = False,
    state: Annotated[StudyState | None, typer.Option(help="Only studies in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many studies.")] = 100,
) -> None:
    """List studies, most recently active first."""
    db = _database(config)
    try:
        with db.reading() as session:
            rows = list_studies(session, state=state, limit=limit)
    finally:
        db.dispose()
    if json_output:
        print_json(rows)
        return
    table = Table("Study Instance UID", "Patient", "Accession", "Date", "State", "Rev", "Images", "Last received")
    for row in rows:
        table.add_row(
            row["study_instance_uid"], f"{row['patient_id'] or ''} {row['patient_name'] or ''}".strip(),
            row["accession_number"] or "", row["study_date"] or "", row["state"], str(row["revision"]),
            str(row["instances"]), row["last_instance_at"][:19],
        )
    console.print(table)


@studies_app.command("show")
@one_line_errors
def show_command(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show one study with its series and instances and the result of its current revision: per image the
    present findings, the conditions the model was not trained on ("not assessed") and the disagreement flags."""
    db = _database(config)
    try:
        with db.reading() as session:
            study = get_study(session, study_uid)
            if study is None:
                raise CommandError(f"no study {study_uid}")
            detail = study_detail(study)
            analysis = current_analysis(session, study)
    finally:
        db.dispose()
    if json_output:
        print_json({**detail, "analysis": analysis.model_dump(mode="json") if analysis else None})
        return
    console.print(
        f"[bold]{detail['study_instance_uid']}[/]  state {detail['state']}  revision {detail['revision']}  "
        f"patient {detail['patient_id'] or '?'} {detail['patient_name'] or ''}  accession "
        f"{detail['accession_number'] or '-'}  date {detail['study_date'] or '-'}",
        highlight=False,
    )
    for series in detail["series"]:
        console.print(f"  series {series['series_instance_uid']} ({series['modality'] or '?'})", highlight=False)
        for inst in series["instances"]:
            use = "analysable" if inst["analysable"] else f"stored only: {inst['not_analysed_reason'] or 'not analysed'}"
            console.print(
                f"    {inst['sop_instance_uid']}  rev {inst['revision']}  {inst['laterality'] or '-'}  "
                f"{use}  {inst['size_bytes']} B  "
                f"from {inst['calling_ae_title']}@{inst['peer_host']}",
                highlight=False,
            )
    _print_result(analysis, detail["revision"])


def _print_result(analysis: StudyAnalysis | None, revision: int) -> None:
    if analysis is None:
        console.print(f"  result: none yet for revision {revision}", highlight=False)
        return
    model = f"{analysis.model.name} {analysis.model.version}" if analysis.model else "RetinalGPT not run"
    console.print(f"  result: revision {analysis.revision}, {model}, referral {analysis.referral.value}",
                  highlight=False, markup=False)
    if analysis.impression:
        console.print(f"    impression: {analysis.impression}", highlight=False, markup=False)
    for img in analysis.images:
        console.print(f"    {summary.image_text(analysis, img)}", highlight=False, markup=False)
        for d in img.disagreements:
            console.print(f"      {summary.disagreement_text(d)}", highlight=False, markup=False)


UidsArgument = Annotated[list[str], typer.Argument(help="Study Instance UIDs.")]


ArchiveOption = Annotated[str | None, typer.Option(
    "--from", help="The [[archives]] peer to retrieve from (default: the only one configured).")]


@studies_app.command("rerun")
@one_line_errors
def rerun_command(study_uids: UidsArgument, config: ConfigOption = None, archive: ArchiveOption = None) -> None:
    """Analyse studies again as a new revision whose results supersede the old ones. A study whose originals
    were purged (storage.retain_days) is first retrieved from the [[archives]] peer (C-FIND, then C-GET, or
    C-MOVE to our AE title which needs the node running); its instances open the new revision."""
    from worker.pipeline.jobs import PipelineError
    from worker.pipeline.operations import rerun_studies

    try:
        lines = rerun_studies(settings(config), study_uids, progress=console, archive=archive)
    except PipelineError as exc:
        raise CommandError(str(exc)) from None
    for line in lines:
        console.print(line, highlight=False)


@studies_app.command("resend")
@one_line_errors
def resend_command(study_uids: UidsArgument, config: ConfigOption = None) -> None:
    """Deliver the current results of studies again to every destination (dead deliveries included)."""
    from worker.pipeline.jobs import PipelineError
    from worker.pipeline.operations import resend_studies

    try:
        lines = resend_studies(settings(config), study_uids, progress=console)
    except PipelineError as exc:
        raise CommandError(str(exc)) from None
    for line in lines:
        console.print(line, highlight=False)


@studies_app.command("fetch")
@one_line_errors
def fetch_command(
    archive: Annotated[str | None, typer.Option("--from", help="The [[archives]] peer to fetch from (default: the "
                                                "only one configured).")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study Instance UID.")] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="Patient ID: every study of the patient.")] = None,
    since: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="With --patient: studies from this "
                                                   "date (Study Date) on.")] = None,
    config: ConfigOption = None,
) -> None:
    """Fetch studies from a query/retrieve archive for analysis (e.g. a backlog): C-FIND, then C-GET (or C-MOVE
    to the running node) of each matching study not stored here, with a progress bar; each is analysed once
    complete. Exits 1 when any study could not be fetched whole."""
    from worker.pipeline.jobs import PipelineError
    from worker.pipeline.operations import fetch_studies

    if (study is None) == (patient is None):
        raise CommandError("give either --study UID or --patient ID (with --since DATE)")
    if since is not None and patient is None:
        raise CommandError("--since goes with --patient")
    try:
        lines, ok = fetch_studies(settings(config), archive, study_uid=study, patient_id=patient,
                                  since=since.date() if since else None, console=console)
    except PipelineError as exc:
        raise CommandError(str(exc)) from None
    for line in lines:
        console.print(line, highlight=False, markup=False)
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(studies_app, name="studies")
