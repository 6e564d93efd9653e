"""Compare a candidate model version with the active one on the site's own data (issue 17 item 3).

Two views, both per condition (``model.schema.Condition``) and per image (SOP Instance UID):

* **Agreement** on the studies both versions have read (the candidate's analyses are usually shadow analyses,
  :mod:`worker.pipeline.processing`): for each image and condition both scored, whether their calls agree
  (P(present) ≥ the operating threshold); agreement rate with a Wilson 95 % interval.
* **Signed cases**: the images of studies a clinician signed off (:mod:`worker.signoff`); the truth is the
  clinician's call (:meth:`model.schema.Finding.present` in the signed revision's analysis — confirmed and
  corrected grades alike), the scores are each version's P(present) from its analysis of the revision the
  clinician read (or an earlier one holding the same image). Only images both versions scored count, so both
  are measured on the same cases. Per version: ROC AUC (Mann–Whitney) with a percentile bootstrap 95 % interval,
  sensitivity and specificity at the threshold with Wilson 95 % intervals (:mod:`training.metrics`); and the
  paired bootstrap 95 % interval of the AUC difference (candidate − active, images resampled together).

The promotion gate (:meth:`Comparison.gate`): a condition with at least ``min_cases`` signed images of
both classes regresses when the candidate's AUC, or its sensitivity at the threshold, is lower than the active
version's by more than ``margin``; when no condition has that many signed images the comparison is
inconclusive (:meth:`Comparison.shortfall`) and the gate does not let the candidate through either.

Called by the CLI entry points only (``retinalgpt model compare`` and ``model activate``), the one place
``worker`` may use ``training`` (DESIGN.md): :mod:`training.metrics` is imported inside the functions; it imports
numpy and scipy only, never torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from model.schema import Source, StudyAnalysis
from worker.db import Analysis, SignOff

Key = tuple[int, str, str]
"""(study id, image SOP Instance UID or file path, condition)."""


def model_scores(result: dict[str, Any]) -> dict[tuple[str, str], float]:
    """P(present) the model gave each (image, condition) in a stored analysis (model findings only)."""
    scores: dict[tuple[str, str], float] = {}
    for image in StudyAnalysis.model_validate(result).images:
        uid = image.sop_instance_uid or image.file_path or ""
        for finding in image.findings:
            if finding.source == Source.MODEL and finding.probability is not None:
                scores.setdefault((uid, finding.condition.value), float(finding.probability))
    return scores


def clinician_truth(result: dict[str, Any]) -> dict[tuple[str, str], bool]:
    """The clinician's call (present or not) of every condition with a finding in a signed revision."""
    truth: dict[tuple[str, str], bool] = {}
    for image in StudyAnalysis.model_validate(result).images:
        uid = image.sop_instance_uid or image.file_path or ""
        for finding in image.findings:
            truth.setdefault((uid, finding.condition.value), finding.present)
    return truth


@dataclass
class SiteData:
    """Scores of both versions and the clinicians' truth, keyed by :data:`Key`."""

    read: dict[str, dict[Key, float]] = field(default_factory=dict)
    """version → scores from its latest analysis of each study (studies it has read)."""
    signed: dict[str, dict[Key, float]] = field(default_factory=dict)
    """version → scores from its analysis of the revision the clinician signed (or an earlier one)."""
    truth: dict[Key, bool] = field(default_factory=dict)


def load(session: Session, candidate: str, active: str) -> SiteData:
    """Read the analyses of ``candidate`` and ``active`` and the latest sign-off of each study."""
    latest: dict[int, SignOff] = {}
    for row in session.scalars(select(SignOff).order_by(SignOff.study_id, SignOff.revision)):
        latest[row.study_id] = row
    clinician_revisions = {(row.study_id, row.revision)
                           for row in session.scalars(select(SignOff))}
    data = SiteData(read={candidate: {}, active: {}}, signed={candidate: {}, active: {}})
    for study_id, signoff in latest.items():
        truth_row = session.scalars(select(Analysis).where(
            Analysis.study_id == study_id, Analysis.revision == signoff.revision, Analysis.shadow.is_(False))
            .order_by(Analysis.id.desc())).first()
        if truth_row is not None:
            for (uid, condition), present in clinician_truth(truth_row.result).items():
                data.truth[(study_id, uid, condition)] = present
    rows = session.scalars(select(Analysis).where(Analysis.model_version.in_((candidate, active)))
                           .order_by(Analysis.study_id, Analysis.revision, Analysis.id))
    for row in rows:  # ascending, so a later revision's score of the same image replaces an earlier one
        if (row.study_id, row.revision) in clinician_revisions:
            continue  # the clinician's values, stored under the AI's model version
        scores = model_scores(row.result)
        for (uid, condition), score in scores.items():
            key = (row.study_id, uid, condition)
            data.read[row.model_version][key] = score
            signoff = latest.get(row.study_id)
            if signoff is not None and row.revision <= signoff.signed_revision:
                data.signed[row.model_version][key] = score
    return data


