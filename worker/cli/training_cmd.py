"""Training module commands: ``data build``, ``train``, ``evaluate`` (issue 7; code in :mod:`training`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import CommandError, ConfigOption, JsonOption, console, one_line_errors, print_json, settings

data_app = typer.Typer(help="Instruction data from labelled fundus datasets.", no_args_is_help=True)

RecipeArgument = Annotated[Path, typer.Argument(help="training recipe (TOML, see docs/training.md)")]


def _recipe(path: Path):  # noqa: ANN202 - TrainConfig is imported lazily
    from pydantic import ValidationError

    from training.config import load_config

    try:
        return load_config(path)
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CommandError(f"{path}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def _progress():  # noqa: ANN202 - rich objects
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


@data_app.command("build")
@one_line_errors
def data_build(
    recipe: RecipeArgument,
    out: Annotated[Path, typer.Option("--out", help="folder for instructions.json, alignment.json, summary.json")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Build LLaVA-JSON conversations (3–6 turns) and stage-1 captions from the recipe's datasets."""
    settings(config)
    from training.llm import EndpointOptions, LLMQuestionWriter
    from training.trainer import build_data, load_records

    recipe_config = _recipe(recipe)
    try:
        records = load_records(recipe_config)
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    writer = None
    llm = recipe_config.data.llm
    if llm is not None:
        key = os.environ.get(llm.api_key_env) if llm.api_key_env else None
        writer = LLMQuestionWriter(EndpointOptions(llm.base_url, llm.model, key, llm.temperature))
    built = build_data(recipe_config, records, out, writer=writer)
    from training.trainer import built_summary

    summary = built_summary(built)
    if json_output:
        print_json(summary)
        return
    console.print(f"{summary['conversations']} conversations, {summary['captions']} captions → {out}")
    for source, count in sorted(summary["images_per_source"].items()):
        console.print(f"  {source}: {count} images")
    if summary["duplicates_merged"]:
        console.print(f"  duplicates merged: {summary['duplicates_merged']}")
    for source, count in summary["evaluation_only_refused"].items():
        console.print(f"  refused (evaluation-only): {source} {count}")


@data_app.command("export-feedback")
@one_line_errors
def data_export_feedback(
    since: Annotated[str, typer.Option("--since", help="first sign-off date (YYYY-MM-DD, UTC) to export")],
    out: Annotated[Path, typer.Option("--out", help="new folder for images/ and labels.csv (generic format)")],
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="share of patients (hashed) in the test split")] = 0.2,
    max_side: Annotated[int, typer.Option("--max-side", help="longest image side written, pixels")] = 2048,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Write clinician-signed cases as a dataset the training adapters read (kind "generic"; docs/training.md)."""
    import datetime as dt

    from worker.cli.studies import _database
    from worker.feedback import ExportError, export_feedback

    loaded = settings(config)
    try:
        start = dt.datetime.combine(dt.date.fromisoformat(since), dt.time(), tzinfo=dt.UTC)
    except ValueError:
        raise CommandError(f"--since {since!r} is not a date (YYYY-MM-DD)") from None
    db = _database(config)
    try:
        with db.session() as session:
            summary = export_feedback(session, loaded, start, out, test_fraction=test_fraction, max_side=max_side)
    except ExportError as exc:
        raise CommandError(str(exc)) from None
    finally:
        db.dispose()
    if json_output:
        print_json(summary.as_dict())
        return
    console.print(f"{summary.images} images of {summary.studies} signed studies → {out}")
    for line in summary.skipped:
        console.print(f"  skipped {line}")


def train(
    recipe: RecipeArgument,
    config: ConfigOption = None,
) -> None:
    """Train a model with the recipe (vision tower, stage 1, stage 2); re-running continues from the last
    checkpoint in the recipe's output folder."""
    settings(config)
    from training.trainer import train as run_training

    recipe_config = _recipe(recipe)
    tasks: dict[str, int] = {}
    with _progress() as progress:

        def report(stage: str, step: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, info="")
            progress.update(tasks[stage], completed=step, total=total, info=f"loss {loss:.3f}")

        try:
            model_dir = run_training(recipe_config, report, command=f"retinalgpt train {recipe}")
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
    console.print(f"model written to {model_dir}")


def evaluate(
    model: Annotated[Path, typer.Argument(help="model directory")],
    data: Annotated[list[str], typer.Option("--data", help="KIND=DIR of a dataset (repeatable)")],
    out: Annotated[Path, typer.Option("--out", help="report folder")] = Path("evaluation"),
    split: Annotated[str, typer.Option(help="split to evaluate")] = "test",
    limit: Annotated[int | None, typer.Option(help="images per dataset (default: all)")] = None,
    full_limit: Annotated[int | None, typer.Option(help="images per dataset answered with the whole protocol")] = 16,
    full_all: Annotated[bool, typer.Option("--full-all", help="answer the whole protocol on every image")] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    measure: Annotated[int, typer.Option(help="fully answered images per dataset also measured (MAE, disc localisation)")] = 0,
    update_card: Annotated[bool, typer.Option("--update-card", help="write the metrics into the model's MODEL_CARD.md")] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Evaluate a model per dataset and task; writes metrics.json, report.md and ROC / confusion PNGs."""
    settings(config)
    from training.adapters import load_dataset
    from training.evaluate import EvaluationOptions
    from training.evaluate import evaluate as run_evaluation

    datasets = []
    for spec in data:
        kind, sep, root = spec.partition("=")
        if not sep:
            raise CommandError(f"--data {spec!r} is not KIND=DIR")
        try:
            datasets.append((kind, load_dataset(kind, Path(root))))
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc)) from None
    options = EvaluationOptions(batch_size=batch_size, full_limit=None if full_all else full_limit, limit=limit,
                                split=split, measure_limit=measure)
    tasks: dict[str, int] = {}
    with _progress() as progress:

        def report(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total, info="")
            progress.update(tasks[name], completed=done)

        result = run_evaluation(model, datasets, out, options, report)
    if update_card:
        from model.checkpoint import read_metadata
        from training.card import write_model_card

        command = read_metadata(model).provenance.get("command", "retinalgpt train CONFIG")
        write_model_card(model, command, result)
    if json_output:
        print_json(result)
        return
    console.print((out / "report.md").read_text())


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.command("train")(one_line_errors(train))
    app.command("evaluate")(one_line_errors(evaluate))
