"""``retinalgpt measure IMAGE… --out DIR``: run the measurement pipeline only (issue 3).

Per image: ``<stem>.json`` (an :class:`~model.schema.ImageAnalysis`), ``<stem>_vessels.png`` (0/255 at the input
size) and ``<stem>_overlay.png`` (vessels coloured artery/vein, disc and cup outlines, zones B and C).
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


@one_line_errors
def measure(
    images: Annotated[
        list[Path], typer.Argument(help="Fundus photographs (PNG, JPEG, TIFF, …).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Measure fundus photographs: quality, vessels, artery/vein, optic disc/cup, vascular features."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    from rich.progress import Progress

    from model.analysis import AnalysisOptions, MeasurementPipeline

    cfg = settings(config).analysis
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise CommandError(f"no such image file: {', '.join(missing)}")
    try:
        pipeline = MeasurementPipeline(
            AnalysisOptions(
                vessel_method=cfg.vessel_method,
                definitions=cfg.definitions,
                field_angle_degrees=cfg.field_angle_degrees,
                working_size=cfg.working_size,
            )
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    with Progress(console=console, transient=True, disable=json_output) as progress:
        task = progress.add_task("measuring", total=len(images))
        for path in images:
            try:
                with Image.open(path) as img:
                    rgb = np.asarray(img.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise CommandError(f"{path}: not a readable image ({exc})") from None
            result = pipeline.analyze(rgb, file_path=str(path))
            stem = out / path.stem
            Path(f"{stem}.json").write_text(result.image.model_dump_json(indent=2) + "\n")
            Image.fromarray((result.vessels * 255).astype(np.uint8)).save(f"{stem}_vessels.png")
            Image.fromarray(result.overlay()).save(f"{stem}_overlay.png")
            quality = result.image.quality
            summary.append(
                {
                    "image": str(path),
                    "json": f"{stem}.json",
                    "quality": quality.grade.value if quality else None,
                    "score": round(quality.score, 3) if quality else None,
                    "measurements": len(result.image.measurements),
                }
            )
            progress.advance(task)
    if json_output:
        print_json(summary)
        return
    for row in summary:
        console.print(
            f"{row['image']}: quality {row['quality']} ({row['score']}), "
            f"{row['measurements']} measurements → {row['json']}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("measure")(measure)