def _ci(values: tuple[float, float]) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in values]


def _num(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 6)


@dataclass
class Agreement:
    condition: str
    images: int
    agree: int
    rate: float | None
    rate_ci: list[float | None]


@dataclass
class VersionScore:
    version: str
    auc: float | None
    auc_ci: list[float | None]
    sensitivity: float | None
    sensitivity_ci: list[float | None]
    specificity: float | None
    specificity_ci: list[float | None]
    tp: int
    fn: int
    tn: int
    fp: int


@dataclass
class Signed:
    condition: str
    images: int
    positives: int
    candidate: VersionScore
    active: VersionScore
    auc_difference: float | None
    auc_difference_ci: list[float | None]
    truth: list[int] = field(repr=False, default_factory=list)
    candidate_scores: list[float] = field(repr=False, default_factory=list)
    active_scores: list[float] = field(repr=False, default_factory=list)


@dataclass
class Comparison:
    candidate: str
    active: str
    threshold: float
    studies_both_read: int
    signed_studies: int
    agreement: list[Agreement]
    signed: list[Signed]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for item in out["signed"]:
            for key in ("truth", "candidate_scores", "active_scores"):
                item.pop(key)
        return out

    def regressions(self, margin: float, min_cases: int) -> list[str]:
        """Why the candidate is worse than the active version on the signed cases (empty: not worse)."""
        reasons = []
        for item in self.signed:
            if item.images < min_cases or item.positives in (0, item.images):
                continue
            cand, act = item.candidate, item.active
            if cand.auc is not None and act.auc is not None and cand.auc < act.auc - margin:
                reasons.append(f"{item.condition}: AUC {cand.auc:.3f} vs {act.auc:.3f} on {item.images} signed images")
            if (cand.sensitivity is not None and act.sensitivity is not None
                    and cand.sensitivity < act.sensitivity - margin):
                reasons.append(f"{item.condition}: sensitivity {cand.sensitivity:.3f} vs {act.sensitivity:.3f} at "
                               f"{self.threshold:g} on {item.positives} positive signed images")
        return reasons

    def judged(self, min_cases: int) -> list[str]:
        """The conditions with enough signed images of both classes for the gate to judge."""
        return [s.condition for s in self.signed if s.images >= min_cases and 0 < s.positives < s.images]

    def shortfall(self, min_cases: int) -> str | None:
        """Why the gate cannot judge the candidate at all (no condition has ``min_cases`` signed images of both
        classes scored by both versions): how many signed cases there are and how many are needed; None when at
        least one condition is judged."""
        if self.judged(min_cases):
            return None
        per_condition = ", ".join(f"{s.condition} {s.images} ({s.positives} present)" for s in self.signed)
        return (f"inconclusive: {self.signed_studies} signed studies scored by both {self.candidate} and "
                f"{self.active} ({per_condition or 'no signed image'}); at least {min_cases} signed images of "
                "one condition, with the condition both present and absent among them, are needed "
                "([model] promotion_min_cases)")

    def gate(self, margin: float, min_cases: int) -> dict[str, Any]:
        """The promotion gate's verdict: ``worse`` (with the regressions), ``inconclusive`` (with the shortfall)
        or ``not worse`` (with the conditions judged)."""
        regressions = self.regressions(margin, min_cases)
        shortfall = self.shortfall(min_cases)
        verdict = "worse" if regressions else "inconclusive" if shortfall else "not worse"
        return {"margin": margin, "min_cases": min_cases, "verdict": verdict, "judged": self.judged(min_cases),
                "regressions": regressions, "shortfall": shortfall}


