"""``retinalgpt rules test FILE…``: which routing rule decides for each DICOM file, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from worker.cli.common import ConfigOption, JsonOption, console, err_console, print_json, settings


def test(
    files: Annotated[list[Path], typer.Argument(help="DICOM files to route.", exists=True, dir_okay=False)],
    calling_ae: Annotated[str | None, typer.Option(help="Calling AE title the file is taken to come from "
                                                       "(default: its Source Application Entity Title).")] = None,
    called_ae: Annotated[str | None, typer.Option(help="Called AE title (default: dicom.ae_title).")] = None,
    host: Annotated[str | None, typer.Option(help="Peer host the file is taken to come from (default: none).")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the rule that decides for each file (the first that matches, else the default), what it decides,
    and each test of every rule tried."""
    import pydicom

    from dicom_node.sop import ANALYSABLE_SOP_CLASSES
    from worker.routing import RouteInput, attribute_text, route

    effective = settings(config)
    results: list[dict[str, Any]] = []
    failed = False
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sop_class = str(ds.SOPClassUID)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, the others still routed
            err_console.print(f"[bold red]error:[/] {path}: not a readable DICOM file ({exc})", highlight=False)
            failed = True
            continue
        source_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip() if ds.file_meta else ""
        given = RouteInput(
            calling_ae=calling_ae if calling_ae is not None else source_ae,
            called_ae=called_ae if called_ae is not None else effective.dicom.ae_title,
            peer_host=host,  # absent unless given
            modality=attribute_text(ds, "Modality"),
            sop_class_uid=sop_class,
            attribute=lambda keyword, ds=ds: attribute_text(ds, keyword),
        )
        decision, tried = route(effective.rules, given)
        photograph = sop_class in ANALYSABLE_SOP_CLASSES
        results.append({
            "file": str(path),
            "input": {"calling_ae": given.calling_ae, "called_ae": given.called_ae, "peer_host": host,
                      "modality": given.modality, "sop_class_uid": sop_class},
            "rule": decision.rule,
            "analyse": decision.analyse,
            "analysed": decision.analyse and photograph,
            "forward": list(decision.forward),
            "priority": decision.priority.value,
            "why": list(decision.reasons),
            "tried": [{"rule": e.rule, "matched": e.matched, "checks": list(e.checks)} for e in tried],
        })
    if json_output:
        print_json(results)
    else:
        for result in results:
            _print(result)
    if failed:
        raise typer.Exit(1)


def _print(result: dict[str, Any]) -> None:
    console.print(f"[bold]{result['file']}[/]", highlight=False)
    given = result["input"]
    console.print(f"  from {given['calling_ae'] or '(no calling AE)'}@{given['peer_host'] or '(no host)'} to "
                  f"{given['called_ae']}, Modality {given['modality'] or '(none)'}, SOP Class {given['sop_class_uid']}",
                  highlight=False)
    for tried in result["tried"]:
        if not tried["matched"]:
            console.print(f"  rule {tried['rule']}: no — {tried['checks'][-1]}", highlight=False)
    console.print(f"  [green]rule {result['rule']}[/] decides:", highlight=False)
    for reason in result["why"]:
        console.print(f"    {reason}", highlight=False)
    if result["analysed"]:
        analysed = "yes"
    elif not result["analyse"]:
        analysed = f"no (rule {result['rule']}: analyse = false)"
    else:
        analysed = "no (SOP class is not a photograph class)"
    console.print(f"  analysed: {analysed}; forward: {', '.join(result['forward']) or 'nowhere'}; "
                  f"priority: {result['priority']}", highlight=False)


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Routing rules.", no_args_is_help=True)
    group.command("test")(test)
    app.add_typer(group, name="rules")
