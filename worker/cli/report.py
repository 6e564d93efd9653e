"""``retinalgpt report ANALYSIS.json --source DCM… --out DIR``: result objects of a stored analysis.

Writes the same files as the pipeline (:mod:`worker.pipeline.results`): ``analysis.json``, ``sr.dcm``,
``seg-<n>.dcm`` (when ``reporting.segmentation``), ``key-image-<n>.dcm``, ``report.pdf`` and
``report-pdf.dcm``, and ``fhir-bundle.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import (
    CommandError,
    ConfigOption,
    JsonOption,
    console,
    one_line_errors,
    print_json,
    settings,
)
from worker.reporting_params import report_options


def _vessel_masks(paths: list[Path], sources: dict[Path, object]) -> dict[str, object]:
    """``<source stem>_vessels.png`` files (as ``retinalgpt measure`` writes them) by SOP Instance UID."""
    import numpy as np
    from PIL import Image

    by_stem = {path.stem: ds for path, ds in sources.items()}
    masks: dict[str, object] = {}
    for path in paths:
        stem = path.stem.removesuffix("_vessels")
        if stem not in by_stem:
            raise CommandError(
                f"vessel mask {path.name} matches no source (expected <source stem>_vessels.png)"
            )
        masks[str(by_stem[stem].SOPInstanceUID)] = np.asarray(Image.open(path).convert("L")) > 127
    return masks


@one_line_errors
def report(
    analysis_file: Annotated[Path, typer.Argument(help="StudyAnalysis JSON (as written by `analyze`).")],
    source: Annotated[list[Path], typer.Option("--source", "-s", help="Source DICOM instance (repeat).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    previous_sr: Annotated[
        Path | None, typer.Option("--previous-sr", help="SR of the previous revision, to supersede.")
    ] = None,
    vessel_mask: Annotated[
        list[Path] | None,
        typer.Option("--vessel-mask", help="<source stem>_vessels.png for the SEG (repeat)."),
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Build the SR, optional SEG / key images / PDF and the FHIR Bundle of an analysis."""
    import pydicom
    from pydantic import ValidationError

    from model.schema import StudyAnalysis
    from reporting import build_report_objects
    from worker.pipeline.results import write_results
    from worker.pipeline.sources import SourceError, check_uids

    cfg = settings(config)
    try:
        analysis = StudyAnalysis.model_validate_json(analysis_file.read_bytes())
    except OSError as exc:
        raise CommandError(f"cannot read {analysis_file}: {exc.strerror}") from None
    except ValidationError as exc:
        raise CommandError(f"{analysis_file} is not a StudyAnalysis: {exc.errors()[0]['msg']}") from None
    try:
        datasets = {path: pydicom.dcmread(path) for path in source}
        previous = pydicom.dcmread(previous_sr) if previous_sr else None
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise CommandError(f"cannot read DICOM input: {exc}") from None
    try:
        for path, dataset in datasets.items():
            check_uids(dataset, path)
    except SourceError as exc:
        raise CommandError(str(exc)) from None
    masks = _vessel_masks(vessel_mask or [], datasets)
    try:
        objects = build_report_objects(
            analysis,
            list(datasets.values()),
            report_options(cfg.reporting),
            vessel_masks=masks,
            previous_sr=previous,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    written = write_results(out, analysis, objects).all_files()
    if json_output:
        print_json(
            {
                "study_instance_uid": analysis.study_instance_uid,
                "revision": analysis.revision,
                "files": [str(p) for p in written],
            }
        )
        return
    console.print(
        f"[green]wrote {len(written)} files[/] for study {analysis.study_instance_uid} "
        f"revision {analysis.revision} to {out}"
    )
    for path in written:
        console.print(f"  {path.name}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
