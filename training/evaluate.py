"""``retinalgpt evaluate MODEL --data KIND=DIR …``: per dataset and task metrics of a model directory.

For every test image the engine answers the disease question (and, for ``full_limit`` images per dataset, the
whole protocol). Probabilities come from the model's likelihood of each candidate answer
(:meth:`model.engine.RetinalGPTEngine.score_candidates`), exactly as the engine scores the findings it states:

* a condition: candidates "<Name>: grade k." / "<Name>: absent|present." after the image prompt and the model's
  own earlier answer lines; P(present) = 1 − P(grade 0); referable DR = P(DR grade ≥ 2);
* lesion presence per type: candidates " Yes." / " No." after a lesion-presence question;
* any lesion: 1 − P(the lesion answer opens with "No lesions detected.") among the possible opening lines.

For a model trained for the complete assessment (``retinalgpt.json`` ``assessment``) probabilities come from the
production path itself — :meth:`model.engine.RetinalGPTEngine.analyze`, which asks every trained condition and
lesion type its own question and applies the stored calibration: the findings' P(present) / P(grade) and the
lesion-presence probabilities.

Metrics (:mod:`training.metrics`): DR grade accuracy and quadratic-weighted kappa, ROC AUC of every binary label
the dataset has with a bootstrap 95 % interval, expected calibration error with its bootstrap bias correction
and 95 % interval and the ECE a perfectly calibrated model would measure on as many images (consistency
resampling), sensitivity and specificity of referable DR at the model's operating point (Wilson intervals), the
share of images whose findings cover every trained condition, lesion box AP at IoU 0.5, answer-parse failure rate. Written as ``metrics.json``,
``report.md``, ROC curves, reliability diagrams and confusion matrices (PNG). ``metrics.json`` also records, per
condition, a histogram of the test images' probabilities (``score_histograms``): the reference distribution the
worker's drift check (:mod:`worker.monitoring`) compares production probabilities with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model import protocol
from model.protocol import Task
from model.schema import Condition, LandmarkType, LesionType, max_grade
from training import metrics
from training.calibration import calibration_error_statistics, reliability
from training.images import load_rgb
from training.records import Record
from training.tasks import TASKS_BY_NAME

CONDITION_TASKS: dict[str, Condition] = {
    "diabetic_retinopathy": Condition.DIABETIC_RETINOPATHY,
    "referable_diabetic_retinopathy": Condition.DIABETIC_RETINOPATHY,
    "diabetic_macular_edema": Condition.DIABETIC_MACULAR_EDEMA,
    "glaucoma": Condition.GLAUCOMA,
    "cataract": Condition.CATARACT,
    "pathologic_myopia": Condition.PATHOLOGIC_MYOPIA,
}
"""Binary evaluation tasks scored from a disease line, and the condition whose line is scored."""

LESION_TASKS: dict[str, LesionType | None] = {
    "hard_exudate": LesionType.HARD_EXUDATE,
    "haemorrhage": LesionType.HAEMORRHAGE,
    "any_lesion": None,
}



@dataclass
class ImageOutcome:
    """What evaluation keeps per image."""

    key: str
    scores: dict[str, float] = field(default_factory=dict)
    grade_probabilities: dict[str, list[float]] = field(default_factory=dict)
    grades: dict[str, int] = field(default_factory=dict)
    answers: list[tuple[str, str, bool]] = field(default_factory=list)
    lesions: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    model_measurements: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    disc_centre: tuple[float, float] | None = None
    complete: bool | None = None
    """Assessment models: whether the findings cover every trained condition."""


@dataclass(frozen=True)
class EvaluationOptions:
    batch_size: int = 8
    full_limit: int | None = 16
    """Images per dataset that get the whole protocol (generation of all four answers); None = all."""
    limit: int | None = None
    """Images per dataset to evaluate at all (None = the whole split)."""
    split: str = "test"
    device: str = "auto"
    cpu_threads: int | None = 1
    measure_limit: int = 0
    """Fully answered images per dataset also run through the measurement pipeline (seconds each): measurement
    MAE of the model's vascular numbers and optic-disc localisation error against the labels."""


