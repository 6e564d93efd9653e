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
from rich.console import Console
from rich.table import Table

from worker.cli.common import (
    CommandError,
    ConfigOption,
    JsonOption,
    console,
    err_console,
    one_line_errors,
    print_json,
    settings,
)
from worker.config import Settings

model_app = typer.Typer(
    help="RetinalGPT model versions: list, import, activate, roll back, inspect, shadow, compare.", no_args_is_help=True
)


def _registry(config: Path | None) -> Any:
    from model.registry import ModelRegistry

    return ModelRegistry(settings(config).model.registry)


def _wrap(exc: Exception) -> CommandError:
    return CommandError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


@model_app.command("list")
@one_line_errors
def list_command(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """List registered model versions (the active one marked *, the shadow candidate 'shadow')."""
    from model.registry import RegistryError

    try:
        registry = _registry(config)
        versions = registry.list()
        candidate = registry.shadow()
    except RegistryError as exc:
        raise _wrap(exc) from None
    shadow = candidate.version if candidate else None
    if json_output:
        print_json([{**v.as_dict(), "shadow": v.version == shadow} for v in versions])
        return
    table = Table("", "Version", "Name", "Preset / source", "SHA-256", "Device UID", "Registered")
    for v in versions:
        table.add_row(
            "*" if v.active else ("shadow" if v.version == shadow else ""),
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
    activate: Annotated[
        bool, typer.Option("--activate", help="Make it the active version (through the promotion gate when another "
                           "version is active).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="With --activate: past a promotion gate that refuses (audited).")
    ] = False,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Convert a released checkpoint into a model directory and register it. With --activate it becomes the
    active version at once when none is active (a site's first model); otherwise it is registered and then
    activated through the same promotion gate as ``model activate``."""
    from model.checkpoint import CheckpointError
    from model.importers import import_checkpoint
    from model.registry import RegistryError

    registry = _registry(config)
    registry.root.mkdir(parents=True, exist_ok=True)
    try:
        first = registry.active() is None
    except RegistryError as exc:
        raise _wrap(exc) from None
    staging = Path(tempfile.mkdtemp(dir=registry.root, prefix=".import-"))
    try:
        with console.status(f"converting {source} ({fmt})"):
            converted = import_checkpoint(
                fmt, source, staging / "model", vision_tower=vision_tower, name=name, mm_projector=mm_projector
            )
        registered = registry.register(
            converted, version=version, move=True, activate=activate and first, source_label=f"{fmt}:{source}"
        )
    except (CheckpointError, RegistryError, ValueError, OSError) as exc:
        raise _wrap(exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if activate and not first:
        out = err_console if json_output else console
        out.print(f"registered {registered.version}; activating it through the promotion gate", highlight=False)
        _activate_through_gate(config, registered.version, force, out)
        registered = registry.get(registered.version)
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


def _comparison(effective: Settings, candidate: str, active: str, threshold: float | None,
                resamples: int = 2000) -> Any:
    """``candidate`` against ``active`` on the stored analyses and sign-offs (:mod:`worker.model_compare`)."""
    from sqlalchemy.exc import SQLAlchemyError

    from worker.db import Database
    from worker.model_compare import compare, load

    db = Database(effective.database.url)
    try:
        with db.reading() as session:
            data = load(session, candidate, active)
    except SQLAlchemyError as exc:
        raise CommandError(
            f"database error ({type(exc).__name__}); is the schema current? run `retinalgpt db upgrade`"
        ) from None
    finally:
        db.dispose()
    chosen = effective.model.operating_threshold if threshold is None else threshold
    return compare(data, candidate, active, threshold=chosen, resamples=resamples)


def _active_version(config: Path | None, against: str | None) -> str:
    from model.registry import RegistryError

    if against is not None:
        return against
    try:
        active = _registry(config).active()
    except RegistryError as exc:
        raise _wrap(exc) from None
    if active is None:
        raise CommandError("no active model version; name the reference with --against")
    return active.version


@model_app.command("activate")
@one_line_errors
def activate_command(
    version: Annotated[str, typer.Argument(help="Version to activate.")],
    force: Annotated[
        bool, typer.Option("--force", help="Activate even if the promotion gate refuses (audited).")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Make VERSION the model workers run (picked up when a worker process next loads its model).

    Promotion gate, when another version is active: refused when VERSION is worse than the active version on the
    site's signed cases (AUC or sensitivity lower by more than ``[model] promotion_margin`` for a condition with
    at least ``[model] promotion_min_cases`` signed images of both classes), and refused as inconclusive when no
    condition has that many signed images; --force activates anyway and is audited."""
    _activate_through_gate(config, version, force)


def _activate_through_gate(config: Path | None, version: str, force: bool, out: Console = console) -> None:
    """Activate ``version`` unless the promotion gate refuses it (see ``model activate``); with ``force`` past
    the gate, audited. Messages go to ``out`` (stderr where stdout carries JSON)."""
    from model.registry import RegistryError

    effective = settings(config)
    registry = _registry(config)
    try:
        registry.get(version)
        current = registry.active()
    except RegistryError as exc:
        raise _wrap(exc) from None
    reasons: list[str] = []
    inconclusive = False
    if current is not None and current.version != version:
        model = effective.model
        if _has_signoffs(effective):
            gate = _comparison(effective, version, current.version, None, resamples=200).gate(
                model.promotion_margin, model.promotion_min_cases)
        else:
            gate = {"verdict": "inconclusive", "regressions": [], "judged": [],
                    "shortfall": "inconclusive: the database has no sign-off table, so no signed case (run "
                                 f"`retinalgpt db upgrade`); at least {model.promotion_min_cases} signed images of "
                                 "one condition are needed ([model] promotion_min_cases)"}
        inconclusive = gate["verdict"] == "inconclusive"
        reasons = [gate["shortfall"]] if inconclusive else gate["regressions"]
        if gate["verdict"] == "not worse":
            out.print(f"promotion gate: {version} is not worse than {current.version} on the signed cases "
                          f"(judged: {', '.join(gate['judged'])})", highlight=False)
    if reasons and not force:
        if inconclusive:
            raise CommandError(f"the promotion gate cannot judge {version} against the active {current.version}: "
                               f"{reasons[0]} (see `retinalgpt model compare {version}`; --force to activate "
                               "anyway)")
        raise CommandError(
            f"{version} is worse than the active {current.version} on the signed cases beyond the margin "
            f"{effective.model.promotion_margin:g}: {'; '.join(reasons)} (see `retinalgpt model compare "
            f"{version}`; --force to activate anyway)"
        )
    try:
        chosen = registry.activate(version)
    except RegistryError as exc:
        raise _wrap(exc) from None
    if reasons:
        _audit(effective, "model.activated_forced",
               {"version": version, "previous": current.version if current else None, "reasons": reasons,
                "verdict": "inconclusive" if inconclusive else "worse",
                "margin": effective.model.promotion_margin, "min_cases": effective.model.promotion_min_cases})
        out.print(f"forced past the promotion gate: {'; '.join(reasons)}", highlight=False)
    out.print(f"active model version: {chosen.version} (Device UID {chosen.device_uid})")


def _has_signoffs(effective: Settings) -> bool:
    """Whether the database holds the sign-off table (a deployment that never ran `db upgrade` has no signed
    cases for the gate to judge)."""
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from worker.db import Database

    db = Database(effective.database.url)
    try:
        return inspect(db.engine).has_table("signoffs")
    except SQLAlchemyError as exc:
        raise CommandError(f"cannot read the signed cases for the promotion gate ({type(exc).__name__}); the gate, "
                           "and the audit of a forced activation, need the database: check [database] url and "
                           "run `retinalgpt db upgrade`") from None
    finally:
        db.dispose()


def _audit(effective: Settings, action: str, detail: dict[str, Any]) -> None:
    from worker.db import AuditEvent, Database
    from worker.pipeline.operations import operator

    from sqlalchemy.exc import SQLAlchemyError

    db = Database(effective.database.url)
    try:
        with db.session() as session:
            session.add(AuditEvent(actor=operator(), action=action, detail=detail))
    except SQLAlchemyError as exc:
        raise CommandError(f"done, but the audit event {action} could not be written ({type(exc).__name__}); "
                           "is the schema current? run `retinalgpt db upgrade`") from None
    finally:
        db.dispose()


@model_app.command("shadow")
@one_line_errors
def shadow_command(
    version: Annotated[str | None, typer.Argument(help="Candidate version to run in shadow mode.")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop shadow mode.")] = False,
    config: ConfigOption = None,
) -> None:
    """Run VERSION on live studies next to the active model: after each analysis the inference worker also
    analyses the study with VERSION at lower priority and stores it as a shadow analysis, never delivered and
    never shown as the study's result (compare with `retinalgpt model compare VERSION`). Without VERSION: show
    the shadow version."""
    from model.registry import RegistryError

    if off and version is not None:
        raise CommandError("give a VERSION or --off, not both")
    registry = _registry(config)
    try:
        if off:
            previous = registry.shadow()
            registry.set_shadow(None)
            chosen = None
        elif version is not None:
            previous = registry.shadow()
            chosen = registry.set_shadow(version)
        else:
            current = registry.shadow()
            console.print(f"shadow model version: {current.version}" if current else "no shadow model version")
            return
    except RegistryError as exc:
        raise _wrap(exc) from None
    _audit(settings(config), "model.shadow", {"version": chosen.version if chosen else None,
                                             "previous": previous.version if previous else None})
    console.print(f"shadow model version: {chosen.version} (Device UID {chosen.device_uid})" if chosen
                  else "shadow mode off")


@model_app.command("compare")
@one_line_errors
def compare_command(
    candidate: Annotated[str, typer.Argument(help="Candidate version (e.g. the shadow version).")],
    against: Annotated[str | None, typer.Option("--against", help="Reference version (default: the active one).")]
    = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write comparison.json and comparison.png here.")]
    = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", min=0.0, max=1.0,
                                   help="Operating threshold (default [model] operating_threshold).")
    ] = None,
    resamples: Annotated[int, typer.Option("--resamples", min=100, help="Bootstrap resamples.")] = 2000,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Compare CANDIDATE with the active version: per-condition agreement on the studies both read; AUC,
    sensitivity and specificity at the operating threshold on the site's signed cases, with 95 % intervals."""
    from worker.model_compare import plot

    effective = settings(config)
    active = _active_version(config, against)
    if active == candidate:
        raise CommandError(f"{candidate} is the reference version; compare a different candidate")
    comparison = _comparison(effective, candidate, active, threshold, resamples)
    report = comparison.as_dict()
    model = effective.model
    report["gate"] = comparison.gate(model.promotion_margin, model.promotion_min_cases)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        drawn = plot(comparison, out / "comparison.png")
        report["plot"] = str(drawn) if drawn else None
    if json_output:
        print_json(report)
        return
    _print_comparison(report)


def _fmt(value: float | None, ci: list[float | None] | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _print_comparison(report: dict[str, Any]) -> None:
    cand, act = report["candidate"], report["active"]
    console.print(f"[bold]{cand}[/] against [bold]{act}[/], threshold {report['threshold']:g}; "
                  f"{report['studies_both_read']} studies both read, {report['signed_studies']} signed studies",
                  highlight=False)
    table = Table("Condition", "Images", "Agree", "Agreement [95% CI]", title="Agreement (studies both read)")
    for a in report["agreement"]:
        table.add_row(a["condition"], str(a["images"]), str(a["agree"]), _fmt(a["rate"], a["rate_ci"]))
    console.print(table if report["agreement"] else "no study read by both versions")
    table = Table("Condition", "Images (+)", "Version", "AUC [95% CI]", "Sensitivity [95% CI]",
                  "Specificity [95% CI]", title="Signed cases (clinician sign-off as truth)")
    for s in report["signed"]:
        for key in ("candidate", "active"):
            v = s[key]
            table.add_row(s["condition"] if key == "candidate" else "",
                          f"{s['images']} ({s['positives']})" if key == "candidate" else "", v["version"],
                          _fmt(v["auc"], v["auc_ci"]), _fmt(v["sensitivity"], v["sensitivity_ci"]),
                          _fmt(v["specificity"], v["specificity_ci"]))
        table.add_row("", "", "difference", _fmt(s["auc_difference"], s["auc_difference_ci"]), "", "")
    console.print(table if report["signed"] else "no signed case scored by both versions")
    gate = report["gate"]
    verdict = {"worse": "; ".join(gate["regressions"]), "inconclusive": gate["shortfall"]}.get(
        gate["verdict"], "not worse")
    console.print(f"promotion gate (margin {gate['margin']:g}, at least {gate['min_cases']} signed images): "
                  f"{verdict}", highlight=False)
    if report.get("plot"):
        console.print(f"plot: {report['plot']}", highlight=False)


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
