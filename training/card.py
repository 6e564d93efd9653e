"""The model card (``MODEL_CARD.md``) of a trained model directory: identity, intended use, training data with
manifest hashes, recipe, the exact reproduction command, and test-split metrics when evaluated."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from model import protocol
from model.checkpoint import Assessment, checkpoint_sha256, device_uid, read_metadata

CARD_FILE = "MODEL_CARD.md"
METRICS_FILE = "metrics.json"

INTENDED_USE = (
    "Research and integration testing of the RetinalGPT worker: a CPU-sized model that exercises the whole "
    "protocol (modality and quality, calibrated probabilities for every trained condition, vascular measures, "
    "lesion boxes) on colour fundus photographs. **Not for clinical use**: it is not a medical device, was "
    "trained on small public research datasets and has not been validated on any clinical population."
)


CALIBRATION_NOTE = (
    "Expected calibration error (10 equal-width bins) of P(present); beside it the bootstrap bias-corrected ECE "
    "with its basic bootstrap 95 % interval (the plug-in ECE of a small split is biased upwards). A perfectly "
    "calibrated model does not measure 0 on a hundred images: the next column is the ECE such a model shows with "
    "these predictions (labels drawn from the probabilities themselves), and p the share of those draws that "
    "reach the measured ECE — a small p is miscalibration the test images can see, a large one is within their noise."
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _ece_detail(auc: dict[str, Any]) -> str:
    """The metric's name and value cells of a dataset's ECE row: the plug-in ECE, then (where recorded) the
    bias-corrected ECE with its 95 % interval, a calibrated model's median and 95th percentile, and p."""
    if "ece_ci95" not in auc:
        return f" | {_fmt(auc['ece'])}"
    low, high = auc["ece_ci95"]
    calibrated = auc["ece_calibrated"]
    return (f"; bias-corrected (95 % CI); a calibrated model on as many images: median, 95th percentile; p | "
            f"{_fmt(auc['ece'])}; {_fmt(auc['ece_bias_corrected'])} ({_fmt(low)}–{_fmt(high)}); "
            f"{_fmt(calibrated['median'])}, {_fmt(calibrated['quantile'])}; p = {_fmt(auc['ece_p_value'])}")


def calibration_table(report: dict[str, Any]) -> list[str]:
    """Pooled expected calibration error per task (development test splits, then all including the
    evaluation-only sets): the ECE with its bootstrap interval beside the ECE a perfectly calibrated model shows on
    as many images, and the share of such models that would measure at least as much (p)."""
    pooled = report.get("calibration", {})
    if not pooled:
        return []
    lines = ["| task | test splits | n | ECE | bias-corrected ECE (95 % CI) "
             "| calibrated model: median, 95th percentile | p |", "|---|---|---|---|---|---|---|"]
    for task, scopes in pooled.items():
        for scope in ("development", "all"):
            entry = scopes.get(scope)
            if entry is None or "ci95" not in entry:
                continue
            low, high = entry["ci95"]
            calibrated = entry["calibrated_ece"]
            lines.append(f"| {task} | {scope} | {entry['n']} | {_fmt(entry['ece'])} | "
                         f"{_fmt(entry['ece_bias_corrected'])} ({_fmt(low)}–{_fmt(high)}) | "
                         f"{_fmt(calibrated['median'])}, {_fmt(calibrated['quantile'])} | {_fmt(entry['p_value'])} |")
    return lines


def metrics_table(report: dict[str, Any]) -> list[str]:
    lines = ["| dataset | task | metric | value | n |", "|---|---|---|---|---|"]
    for name, result in report.get("datasets", {}).items():
        for task, auc in result.get("auc", {}).items():
            ci = auc.get("ci95")
            interval = f" ({_fmt(ci[0])}–{_fmt(ci[1])})" if ci else ""
            lines.append(f"| {name} | {task} | ROC AUC (95 % CI) | {_fmt(auc['auc'])}{interval} | "
                         f"{auc['n']} ({auc['positives']} positive) |")
            if "ece" in auc:
                lines.append(f"| {name} | {task} | expected calibration error{_ece_detail(auc)} | {auc['n']} |")
        if "referable_operating_point" in result:
            op = result["referable_operating_point"]
            for what in ("sensitivity", "specificity"):
                low, high = op[f"{what}_ci"]
                lines.append(f"| {name} | referable DR at P ≥ {op['threshold']:.3f} | {what} (95 % CI) | "
                             f"{_fmt(op[what])} ({_fmt(low)}–{_fmt(high)}) | "
                             f"{op['tp'] + op['fn'] if what == 'sensitivity' else op['tn'] + op['fp']} |")
        if "complete_assessment" in result:
            done = result["complete_assessment"]
            lines.append(f"| {name} | every trained condition reported | images | "
                         f"{done['complete']} of {done['images']} | {done['images']} |")
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


def assessment_section(assessment: Assessment) -> list[str]:
    """What the model assesses, what it does not, its calibration and operating points, and what its numbers
    mean."""
    trained = [c.value for c in assessment.conditions]
    missing = [c.value for c in protocol.DISEASE_CONDITIONS if c not in assessment.conditions]
    lines = ["## Complete assessment", "",
             "Every gradable image is asked every trained condition and lesion type on its own question; the "
             "answers are scored by likelihood and calibrated (`retinalgpt.json` `assessment`).", "",
             f"- assessed conditions: {', '.join(trained)} (and referable_diabetic_retinopathy = P(DR grade ≥ 2))",
             f"- **not assessed** (no training labels; reported as \"not assessed\", never as absent): "
             f"{', '.join(missing) or 'none'}",
             f"- lesion presence questions: {', '.join(assessment.lesions) or 'none'}",
             "- vascular and cup-to-disc numbers written by the language model are kept in analysis.json only for "
             "the model-versus-measurement disagreement check; reports present the measurement pipeline's values.",
             "", "| question | temperature | bias (first answer) | fitted on (validation images) | operating point |",
             "|---|---|---|---|---|"]
    for question in assessment.questions():
        calibration = assessment.calibration_for(question.key)
        key = question.key.partition(":")[2]
        point = assessment.thresholds.get(key, 0.5)
        if question.condition is not None and question.condition.value == "diabetic_retinopathy":
            point = assessment.threshold("referable_diabetic_retinopathy")
            key = "referable DR: P(grade ≥ 2)"
        lines.append(f"| {question.key} | {calibration.temperature:.3f} | {calibration.bias:.3f} | "
                     f"{calibration.fitted_on} | {key} ≥ {point:.3f} |")
    return [*lines, ""]


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
    if metadata.assessment is not None:
        lines += assessment_section(metadata.assessment)
    if report is not None:
        (model_dir / METRICS_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        lines += ["## Test-split metrics", "",
                  f"Parse failures over {report.get('answers', 0)} answers: "
                  f"{100 * report.get('parse_failure_rate', 0.0):.2f}%", "", *metrics_table(report), ""]
        pooled = calibration_table(report)
        if pooled:
            lines += ["### Calibration, test splits pooled per task", "", CALIBRATION_NOTE, "", *pooled, ""]
    if notes:
        lines += ["## Notes", "", notes, ""]
    path = model_dir / CARD_FILE
    path.write_text("\n".join(lines))
    return path
