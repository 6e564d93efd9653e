"""Model monitoring: per model version distributions of the stored analyses and a drift check.

**Where the figures come from.** The inference workers are separate processes (often on other hosts), so nothing
is counted in process memory: every figure is derived at scrape time from the analyses stored in the database,
over a bounded window — per model version, its ``monitoring.window_analyses`` most recent current (not
superseded) analyses stored within ``monitoring.window_days``. Every API replica therefore reports the same
figures, a restarted process loses nothing, and no Prometheus multiprocess directory has to be shared between
hosts. Stored analyses never change, so each one is read and summarised once per process and kept (only for the
ids still in the window); a scrape reads the window's ids and the new analyses only.

The window figures are *snapshots*: the finding-probability histograms describe the distribution in the current
window (use their buckets directly, not ``rate()``), ratios are over the window.

**Drift.** For each (model version, condition) the window's image probabilities are binned on the edges of the
model's evaluation histogram (``score_histograms`` in the ``metrics.json`` that ``retinalgpt evaluate`` writes,
:func:`training.evaluate.score_histograms`) and compared with it by the population stability index
``PSI = Σ (a_i − e_i) · ln(a_i / e_i)`` over the bins' shares (each share floored at :data:`PSI_FLOOR`). PSI above
``monitoring.drift_threshold`` (default 0.25, the customary "significant shift") with at least
``monitoring.drift_min_samples`` image probabilities flags the condition. The reference of a model version is
the ``metrics.json`` whose ``identity`` names it, looked for in ``monitoring.drift_references``, the configured or
active model directory and every version directory of the registry (``metrics.json`` or
``evaluation/metrics.json``).

**Clinician agreement.** Per model version, over its ``monitoring.agreement_window_signoffs`` most recent
clinician sign-offs made within ``monitoring.agreement_window_days`` (:mod:`worker.signoff`): per condition, the
share of the signed images where the clinician's call equals the AI's original one — present/absent
(:attr:`model.schema.Finding.present`) and, for a graded condition (``max_grade > 1``), the grade — and the share
of sign-offs that confirmed the result without any change (grades, lesion boxes, referral). An image counts for a
condition when the AI's or the clinician's analysis has a finding of it; a finding only the clinician has (the AI
made no call) is a disagreement. A re-sign of an already signed result (``corrects_signed``) compares two
clinicians, not the AI, and is left out. Sign-offs never change either, so each is summarised once per process.

This module never imports torch (the API serves it).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from model.schema import Finding, QualityGrade, Referral, Source, StudyAnalysis, max_grade
from worker.config import MonitoringSettings, Settings
from worker.db import Analysis, Database, SignOff

log = logging.getLogger(__name__)

PROBABILITY_BUCKETS = tuple(round(0.1 * k, 1) for k in range(1, 11))
"""Upper bounds of the finding-probability histogram buckets (the evaluation's ten equal-width bins)."""

PSI_FLOOR = 1e-4
"""Smallest bin share in the PSI (an empty bin would make it infinite)."""

METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Summary:
    """What monitoring keeps of one stored analysis."""

    probabilities: dict[str, tuple[float, ...]]
    """Condition → P(present) of each image the model scored (model-sourced findings only)."""
    images: int
    ungradable: int
    """Images whose quality grade is ``reject``."""
    referral: str
    answers: int
    parse_failures: dict[str, int]
    """Protocol task → answers that did not parse."""


def summarise(result: dict[str, Any]) -> Summary | None:
    """The monitoring summary of one stored :class:`~model.schema.StudyAnalysis` (None if it does not validate)."""
    try:
        analysis = StudyAnalysis.model_validate(result)
    except ValidationError as exc:
        log.warning("monitoring: a stored analysis does not validate (%d errors); left out", exc.error_count())
        return None
    probabilities: dict[str, list[float]] = {}
    failures: dict[str, int] = {}
    answers = ungradable = 0
    for image in analysis.images:
        if image.quality is not None and image.quality.grade == QualityGrade.REJECT:
            ungradable += 1
        for finding in image.findings:
            if finding.source == Source.MODEL and finding.probability is not None:
                probabilities.setdefault(finding.condition.value, []).append(float(finding.probability))
        for answer in image.answers:
            answers += 1
            if not answer.parsed:
                failures[answer.task] = failures.get(answer.task, 0) + 1
    return Summary(probabilities={k: tuple(v) for k, v in probabilities.items()}, images=len(analysis.images),
                   ungradable=ungradable, referral=analysis.referral.value, answers=answers, parse_failures=failures)


@dataclass
class VersionWindow:
    """The window of one model version, aggregated."""

    model: str
    version: str
    analyses: int = 0
    images: int = 0
    ungradable: int = 0
    answers: int = 0
    referrals: dict[str, int] = field(default_factory=dict)
    parse_failures: dict[str, int] = field(default_factory=dict)
    probabilities: dict[str, list[float]] = field(default_factory=dict)

    def add(self, summary: Summary) -> None:
        self.analyses += 1
        self.images += summary.images
        self.ungradable += summary.ungradable
        self.answers += summary.answers
        self.referrals[summary.referral] = self.referrals.get(summary.referral, 0) + 1
        for task, n in summary.parse_failures.items():
            self.parse_failures[task] = self.parse_failures.get(task, 0) + n
        for condition, values in summary.probabilities.items():
            self.probabilities.setdefault(condition, []).extend(values)


@dataclass(frozen=True)
class Agreement:
    """What monitoring keeps of one sign-off: per condition (images agreeing, images compared), and whether the
    clinician confirmed the AI's result without change."""

    conditions: dict[str, tuple[int, int]]
    unchanged: bool


def same_call(ai: Finding | None, clinician: Finding | None) -> bool:
    """Whether the clinician's finding says what the AI's said: present/absent, and the grade of a graded
    condition (a missing finding is no call, which never agrees with a call)."""
    if ai is None or clinician is None:
        return ai is None and clinician is None
    if ai.present != clinician.present:
        return False
    return max_grade(ai.condition) == 1 or ai.grade == clinician.grade


def agreement(original: dict[str, Any], signed: dict[str, Any], changed: bool) -> Agreement | None:
    """The agreement of the clinician's analysis ``signed`` with the AI's ``original`` (None if either does not
    validate). Images are matched by SOP Instance UID, else by position."""
    try:
        ai, clinician = StudyAnalysis.model_validate(original), StudyAnalysis.model_validate(signed)
    except ValidationError as exc:
        log.warning("monitoring: a signed analysis does not validate (%d errors); left out", exc.error_count())
        return None
    by_uid = {img.sop_instance_uid: img for img in clinician.images if img.sop_instance_uid}
    counts: dict[str, list[int]] = {}
    for n, image in enumerate(ai.images):
        other = by_uid.get(image.sop_instance_uid) if image.sop_instance_uid else None
        if other is None and not image.sop_instance_uid and n < len(clinician.images):
            other = clinician.images[n]
        if other is None:
            continue
        ai_findings = {f.condition: f for f in image.findings}
        clinician_findings = {f.condition: f for f in other.findings}
        for condition in set(ai_findings) | set(clinician_findings):
            tally = counts.setdefault(condition.value, [0, 0])
            tally[0] += same_call(ai_findings.get(condition), clinician_findings.get(condition))
            tally[1] += 1
    return Agreement(conditions={c: (a, n) for c, (a, n) in counts.items()}, unchanged=not changed)


@dataclass
class AgreementWindow:
    """The agreement window of one model version, aggregated."""

    model: str
    version: str
    signoffs: int = 0
    unchanged: int = 0
    conditions: dict[str, list[int]] = field(default_factory=dict)
    """Condition → [images agreeing, images compared]."""

    def add(self, item: Agreement) -> None:
        self.signoffs += 1
        self.unchanged += item.unchanged
        for condition, (agree, total) in item.conditions.items():
            tally = self.conditions.setdefault(condition, [0, 0])
            tally[0] += agree
            tally[1] += total


@dataclass(frozen=True)
class Reference:
    """A model version's evaluation distribution: bin edges and per condition counts."""

    source: Path
    edges: tuple[float, ...]
    counts: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Drift:
    """The drift check of one (model version, condition)."""

    model: str
    version: str
    condition: str
    samples: int
    psi: float | None
    """None when there are fewer than ``drift_min_samples`` samples."""
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    checks: list[Drift]
    missing_reference: list[tuple[str, str]]
    threshold: float

    @property
    def drifted(self) -> bool:
        return any(c.drifted for c in self.checks)

    def describe(self) -> str:
        """One line for ``/readyz``: ``ok``, or what drifted, or why nothing could be judged."""
        flagged = [c for c in self.checks if c.drifted]
        if flagged:
            return "drift: " + "; ".join(f"{c.model} {c.version} {c.condition} PSI {c.psi:.3f} > "
                                         f"{self.threshold:g} (n={c.samples})" for c in flagged)
        judged = [c for c in self.checks if c.psi is not None]
        if judged:
            return "ok"
        if self.missing_reference:
            return "not checked: no evaluation distribution (score_histograms) for " + ", ".join(
                f"{m} {v}" for m, v in self.missing_reference)
        return "not checked: too few recent analyses"


def psi(reference: Sequence[float], observed: Sequence[float]) -> float:
    """Population stability index of two histograms over the same bins (counts or shares)."""
    e_total, a_total = float(sum(reference)), float(sum(observed))
    if e_total <= 0 or a_total <= 0:
        raise ValueError("both histograms need at least one count")
    total = 0.0
    for e, a in zip(reference, observed, strict=True):
        e_share, a_share = max(e / e_total, PSI_FLOOR), max(a / a_total, PSI_FLOOR)
        total += (a_share - e_share) * math.log(a_share / e_share)
    return total


def bin_counts(values: Iterable[float], edges: Sequence[float]) -> list[int]:
    """Counts of ``values`` in the bins ``[edges[i], edges[i+1])`` (the last bin closed)."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        index = len(counts) - 1
        for i in range(len(counts)):
            if value < edges[i + 1]:
                index = i
                break
        counts[max(index, 0)] += 1
    return counts


def read_reference(path: Path) -> tuple[tuple[str, str], Reference] | None:
    """(model name, version) and the evaluation distribution recorded in one ``metrics.json``, or None."""
    try:
        report = json.loads(path.read_text())
        identity = report["identity"]
        histograms = report["score_histograms"]
        edges = tuple(float(e) for e in histograms["edges"])
        counts = {str(c): tuple(int(n) for n in h["counts"]) for c, h in histograms["conditions"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if len(edges) < 2 or any(len(c) != len(edges) - 1 for c in counts.values()):
        log.warning("monitoring: %s has a malformed score_histograms record; ignored", path)
        return None
    return (str(identity["name"]), str(identity["version"])), Reference(source=path, edges=edges, counts=counts)


def reference_files(settings: Settings) -> list[Path]:
    """Where evaluation ``metrics.json`` files are looked for (configured ones first)."""
    files = list(settings.monitoring.drift_references)
    folders: list[Path] = []
    if settings.model.path is not None:
        folders.append(settings.model.path)
    if settings.model.enabled:
        from worker.runtime import model_directory

        try:
            active = model_directory(settings)
        except Exception as exc:  # noqa: BLE001 - a broken registry must not break the metrics
            log.warning("monitoring: model directory not resolvable: %s", exc)
            active = None
        if active is not None:
            folders.append(active)
    versions = settings.model.registry / "versions"
    if versions.is_dir():
        folders.extend(sorted(p for p in versions.iterdir() if p.is_dir()))
    for folder in folders:
        files += [folder / METRICS_FILE, folder / "evaluation" / METRICS_FILE]
    return files


class ModelMonitor:
    """The window of recent analyses per model version, their summaries (cached by analysis id: stored analyses
    never change) and the evaluation references (cached by file modification time)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self._lock = threading.Lock()
        self._summaries: dict[int, Summary | None] = {}
        self._references: dict[Path, tuple[float, tuple[tuple[str, str], Reference] | None]] = {}
        self._agreements: dict[int, Agreement | None] = {}

    @property
    def config(self) -> MonitoringSettings:
        return self.settings.monitoring

    def windows(self, now: datetime | None = None) -> list[VersionWindow]:
        """One :class:`VersionWindow` per model version with analyses in the window."""
        now = now or datetime.now(UTC)
        with self.db.reading() as session, self._lock:
            rows = self._window_rows(session, now - timedelta(days=self.config.window_days))
            missing = [row_id for row_id, _, _ in rows if row_id not in self._summaries]
            for start in range(0, len(missing), 500):
                chunk = missing[start:start + 500]
                for row_id, result in session.execute(select(Analysis.id, Analysis.result)
                                                      .where(Analysis.id.in_(chunk))):
                    self._summaries[row_id] = summarise(result)
            keep = {row_id for row_id, _, _ in rows}
            for row_id in [i for i in self._summaries if i not in keep]:
                del self._summaries[row_id]
            windows: dict[tuple[str, str], VersionWindow] = {}
            for row_id, name, version in rows:
                summary = self._summaries.get(row_id)
                if summary is not None:
                    windows.setdefault((name, version), VersionWindow(name, version)).add(summary)
        return sorted(windows.values(), key=lambda w: (w.model, w.version))

    def _window_rows(self, session: Session, since: datetime) -> list[tuple[int, str, str]]:
        rank = func.row_number().over(partition_by=(Analysis.model_name, Analysis.model_version),
                                      order_by=Analysis.id.desc()).label("rank")
        recent = (select(Analysis.id, Analysis.model_name, Analysis.model_version, rank)
                  .where(Analysis.superseded.is_(False), Analysis.created_at >= since,
                         ~exists().where(SignOff.study_id == Analysis.study_id,  # a clinician's values, not the model's
                                         SignOff.revision == Analysis.revision)).subquery())
        stmt = select(recent.c.id, recent.c.model_name, recent.c.model_version).where(
            recent.c.rank <= self.config.window_analyses)
        return [(int(i), str(n), str(v)) for i, n, v in session.execute(stmt)]

    def agreement_windows(self, now: datetime | None = None) -> list[AgreementWindow]:
        """One :class:`AgreementWindow` per model version with sign-offs in the agreement window."""
        now = now or datetime.now(UTC)
        since = now - timedelta(days=self.config.agreement_window_days)
        rank = func.row_number().over(partition_by=(Analysis.model_name, Analysis.model_version),
                                      order_by=(SignOff.signed_at.desc(), SignOff.id.desc())).label("rank")
        recent = (select(SignOff.id, Analysis.model_name, Analysis.model_version, rank)
                  .join(Analysis, (Analysis.study_id == SignOff.study_id) & (Analysis.revision == SignOff.revision))
                  .where(SignOff.corrects_signed.is_(False), SignOff.signed_at >= since).subquery())
        stmt = select(recent.c.id, recent.c.model_name, recent.c.model_version).where(
            recent.c.rank <= self.config.agreement_window_signoffs)
        with self.db.reading() as session, self._lock:
            rows = [(int(i), str(n), str(v)) for i, n, v in session.execute(stmt)]
            missing = [row_id for row_id, _, _ in rows if row_id not in self._agreements]
            for start in range(0, len(missing), 500):
                chunk = missing[start:start + 500]
                query = (select(SignOff.id, SignOff.original, SignOff.changed, Analysis.result)
                         .join(Analysis, (Analysis.study_id == SignOff.study_id)
                               & (Analysis.revision == SignOff.revision))
                         .where(SignOff.id.in_(chunk)))
                for row_id, original, changed, signed in session.execute(query):
                    self._agreements[row_id] = agreement(original, signed, bool(changed))
            keep = {row_id for row_id, _, _ in rows}
            for row_id in [i for i in self._agreements if i not in keep]:
                del self._agreements[row_id]
            windows: dict[tuple[str, str], AgreementWindow] = {}
            for row_id, name, version in rows:
                item = self._agreements.get(row_id)
                if item is not None:
                    windows.setdefault((name, version), AgreementWindow(name, version)).add(item)
        return sorted(windows.values(), key=lambda w: (w.model, w.version))

    def references(self) -> dict[tuple[str, str], Reference]:
        """Evaluation distributions by (model name, version); the first file found for a version wins."""
        found: dict[tuple[str, str], Reference] = {}
        for path in reference_files(self.settings):
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            with self._lock:
                cached = self._references.get(path)
                if cached is None or cached[0] != mtime:
                    cached = (mtime, read_reference(path))
                    self._references[path] = cached
            if cached[1] is not None:
                key, reference = cached[1]
                found.setdefault(key, reference)
        return found

    def drift(self, windows: Sequence[VersionWindow] | None = None) -> DriftReport:
        """The drift check of every (model version, condition) in the window that has a reference."""
        windows = self.windows() if windows is None else windows
        references = self.references()
        checks: list[Drift] = []
        missing: list[tuple[str, str]] = []
        for window in windows:
            reference = references.get((window.model, window.version))
            if reference is None:
                missing.append((window.model, window.version))
                continue
            for condition, expected in sorted(reference.counts.items()):
                values = window.probabilities.get(condition, [])
                if not values or sum(expected) == 0:
                    continue
                value = None
                if len(values) >= self.config.drift_min_samples:
                    value = psi(expected, bin_counts(values, reference.edges))
                checks.append(Drift(window.model, window.version, condition, len(values), value,
                                    value is not None and value > self.config.drift_threshold))
        return DriftReport(checks, missing, self.config.drift_threshold)


class ModelCollector(Collector):
    """Per model version figures of the monitoring window and the drift check, read at scrape time."""

    def __init__(self, monitor: ModelMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        try:
            windows = self.monitor.windows()
            report = self.monitor.drift(windows)
        except Exception as exc:  # noqa: BLE001 - the pipeline metrics are still served when this part fails
            log.warning("monitoring: window not readable: %s", type(exc).__name__)
            return
        yield from window_metrics(windows)
        yield from drift_metrics(report, windows)
        try:
            agreements = self.monitor.agreement_windows()
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("monitoring: sign-offs not readable: %s", type(exc).__name__)
            return
        yield from agreement_metrics(agreements)


def window_metrics(windows: Sequence[VersionWindow]) -> Iterator[Metric]:
    labels = ["model", "version"]
    analyses = GaugeMetricFamily("retinalgpt_model_window_analyses", "analyses in the monitoring window", labels=labels)
    images = GaugeMetricFamily("retinalgpt_model_window_images", "images of the analyses in the monitoring window",
                               labels=labels)
    probability = HistogramMetricFamily("retinalgpt_model_finding_probability", "P(present) of each image's "
                                        "model finding over the monitoring window (a snapshot: do not rate())",
                                        labels=[*labels, "condition"])
    ungradable = GaugeMetricFamily("retinalgpt_model_ungradable_ratio", "share of the window's images whose "
                                   "quality grade is reject", labels=labels)
    referral = GaugeMetricFamily("retinalgpt_model_referral_ratio", "share of the window's analyses by referral "
                                 "class", labels=[*labels, "referral"])
    failures = GaugeMetricFamily("retinalgpt_model_parse_failures", "model answers in the window that did not "
                                 "parse, by protocol task", labels=[*labels, "task"])
    failure_ratio = GaugeMetricFamily("retinalgpt_model_parse_failure_ratio", "share of the window's model answers "
                                      "that did not parse", labels=labels)
    for w in windows:
        key = [w.model, w.version]
        analyses.add_metric(key, w.analyses)
        images.add_metric(key, w.images)
        for condition, values in sorted(w.probabilities.items()):
            cumulative = [(f"{bound:g}", float(sum(1 for v in values if v <= bound))) for bound in PROBABILITY_BUCKETS]
            probability.add_metric([*key, condition], cumulative + [("+Inf", float(len(values)))], float(sum(values)))
        if w.images:
            ungradable.add_metric(key, w.ungradable / w.images)
        for value in Referral:
            referral.add_metric([*key, value.value], w.referrals.get(value.value, 0) / w.analyses)
        for task, n in sorted(w.parse_failures.items()):
            failures.add_metric([*key, task], n)
        if w.answers:
            failure_ratio.add_metric(key, sum(w.parse_failures.values()) / w.answers)
    yield from (analyses, images, probability, ungradable, referral, failures, failure_ratio)


def drift_metrics(report: DriftReport, windows: Sequence[VersionWindow]) -> Iterator[Metric]:
    labels = ["model", "version", "condition"]
    value = GaugeMetricFamily("retinalgpt_model_drift_psi", "population stability index of the window's "
                              "probabilities against the model's evaluation distribution", labels=labels)
    flag = GaugeMetricFamily("retinalgpt_model_drift", "1 when the condition's PSI exceeds "
                             "monitoring.drift_threshold", labels=labels)
    samples = GaugeMetricFamily("retinalgpt_model_drift_samples", "image probabilities the drift check used",
                                labels=labels)
    for check in report.checks:
        key = [check.model, check.version, check.condition]
        samples.add_metric(key, check.samples)
        if check.psi is not None:
            value.add_metric(key, check.psi)
            flag.add_metric(key, 1 if check.drifted else 0)
    reference = GaugeMetricFamily("retinalgpt_model_drift_reference", "1 when the model version's evaluation "
                                  "distribution was found", labels=["model", "version"])
    missing = set(report.missing_reference)
    for w in windows:
        reference.add_metric([w.model, w.version], 0 if (w.model, w.version) in missing else 1)
    threshold = GaugeMetricFamily("retinalgpt_model_drift_threshold", "monitoring.drift_threshold",
                                  value=report.threshold)
    yield from (value, flag, samples, reference, threshold)


def agreement_metrics(windows: Sequence[AgreementWindow]) -> Iterator[Metric]:
    labels = ["model", "version"]
    signoffs = GaugeMetricFamily("retinalgpt_model_window_signoffs", "clinician sign-offs in the agreement window",
                                 labels=labels)
    confirmed = GaugeMetricFamily("retinalgpt_model_confirm_ratio", "share of the window's sign-offs that "
                                  "confirmed the AI's result without any change", labels=labels)
    ratio = GaugeMetricFamily("retinalgpt_model_agreement_ratio", "share of the window's signed images where the "
                              "clinician's present/absent call (and grade where graded) equals the AI's",
                              labels=[*labels, "condition"])
    images = GaugeMetricFamily("retinalgpt_model_agreement_images", "signed images the agreement ratio compares",
                               labels=[*labels, "condition"])
    for w in windows:
        key = [w.model, w.version]
        signoffs.add_metric(key, w.signoffs)
        confirmed.add_metric(key, w.unchanged / w.signoffs)
        for condition, (agree, total) in sorted(w.conditions.items()):
            images.add_metric([*key, condition], total)
            if total:
                ratio.add_metric([*key, condition], agree / total)
    yield from (signoffs, confirmed, ratio, images)