def _wanted(records: Sequence[Record]) -> tuple[list[str], list[str]]:
    """Condition and lesion tasks that at least one record labels."""
    conditions = [t for t in CONDITION_TASKS if any(TASKS_BY_NAME[t].label(r) is not None for r in records)]
    lesions = [t for t in LESION_TASKS if any(TASKS_BY_NAME[t].label(r) is not None for r in records)]
    return conditions, lesions


def score_images(engine: Any, images: Sequence[np.ndarray], condition_tasks: Sequence[str],
                 lesion_tasks: Sequence[str], full: bool) -> list[ImageOutcome]:
    """Answers and likelihood scores for one batch of images."""
    if engine.metadata.assessment is not None:
        return assessed_images(engine, images, full)
    tasks = tuple(protocol.Task) if full else (Task.DISEASE_GRADE,)
    engine.options = type(engine.options)(**{**engine.options.__dict__, "tasks": tasks, "score_findings": False})
    results = engine.analyze(images)
    features = engine.image_features(images)
    outcomes = [ImageOutcome(key=str(i)) for i in range(len(images))]
    for outcome, result in zip(outcomes, results, strict=True):
        for answer in result.answers:
            outcome.answers.append((answer.task, answer.answer, answer.parsed))
        outcome.grades = {f.condition.value: int(f.grade) for f in result.findings if f.grade is not None}
        outcome.lesions = [(lesion.type.value, lesion.box) for lesion in result.lesions]
        outcome.model_measurements = {m.key: m.value for m in result.measurements}
    conditions = sorted({CONDITION_TASKS[t] for t in condition_tasks}, key=protocol.DISEASE_CONDITIONS.index)
    if conditions:
        prompt_text = engine.template.prompt(protocol.question(Task.DISEASE_GRADE))
        prompt = engine.encode(prompt_text)
        groups, owners = [], []
        for index, outcome in enumerate(outcomes):
            stated = {Condition(c): g for c, g in outcome.grades.items() if Condition(c) in protocol.DISEASE_CONDITIONS}
            for condition in conditions:
                before = [protocol.render_condition_line(c, g) for c, g in stated.items()
                          if protocol.DISEASE_CONDITIONS.index(c) < protocol.DISEASE_CONDITIONS.index(condition)]
                prefix = "".join(line + "\n" for line in before)
                candidates = [engine.continuation(prompt_text, prefix + protocol.render_condition_line(condition, g))
                              for g in range(max_grade(condition) + 1)]
                groups.append((index, candidates))
                owners.append((index, condition))
        scores = engine.score_candidates([prompt] * len(images), features, groups)
        for (index, condition), probabilities in zip(owners, scores, strict=True):
            total = sum(probabilities)
            outcomes[index].grade_probabilities[condition.value] = [p / total for p in probabilities]
    if "any_lesion" in lesion_tasks:
        # image-level lesion score from the protocol's own lesion answer: 1 − P(it opens "No lesions detected.")
        # among the possible first lines (each lesion type's line or the no-lesion sentence)
        prompt_text = engine.template.prompt(protocol.question(Task.LESIONS))
        prompt = engine.encode(prompt_text)
        openings = ["No lesions detected."] + [f"{protocol.LESION_NAMES[kind]}:" for kind in LesionType]
        candidates = [engine.continuation(prompt_text, text) for text in openings]
        scores = engine.score_candidates([prompt] * len(images), features, [(i, candidates) for i in range(len(images))])
        for outcome, probabilities in zip(outcomes, scores, strict=True):
            outcome.scores["any_lesion"] = 1.0 - probabilities[0]
    for task in lesion_tasks:
        kind = LESION_TASKS[task]
        if kind is None:
            continue
        prompt_text = engine.template.prompt(protocol.lesion_question(kind).question)
        prompt = engine.encode(prompt_text)
        candidates = [engine.continuation(prompt_text, protocol.YES), engine.continuation(prompt_text, protocol.NO)]
        scores = engine.score_candidates([prompt] * len(images), features,
                                         [(i, candidates) for i in range(len(images))])
        for outcome, (p_yes, _) in zip(outcomes, scores, strict=True):
            outcome.scores[task] = p_yes
    for outcome in outcomes:
        for task in condition_tasks:
            probabilities = outcome.grade_probabilities[CONDITION_TASKS[task].value]
            threshold = 2 if task == "referable_diabetic_retinopathy" else 1
            outcome.scores[task] = float(sum(probabilities[threshold:]))
    return outcomes