def paired_auc_difference_ci(truth: Iterable[int], first: Iterable[float], second: Iterable[float],
                             resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of AUC(first) − AUC(second), the same images resampled for both."""
    from scipy.stats import rankdata

    t = np.asarray(list(truth)).astype(bool)
    a, b = np.asarray(list(first), dtype=float), np.asarray(list(second), dtype=float)
    if t.all() or not t.any():
        return float("nan"), float("nan")
    index = np.random.default_rng(seed).integers(0, t.size, size=(resamples, t.size))
    labels = t[index]
    positives = labels.sum(axis=1)
    negatives = t.size - positives
    valid = (positives > 0) & (negatives > 0)

    def auc(scores: np.ndarray) -> np.ndarray:
        rank_sum = (rankdata(scores[index], axis=1) * labels).sum(axis=1)[valid]
        p, n = positives[valid], negatives[valid]
        return (rank_sum - p * (p + 1) / 2) / (p * n)

    difference = auc(a) - auc(b)
    alpha = (1 - level) / 2
    return float(np.quantile(difference, alpha)), float(np.quantile(difference, 1 - alpha))


def _score(version: str, truth: list[int], scores: list[float], threshold: float, resamples: int) -> VersionScore:
    from training.metrics import bootstrap_auc_ci, operating_point, roc_auc

    point = operating_point(truth, scores, threshold)
    return VersionScore(version=version, auc=_num(roc_auc(truth, scores)),
                        auc_ci=_ci(bootstrap_auc_ci(truth, scores, resamples=resamples)),
                        sensitivity=_num(point["sensitivity"]), sensitivity_ci=_ci(point["sensitivity_ci"]),
                        specificity=_num(point["specificity"]), specificity_ci=_ci(point["specificity_ci"]),
                        tp=point["tp"], fn=point["fn"], tn=point["tn"], fp=point["fp"])


def compare(data: SiteData, candidate: str, active: str, threshold: float = 0.5,
            resamples: int = 2000) -> Comparison:
    """The comparison of ``candidate`` with ``active`` on ``data`` (see the module docstring)."""
    from training.metrics import roc_auc, wilson_interval

    cand, act = data.read[candidate], data.read[active]
    both = sorted(set(cand) & set(act))
    agreement = []
    for condition in sorted({key[2] for key in both}):
        keys = [k for k in both if k[2] == condition]
        agree = sum((cand[k] >= threshold) == (act[k] >= threshold) for k in keys)
        agreement.append(Agreement(condition, len(keys), agree, _num(agree / len(keys)),
                                   _ci(wilson_interval(agree, len(keys)))))
    signed_cand, signed_act = data.signed[candidate], data.signed[active]
    signed_keys = sorted(set(signed_cand) & set(signed_act) & set(data.truth))
    signed = []
    for condition in sorted({key[2] for key in signed_keys}):
        keys = [k for k in signed_keys if k[2] == condition]
        truth = [int(data.truth[k]) for k in keys]
        a, b = [signed_cand[k] for k in keys], [signed_act[k] for k in keys]
        auc_c, auc_a = roc_auc(truth, a), roc_auc(truth, b)
        signed.append(Signed(
            condition=condition, images=len(keys), positives=sum(truth),
            candidate=_score(candidate, truth, a, threshold, resamples),
            active=_score(active, truth, b, threshold, resamples),
            auc_difference=_num(auc_c - auc_a),
            auc_difference_ci=_ci(paired_auc_difference_ci(truth, a, b, resamples=resamples)),
            truth=truth, candidate_scores=a, active_scores=b))
    return Comparison(candidate=candidate, active=active, threshold=threshold,
                      studies_both_read=len({k[0] for k in both}),
                      signed_studies=len({k[0] for k in signed_keys}), agreement=agreement, signed=signed)


def plot(comparison: Comparison, path: Path) -> Path | None:
    """ROC curves of both versions on the signed cases, one panel per condition, and the agreement rates with
    their intervals (matplotlib PNG); None when matplotlib is not installed or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from training.metrics import roc_auc, roc_curve

    panels = len(comparison.signed) + (1 if comparison.agreement else 0)
    if panels == 0:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2), squeeze=False)
    for ax, item in zip(axes[0], comparison.signed, strict=False):
        for version, scores, style in ((comparison.candidate, item.candidate_scores, "-"),
                                       (comparison.active, item.active_scores, "--")):
            if 0 < item.positives < item.images:
                fpr, tpr = roc_curve(item.truth, scores)
                auc = roc_auc(item.truth, scores)
                ax.plot(fpr, tpr, style, label=f"{version} AUC {auc:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(title=f"{item.condition} (signed, n={item.images})", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(loc="lower right", fontsize=8)
    if comparison.agreement:
        ax = axes[0][-1]
        rates = [a.rate or 0.0 for a in comparison.agreement]
        low = [r - (a.rate_ci[0] or r) for r, a in zip(rates, comparison.agreement, strict=True)]
        high = [(a.rate_ci[1] or r) - r for r, a in zip(rates, comparison.agreement, strict=True)]
        ax.bar(range(len(rates)), rates, yerr=[low, high], capsize=4)
        ax.set_xticks(range(len(rates)), [a.condition for a in comparison.agreement], rotation=30, ha="right",
                      fontsize=8)
        ax.set(ylim=(0, 1.05), title="agreement (studies both read)", ylabel="rate")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
