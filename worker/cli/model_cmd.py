"""``retinalgpt model list/import/activate/rollback/info``, ``retinalgpt ask IMAGE QUESTION``, ``retinalgpt chat STUDY``.

Model management works on the registry at ``[model] registry``; ``ask`` and ``chat`` run the model workers would
run (``[model] path``, else the registry's active version, else the bundled default). Torch and the model
runtime are imported inside the commands only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

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
from worker.config import Settings

model_app = typer.Typer(
    help="RetinalGPT model versions: list, import, activate, roll back, inspect.", no_args_is_help=True
)


def _registry(config: Path | None) -> Any:
    from model.registry import ModelRegistry

    return ModelRegistry(settings(config).model.registry)


def _wrap(exc: Exception) -> CommandError:
    return CommandError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@model_app.command("list")
@one_line_errors
def list_command(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List registered model versions (the active one is marked)."""
    from model.registry import RegistryError

    try:
        versions = _registry(config).list()
    except RegistryError as exc:
        raise _wrap(exc) from None
    if json_output:
        print_json([v.as_dict() for v in versions])
        return
    table = Table("", "Version", "Name", "Preset / source", "SHA-256", "Device UID", "Registered")
    for v in versions:
        table.add_row(
            "*" if v.active else "",
            v.version,
            v.metadata.name,
            v.metadata.preset or v.metadata.provenance.get("format", ""),
            v.sha256[:12],
            v.device_uid,
            v.registered[:19],
        )
    console.print(table if versions else "no model versions registered")


@model_app.command("import")
@one_line_errors
def import_command(
    source: Annotated[Path, typer.Argument(help="Checkpoint directory to import.")],
    fmt: Annotated[
        str, typer.Option("--format", help="llava-med-v0 (RetinalGPT release) or hf-llava.")
    ] = "llava-med-v0",
    vision_tower: Annotated[
        Path | None, typer.Option("--vision-tower", help="Local CLIP ViT directory (llava-med-v0).")
    ] = None,
    mm_projector: Annotated[
        Path | None,
        typer.Option("--mm-projector", help="Separate projector file, keys ending in weight/bias (llava-med-v0)."),
    ] = None,
    version: Annotated[str | None, typer.Option(help="Version name (default v<n+1>).")] = None,
    name: Annotated[str, typer.Option(help="Model name in results.")] = "retinalgpt",
    activate: Annotated[bool, typer.Option("--activate", help="Make it the active version.")] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Convert a released checkpoint into a model directory and register it."""
    from model.checkpoint import CheckpointError
    from model.importers import import_checkpoint
    from model.registry import RegistryError

    registry = _registry(config)
    registry.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=registry.root, prefix=".import-"))
    try:
        with console.status(f"converting {source} ({fmt})"):
            converted = import_checkpoint(
                fmt, source, staging / "model", vision_tower=vision_tower, name=name, mm_projector=mm_projector
            )
        registered = registry.register(
            converted, version=version, move=True, activate=activate, source_label=f"{fmt}:{source}"
        )
    except (CheckpointError, RegistryError, ValueError, OSError) as exc:
        raise _wrap(exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if json_output:
        print_json(registered.as_dict())
        return
    state = " (active)" if registered.active else ""
    console.print(
        f"registered {registered.version}{state}: sha256 {registered.sha256[:12]}, Device UID {registered.device_uid}"
    )
    assumed = registered.metadata.provenance.get("assumed_config")
    if assumed:
        settings_text = ", ".join(f"{key} = {value}" for key, value in assumed.items())
        console.print(f"note: config.json names no vision tower; read with {settings_text}, as the authors' scripts do")


@model_app.command("activate")
@one_line_errors
def activate_command(
    version: Annotated[str, typer.Argument(help="Version to activate.")], config: ConfigOption = None
) -> None:
    """Make VERSION the model workers run (picked up when a worker process next loads its model)."""
    from model.registry import RegistryError

    try:
        chosen = _registry(config).activate(version)
    except RegistryError as exc:
        raise _wrap(exc) from None
    console.print(f"active model version: {chosen.version} (Device UID {chosen.device_uid})")


@model_app.command("rollback")
@one_line_errors
def rollback_command(config: ConfigOption = None) -> None:
    """Re-activate the version that was active before the current one."""
    from model.registry import RegistryError

    try:
        chosen = _registry(config).rollback()
    except RegistryError as exc:
        raise _wrap(exc) from None
    console.print(f"rolled back to model version {chosen.version} (Device UID {chosen.device_uid})")


def _resolve(effective: Settings, version: str | None) -> tuple[Path, dict[str, Any]]:
    from model.registry import ModelRegistry, RegistryError

    if version is not None:
        try:
            entry = ModelRegistry(effective.model.registry).get(version)
        except RegistryError as exc:
            raise _wrap(exc) from None
        return entry.path, entry.as_dict()
    from worker.runtime import model_directory

    path = model_directory(effective)
    if path is None:
        raise CommandError(
            "no model: [model] enabled is false, or no path, active version or bundled model exists"
        )
    return path, {}


@model_app.command("info")
@one_line_errors
def info_command(
    version: Annotated[
        str | None, typer.Argument(help="Registered version (default: the model workers run).")
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show a model: metadata, shapes, checksum and Device UID."""
    from model.checkpoint import CheckpointError, checkpoint_sha256, device_uid, validate_model_dir

    effective = settings(config)
    path, entry = _resolve(effective, version)
    try:
        metadata = validate_model_dir(path)
        sha = entry.get("sha256") or checkpoint_sha256(path)
    except CheckpointError as exc:
        raise _wrap(exc) from None
    llava = json.loads((path / "config.json").read_text(encoding="utf-8"))
    text, vision = llava.get("text_config", {}), llava.get("vision_config", {})
    info = {
        "path": str(path),
        "name": metadata.name,
        "version": metadata.version,
        "preset": metadata.preset,
        "sha256": sha,
        "device_uid": device_uid(sha),
        "active": entry.get("active"),
        "protocol_version": metadata.protocol_version,
        "template": metadata.template,
        "image": metadata.image.model_dump(),
        "language_model": {
            k: text.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        },
        "vision_tower": {
            k: vision.get(k) for k in ("hidden_size", "num_hidden_layers", "image_size", "patch_size")
        },
        "projector": llava.get("projector_hidden_act"),
        "provenance": metadata.provenance,
    }
    if json_output:
        print_json(info)
        return
    for key, value in info.items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False)


def _engine(effective: Settings) -> Any:
    from model.checkpoint import CheckpointError
    from model.engine import EngineError, RetinalGPTEngine
    from worker.runtime import engine_options

    path, _ = _resolve(effective, None)
    try:
        return RetinalGPTEngine.load(path, engine_options(effective))
    except (CheckpointError, EngineError) as exc:
        raise _wrap(exc) from None


def _read_image(path: Path, effective: Settings) -> Any:
    """RGB uint8 pixels of a DICOM file (within the analysis decode limits) or a plain image."""
    import numpy as np
    import pydicom
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise CommandError(f"{path} does not exist")
    if pydicom.misc.is_dicom(path):
        from worker.pipeline.sources import SourceError, decode_limits, load_dicom

        try:
            return load_dicom(path, decode_limits(effective)).rgb
        except SourceError as exc:
            raise _wrap(exc) from None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise CommandError(f"{path} is neither DICOM nor a readable image ({exc})") from None


@one_line_errors
def ask_command(
    image: Annotated[Path, typer.Argument(help="DICOM file or plain image (PNG, JPEG, TIFF).")],
    question: Annotated[str, typer.Argument(help="Question about the image.")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Ask RetinalGPT one question about one image."""
    from model.engine import EngineError

    effective = settings(config)
    pixels = _read_image(image, effective)
    engine = _engine(effective)
    try:
        answer = engine.ask(pixels, question)
    except EngineError as exc:
        raise _wrap(exc) from None
    if json_output:
        print_json({"question": question, "answer": answer, "model": engine.identity.model_dump()})
        return
    console.print(answer, highlight=False, markup=False)


@one_line_errors
def chat_command(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID with stored results.")],
    question: Annotated[
        list[str] | None, typer.Option("--question", "-q", help="Ask these and exit (repeatable).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Talk with RetinalGPT about a study; its stored results are the system context. Empty line or EOF ends."""
    from sqlalchemy.exc import SQLAlchemyError

    from worker.db import Database
    from worker.pipeline.chat_audit import chat_event
    from worker.pipeline.jobs import PipelineError
    from worker.pipeline.operations import operator
    from worker.pipeline.tasks import answer
    from worker.runtime import ModelUnavailable

    effective = settings(config)
    db = Database(effective.database.url)
    history: list[dict[str, str]] = []
    try:
        questions = iter(question) if question else None
        while True:
            text = next(questions, None) if questions is not None else _prompt()
            if not text:
                break
            chat_text = effective.audit.chat_text
            try:
                reply = answer(effective, db, study_uid, text, history)
            except (PipelineError, ModelUnavailable, OSError) as exc:
                with db.session() as session:
                    session.add(chat_event(operator(), study_uid, text, len(history), chat_text,
                                           error=f"{type(exc).__name__}: {exc}"))
                raise _wrap(exc) from None
            except SQLAlchemyError as exc:
                raise CommandError(
                    f"database error ({type(exc).__name__}); is the schema current? run `retinalgpt db upgrade`"
                ) from None
            with db.session() as session:
                session.add(chat_event(operator(), study_uid, text, len(history), chat_text,
                                       answer=reply["answer"], model=reply.get("model")))
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply["answer"]}]
            console.print(f"[bold cyan]RetinalGPT[/]: {reply['answer']}", highlight=False)
    finally:
        db.dispose()


def _prompt() -> str:
    try:
        return typer.prompt("you", default="", show_default=False).strip()
    except (EOFError, typer.Abort):
        return ""


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
    app.command("ask")(ask_command)
    app.command("chat")(chat_command)