def assessed_images(engine: Any, images: Sequence[np.ndarray], full: bool) -> list[ImageOutcome]:
    """Outcomes of a complete-assessment model through :meth:`~model.engine.RetinalGPTEngine.analyze` (the whole
    protocol for ``full`` images, else the assessment alone)."""
    tasks = tuple(protocol.Task) if full else (Task.DISEASE_GRADE,)
    engine.options = type(engine.options)(**{**engine.options.__dict__, "tasks": tasks})
    trained = set(engine.metadata.assessment.conditions)
    outcomes = []
    for index, result in enumerate(engine.analyze(images)):
        outcome = ImageOutcome(key=str(index))
        outcome.answers = [(a.task, a.answer, a.parsed) for a in result.answers]
        outcome.lesions = [(lesion.type.value, lesion.box) for lesion in result.lesions]
        outcome.model_measurements = {m.key: m.value for m in result.measurements}
        found = {f.condition: f for f in result.findings}
        outcome.complete = trained <= set(found)
        for finding in found.values():
            if finding.grade is not None:
                outcome.grades[finding.condition.value] = int(finding.grade)
            if finding.grade_probabilities is not None:
                outcome.grade_probabilities[finding.condition.value] = list(finding.grade_probabilities)
        for task, condition in CONDITION_TASKS.items():
            finding = found.get(Condition.REFERABLE_DIABETIC_RETINOPATHY if task == "referable_diabetic_retinopathy"
                                else condition)
            if finding is not None and finding.probability is not None:
                outcome.scores[task] = float(finding.probability)
        for task, kind in LESION_TASKS.items():
            key = protocol.ANY_LESION if kind is None else kind.value
            if key in result.lesion_presence:
                outcome.scores[task] = float(result.lesion_presence[key])
        outcomes.append(outcome)
    return outcomes


def disc_truth(record: Record) -> tuple[float, float] | None:
    """The labelled optic-disc centre (normalised): a disc box centre, or HEI-MED's marked centre."""
    for box in record.boxes:
        if box.label == LandmarkType.OPTIC_DISC:
            return ((box.box[0] + box.box[2]) / 2, (box.box[1] + box.box[3]) / 2)
    if "optic_disc_x" in record.measurements:
        return (record.measurements["optic_disc_x"], record.measurements["optic_disc_y"])
    return None


def measure(pipeline: Any, record: Record, outcome: ImageOutcome) -> None:
    """Run the measurement pipeline on ``record``: measured features and the optic-disc centre."""
    from training.features import whole_image_features

    result = pipeline.analyze(load_rgb(record.image), file_path=str(record.image))
    outcome.measured = whole_image_features(result.image)
    disc = result.image.landmark(LandmarkType.OPTIC_DISC)
    outcome.disc_centre = tuple(disc.center) if disc is not None else None  # type: ignore[assignment]


def dataset_metrics(records: Sequence[Record], outcomes: Sequence[ImageOutcome],
                    threshold: float | None = None) -> dict[str, Any]:
    """Metrics of one dataset from its records and per-image outcomes (same order); ``threshold`` is the model's
    referable-DR operating point (assessment models)."""
    out: dict[str, Any] = {"images": len(records)}
    for task in list(CONDITION_TASKS) + list(LESION_TASKS):
        pairs = [(TASKS_BY_NAME[task].label(r), o.scores.get(task)) for r, o in zip(records, outcomes, strict=True)]
        pairs = [(y, s) for y, s in pairs if y is not None and s is not None]
        if pairs and len({y for y, _ in pairs}) == 2:
            truth, scores = [y for y, _ in pairs], [s for _, s in pairs]
            low, high = metrics.bootstrap_auc_ci(truth, scores)
            calibration = calibration_error_statistics(truth, scores)
            out.setdefault("auc", {})[task] = {"auc": metrics.roc_auc(truth, scores), "ci95": [low, high],
                                               "n": len(pairs), "positives": int(sum(truth)),
                                               "ece": calibration["ece"],
                                               "ece_bias_corrected": calibration["ece_bias_corrected"],
                                               "ece_ci95": calibration["ci95"],
                                               "ece_calibrated": calibration["calibrated_ece"],
                                               "ece_p_value": calibration["p_value"]}
            if task == "referable_diabetic_retinopathy" and threshold is not None:
                out["referable_operating_point"] = metrics.operating_point(truth, scores, threshold)
    completeness = [o.complete for o in outcomes if o.complete is not None]
    if completeness:
        out["complete_assessment"] = {"images": len(completeness), "complete": int(sum(completeness))}
    graded = [(r.grades[Condition.DIABETIC_RETINOPATHY], o) for r, o in zip(records, outcomes, strict=True)
              if Condition.DIABETIC_RETINOPATHY in r.grades and Condition.DIABETIC_RETINOPATHY.value in o.grade_probabilities]
    if graded:
        truth = [g for g, _ in graded]
        predicted = [o.grades.get(Condition.DIABETIC_RETINOPATHY.value,
                                  int(np.argmax(o.grade_probabilities[Condition.DIABETIC_RETINOPATHY.value])))
                     for _, o in graded]
        out["dr_grade"] = {"accuracy": metrics.accuracy(truth, predicted),
                           "quadratic_weighted_kappa": metrics.quadratic_weighted_kappa(truth, predicted, 5),
                           "confusion": metrics.confusion_matrix(truth, predicted, 5).tolist(), "n": len(truth)}
    answers = [parsed for o in outcomes for _, _, parsed in o.answers]
    out["answers"] = {"n": len(answers), "parse_failure_rate": metrics.failure_rate(answers)}
    full = [(r, o) for r, o in zip(records, outcomes, strict=True) if any(t == Task.LESIONS.value for t, _, _ in o.answers)]
    boxed = [(r, o) for r, o in full if any(isinstance(b.label, LesionType) for b in r.boxes)]
    errors: dict[str, list[float]] = {}
    for _, o in full:
        for key, value in o.model_measurements.items():
            if key in o.measured:
                errors.setdefault(key, []).append(abs(value - o.measured[key]))
    if errors:
        out["measurement_mae"] = {k: {"mae": float(np.mean(v)), "n": len(v)} for k, v in sorted(errors.items())}
    distances = [metrics.centre_distance((*o.disc_centre, *o.disc_centre), truth)
                 for r, o in zip(records, outcomes, strict=True)
                 if o.disc_centre is not None and (truth := disc_truth(r)) is not None]
    if distances:
        out["optic_disc_localisation"] = {"mean_centre_distance": float(np.mean(distances)), "n": len(distances),
                                          "within_0.05": float(np.mean(np.asarray(distances) <= 0.05))}
    for kind in LesionType:
        truths = [(r.key, b.box) for r, _ in boxed for b in r.boxes if b.label == kind]
        if truths:
            predictions = [(r.key, box, 1.0) for r, o in boxed for t, box in o.lesions if t == kind.value]
            out.setdefault("box_ap50", {})[kind.value] = {
                "ap": metrics.average_precision(predictions, truths), "images": len(boxed), "boxes": len(truths)}
    return out


