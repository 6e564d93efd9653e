"""``retinalgpt analyze``: the pipeline on local files, without network, broker or database.

DICOM files keep their study; plain images become one synthetic Ophthalmic Photography study whose source
instances are written next to the results (``sources/``) so the SR's references resolve.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.console import Console

from worker.config import Settings
from worker.pipeline.results import write_results
from worker.pipeline.sources import SourceImage, decode_limits, load_sources


def analyze_offline(settings: Settings, paths: list[Path], out: Path, progress: Console | None = None) -> list[Path]:
    """Analyse ``paths`` and write one result folder per study (``out`` itself for a single study)."""
    from reporting import build_report_objects
    from worker.reporting_params import report_options
    from worker.runtime import build_analyzer

    sources = load_sources(paths, decode_limits(settings))
    studies: dict[str, list[SourceImage]] = defaultdict(list)
    for source in sources:
        studies[str(source.dataset.StudyInstanceUID)].append(source)
    console = progress or Console(quiet=True)
    with console.status("loading the measurement pipeline and RetinalGPT"):
        analyzer = build_analyzer(settings)
    folders = []
    for study_uid, group in studies.items():
        folder = out if len(studies) == 1 else out / study_uid
        with console.status(f"analysing {len(group)} image(s) of study {study_uid}"):
            result = analyzer.analyze(group)
            objects = build_report_objects(
                result.analysis, [s.dataset for s in group], report_options(settings.reporting), vessel_masks=result.vessel_masks
            )
        write_results(folder, result.analysis, objects)
        synthetic = [s for s in group if s.from_plain_file]
        if synthetic:
            (folder / "sources").mkdir(parents=True, exist_ok=True)
            for source in synthetic:
                source.dataset.save_as(folder / "sources" / f"{source.sop_instance_uid}.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders
