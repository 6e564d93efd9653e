"""The model card (``MODEL_CARD.md``) of a trained model directory: identity, intended use, training data with
manifest hashes, recipe, the exact reproduction command, and test-split metrics when evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from model.checkpoint import checkpoint_sha256, device_uid, read_metadata

CARD_FILE = "MODEL_CARD.md"
METRICS_FILE = "metrics.json"

INTENDED_USE = (
    "Research and integration testing of the RetinalGPT worker: a CPU-sized model that exercises the whole "
    "protocol (modality and quality, disease grades with likelihood-scored probabilities, vascular measures, "
    "lesion boxes) on colour fundus photographs. **Not for clinical use**: it is not a medical device, was "
    "trained on small public research datasets and has not been validated on any clinical population."
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def metrics_table(report: dict[str, Any]) -> list[str]:
    lines = ["| dataset | task | metric | value | n |", "|---|---|---|---|---|"]
    for name, result in report.get("datasets", {}).items():
        for task, auc in result.get("auc", {}).items():
            lines.append(f"| {name} | {task} | ROC AUC | {_fmt(auc['auc'])} | {auc['n']} ({auc['positives']} positive) |")
        if "dr_grade" in result:
            dr = result["dr_grade"]
            lines.append(f"| {name} | DR grade | accuracy | {_fmt(dr['accuracy'])} | {dr['n']} |")
            lines.append(f"| {name} | DR grade | quadratic weighted kappa | {_fmt(dr['quadratic_weighted_kappa'])} | {dr['n']} |")
        for kind, ap in result.get("box_ap50", {}).items():
            lines.append(f"| {name} | {kind} boxes | AP@0.5 | {_fmt(ap['ap'])} | {ap['images']} images |")
        for key, mae in result.get("measurement_mae", {}).items():
            lines.append(f"| {name} | {key}, model vs measurement pipeline | MAE | {_fmt(mae['mae'])} | {mae['n']} |")
        if "optic_disc_localisation" in result:
            disc = result["optic_disc_localisation"]
            lines.append(f"| {name} | optic-disc centre (measurement pipeline) vs label | mean distance "
                         f"(fraction of width/height) | {_fmt(disc['mean_centre_distance'])} | {disc['n']} |")
        answers = result.get("answers", {})
        if answers.get("n"):
            lines.append(f"| {name} | all answers | parse failure rate | {_fmt(answers['parse_failure_rate'])} | {answers['n']} |")
    return lines


def write_model_card(model_dir: Path, command: str, report: dict[str, Any] | None = None,
                     notes: str | None = None) -> Path:
    """Write ``MODEL_CARD.md`` (and ``metrics.json`` when ``report`` is given) into ``model_dir``."""
    model_dir = Path(model_dir)
    metadata = read_metadata(model_dir)
    sha = checkpoint_sha256(model_dir)
    provenance = metadata.provenance
    data = provenance.get("data", {})
    size_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
    lines = [
        f"# {metadata.name} {metadata.version}", "",
        f"- preset: `{metadata.preset}`; weights: {size_mb:.1f} MB safetensors; protocol {metadata.protocol_version}",
        f"- checkpoint sha256: `{sha}`", f"- Device UID: `{device_uid(sha)}`", "",
        "## Intended use", "", INTENDED_USE, "",
        "## Reproduce", "", "```", command, "```", "",
        f"Training wall time on the machine that built it: {provenance.get('wall_seconds', 'n/a')} s "
        f"(stages: {json.dumps(provenance.get('stage_seconds', {}))}).", "",
        "## Training data", "",
        "Train splits only; evaluation-only sets (eyepacs_kaggle_dr, HEI-MED) are never used for weights.", "",
        f"- conversations: {data.get('conversations', 'n/a')}, stage-1 captions: {data.get('captions', 'n/a')}",
        f"- images per source: {json.dumps(data.get('images_per_source', {}))}",
        f"- duplicates merged: {data.get('duplicates_merged', 0)}", "",
        "| dataset | manifest sha256 |", "|---|---|",
        *[f"| {k} | `{v}` |" for k, v in provenance.get("data_manifests_sha256", {}).items()], "",
        "## Recipe", "", "```json", json.dumps(provenance.get("recipe", {}), indent=1), "```", "",
        f"Final training losses: {json.dumps(provenance.get('final_losses', {}))}", "",
    ]
    if report is not None:
        (model_dir / METRICS_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        lines += ["## Test-split metrics", "",
                  f"Parse failures over {report.get('answers', 0)} answers: "
                  f"{100 * report.get('parse_failure_rate', 0.0):.2f}%", "", *metrics_table(report), ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    path = model_dir / CARD_FILE
    path.write_text("\n".join(lines))
    return path