def evaluate(model_dir: Path, datasets: Sequence[tuple[str, list[Record]]], output: Path,
             options: EvaluationOptions = EvaluationOptions(),
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` on each (name, records) and write the report to ``output``."""
    from model.engine import EngineOptions, RetinalGPTEngine

    engine = RetinalGPTEngine.load(Path(model_dir), EngineOptions(device=options.device,  # type: ignore[arg-type]
                                                                  batch_size=options.batch_size,
                                                                  cpu_threads=options.cpu_threads))
    report: dict[str, Any] = {"model": str(model_dir), "identity": engine.identity.model_dump(), "datasets": {}}
    raw: dict[str, Any] = {}
    for name, all_records in datasets:
        records = [r for r in all_records if r.split == options.split][: options.limit]
        if not records:
            continue
        conditions, lesions = _wanted(records)
        outcomes: list[ImageOutcome] = []
        for start in range(0, len(records), options.batch_size):
            batch = records[start:start + options.batch_size]
            full = options.full_limit is None or start < options.full_limit
            images = [load_rgb(r.image) for r in batch]
            for record, outcome in zip(batch, score_images(engine, images, conditions, lesions, full), strict=True):
                outcome.key = record.key
                outcomes.append(outcome)
            if progress is not None:
                progress(name, len(outcomes), len(records))
        if options.measure_limit:
            from training.features import measurement_pipeline

            pipeline = measurement_pipeline()
            full = [(r, o) for r, o in zip(records, outcomes, strict=True) if o.answers and len(o.answers) > 1]
            for record, outcome in full[: options.measure_limit] if pipeline is not None else []:
                measure(pipeline, record, outcome)
        assessment = engine.metadata.assessment
        threshold = (assessment.threshold(Condition.REFERABLE_DIABETIC_RETINOPATHY)
                     if assessment is not None else None)
        report["datasets"][name] = dataset_metrics(records, outcomes, threshold)
        raw[name] = (records, outcomes)
    report["calibration"] = pooled_calibration(raw)
    report["score_histograms"] = score_histograms(raw)
    answers = [p for _, outs in raw.values() for o in outs for _, _, p in o.answers]
    report["parse_failure_rate"] = metrics.failure_rate(answers)
    report["answers"] = len(answers)
    write_report(report, raw, Path(output))
    return report



def _labelled_scores(records: Sequence[Record], outcomes: Sequence[ImageOutcome], task: str) -> list[tuple[int, float]]:
    pairs = [(TASKS_BY_NAME[task].label(r), o.scores.get(task)) for r, o in zip(records, outcomes, strict=True)]
    return [(int(y), float(p)) for y, p in pairs if y is not None and p is not None]


SCORE_BINS = 10
"""Equal-width bins of [0, 1] in :func:`score_histograms`."""


def score_histograms(raw: dict[str, Any], bins: int = SCORE_BINS) -> dict[str, Any]:
    """Per condition task, pooled over the evaluated datasets: how many test images' P(present) fall in each of
    ``bins`` equal-width bins of [0, 1] (every scored image, labelled or not; the last bin includes 1.0).
    ``{"edges": [0.0, 0.1, …, 1.0], "conditions": {task: {"counts": [...], "n": N}}}``."""
    out: dict[str, Any] = {"edges": [round(float(e), 6) for e in np.linspace(0.0, 1.0, bins + 1)], "conditions": {}}
    for task in CONDITION_TASKS:
        scores = np.asarray([o.scores[task] for _, outcomes in raw.values() for o in outcomes if task in o.scores],
                            dtype=float)
        if scores.size:
            index = np.clip((np.clip(scores, 0.0, 1.0) * bins).astype(int), 0, bins - 1)
            out["conditions"][task] = {"counts": np.bincount(index, minlength=bins).tolist(), "n": int(scores.size)}
    return out


def pooled_calibration(raw: dict[str, Any]) -> dict[str, Any]:
    """Per task, pooled over the evaluated datasets: expected calibration error with its bootstrap interval and the
    ECE a calibrated model would show on as many images (:func:`~training.calibration.calibration_error_statistics`),
    and the reliability diagram's points (with and without the evaluation-only datasets)."""
    from training.adapters.shared import EVALUATION_ONLY

    out: dict[str, Any] = {}
    for task in list(CONDITION_TASKS) + list(LESION_TASKS):
        for scope, names in (("all", list(raw)), ("development", [n for n in raw if n not in EVALUATION_ONLY])):
            pairs = [p for n in names for p in _labelled_scores(*raw[n], task)]
            if len({y for y, _ in pairs}) == 2:
                truth, scores = [y for y, _ in pairs], [p for _, p in pairs]
                out.setdefault(task, {})[scope] = {**calibration_error_statistics(truth, scores),
                                                   "reliability": reliability(truth, scores)}
    return out


def write_report(report: dict[str, Any], raw: dict[str, Any], output: Path) -> None:
    """``metrics.json``, ``report.md``, ``roc_<dataset>.png`` and ``confusion_<dataset>.png`` in ``output``."""
    import matplotlib

    from training.card import calibration_table, metrics_table

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# Evaluation of {report['model']}", "",
             f"Answers: {report['answers']}, parse failures: {100 * report['parse_failure_rate']:.1f}%", "",
             *metrics_table(report), "", *calibration_table(report)]
    (output / "report.md").write_text("\n".join(lines) + "\n")
    calibration = report.get("calibration", {})
    if calibration:
        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        for task, scopes in calibration.items():
            points = scopes.get("development", scopes.get("all"))
            xs = [p["predicted"] for p in points["reliability"]]
            ys = [p["observed"] for p in points["reliability"]]
            axis.plot(xs, ys, marker="o", markersize=3, label=f"{task} (ECE {points['ece']:.3f})")
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
        axis.set(xlabel="predicted probability", ylabel="observed frequency", title="reliability (test splits)")
        axis.legend(fontsize=5)
        figure.tight_layout()
        figure.savefig(output / "reliability.png", dpi=100)
        plt.close(figure)
    for name, (records, outcomes) in raw.items():
        result = report["datasets"][name]
        if result.get("auc"):
            figure, axis = plt.subplots(figsize=(4, 4))
            for task in result["auc"]:
                pairs = [(TASKS_BY_NAME[task].label(r), o.scores.get(task)) for r, o in zip(records, outcomes, strict=True)]
                pairs = [(y, s) for y, s in pairs if y is not None and s is not None]
                fpr, tpr = metrics.roc_curve([y for y, _ in pairs], [s for _, s in pairs])
                axis.plot(fpr, tpr, label=f"{task} ({result['auc'][task]['auc']:.2f})")
            axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
            axis.set(xlabel="1 - specificity", ylabel="sensitivity", title=name)
            axis.legend(fontsize=6)
            figure.tight_layout()
            figure.savefig(output / f"roc_{name}.png", dpi=100)
            plt.close(figure)
        if "dr_grade" in result:
            matrix = np.asarray(result["dr_grade"]["confusion"])
            figure, axis = plt.subplots(figsize=(4, 4))
            axis.imshow(matrix, cmap="Blues")
            for (i, j), value in np.ndenumerate(matrix):
                axis.text(j, i, str(value), ha="center", va="center", fontsize=8)
            axis.set(xlabel="predicted grade", ylabel="true grade", title=f"{name}: DR grade")
            figure.tight_layout()
            figure.savefig(output / f"confusion_{name}.png", dpi=100)
            plt.close(figure)
