"""Model comparison and the promotion gate (issue 17 item 3), from stored analyses and real sign-offs.

Four studies are read by the active version v1 and, in shadow, by the candidate v2, and signed by a clinician
through :func:`worker.signoff.sign` (the clinician's grade is the truth); a fifth is read by both and not signed.
``retinalgpt model compare`` must print the numbers computed by hand below; ``model activate`` must refuse the
candidate (worse beyond the margin) and allow it with ``--force``, which is audited.

Hand computation (diabetic retinopathy, one right-eye image per study, threshold 0.5)::

    study      truth  v1    v2     v1 call  v2 call
    s1         1      0.9   0.7    1        1
    s2         1      0.6   0.3    1        0
    s3         0      0.4   0.8    0        1
    s4         0      0.2   0.1    0        0
    s5 (unsigned)     0.9   0.95   1        1

    v1 AUC = 4/4 = 1.0; v2 AUC: (0.7>0.8 no, 0.7>0.1 yes, 0.3>0.8 no, 0.3>0.1 yes) = 2/4 = 0.5
    v1 sensitivity 2/2 = 1.0, specificity 2/2 = 1.0; v2 sensitivity 1/2 = 0.5, specificity 1/2 = 0.5
    agreement on the five studies both read: s1, s4, s5 agree = 3/5 = 0.6, Wilson 95 % [0.2307, 0.8824]
    Wilson(1 of 2) = [0.0945, 0.9055]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from model.registry import ModelRegistry
from model.schema import Condition, Finding, ImageAnalysis, Laterality, ModelIdentity, StudyAnalysis
from tests.support.model_site import two_version_site
from worker.cli.app import app
from worker.config import ApiToken, ConfigError, load_settings
from worker.db import Analysis, AuditEvent, Database, SignOff, Study, StudyState
from worker.signoff import GradeCorrection, SignOffRequest, sign

DR = Condition.DIABETIC_RETINOPATHY
CASES = {  # study: (clinician grade or None when unsigned, v1 probability, v2 probability)
    "1.2.826.0.1.1": (2, 0.9, 0.7),
    "1.2.826.0.1.2": (1, 0.6, 0.3),
    "1.2.826.0.1.3": (0, 0.4, 0.8),
    "1.2.826.0.1.4": (0, 0.2, 0.1),
    "1.2.826.0.1.5": (None, 0.9, 0.95),
}
CLINICIAN = ApiToken(name="dr-smith", role="clinician", sha256="0" * 64, observer_name="Smith^Jane",
                     organisation="Eye Clinic")


def _analysis(uid: str, version: str, probability: float) -> dict:
    identity = ModelIdentity(name="retinalgpt", version=version, device_uid="2.25.1")
    image = ImageAnalysis(sop_instance_uid=f"{uid}.1.1", laterality=Laterality.RIGHT,
                          findings=[Finding(condition=DR, probability=probability, grade=int(probability >= 0.5))])
    return StudyAnalysis(study_instance_uid=uid, model=identity, images=[image],
                         impression=f"read by {version}").model_dump(mode="json")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "retinalgpt.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[model]\npromotion_margin = 0.05\npromotion_min_cases = 4\n')
    settings = two_version_site(config, monkeypatch)
    db = Database(settings.database.url)
    with db.session() as session:
        for uid, (_, p1, p2) in CASES.items():
            study = Study(study_instance_uid=uid, state=StudyState.ANALYSED, revision=1)
            session.add(study)
            session.flush()
            session.add(Analysis(study_id=study.id, revision=1, model_name="retinalgpt", model_version="v1",
                                 result=_analysis(uid, "v1", p1)))
            session.add(Analysis(study_id=study.id, revision=1, model_name="retinalgpt", model_version="v2",
                                 result=_analysis(uid, "v2", p2), shadow=True))
    for uid, (grade, _, _) in CASES.items():
        if grade is not None:
            with db.session() as session:
                sign(session, settings, uid, SignOffRequest(revision=1, decision="correct", grades=[
                    GradeCorrection(eye="R", condition=DR, grade=grade)]), CLINICIAN, "api:dr-smith")
    with db.reading() as session:
        assert len(session.scalars(select(SignOff)).all()) == 4
    db.dispose()
    return config


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def test_compare_reports_hand_computed_numbers(site: Path, tmp_path: Path) -> None:
    code, out = run("model", "compare", "v2", "--json", "--out", str(tmp_path / "report"))
    assert code == 0, out
    report = json.loads(out)
    assert (report["candidate"], report["active"], report["threshold"]) == ("v2", "v1", 0.5)
    assert report["studies_both_read"] == 5 and report["signed_studies"] == 4
    (agreement,) = report["agreement"]
    assert (agreement["condition"], agreement["images"], agreement["agree"]) == (DR.value, 5, 3)
    assert agreement["rate"] == pytest.approx(0.6)
    assert agreement["rate_ci"] == pytest.approx([0.2307, 0.8824], abs=1e-4)
    (signed,) = report["signed"]
    assert (signed["images"], signed["positives"]) == (4, 2)
    cand, act = signed["candidate"], signed["active"]
    assert (act["auc"], act["sensitivity"], act["specificity"]) == (1.0, 1.0, 1.0)
    assert (cand["auc"], cand["sensitivity"], cand["specificity"]) == (0.5, 0.5, 0.5)
    assert (cand["tp"], cand["fn"], cand["tn"], cand["fp"]) == (1, 1, 1, 1)
    assert cand["sensitivity_ci"] == pytest.approx([0.0945, 0.9055], abs=1e-4)
    assert signed["auc_difference"] == pytest.approx(-0.5)
    low, high = cand["auc_ci"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    d_low, d_high = signed["auc_difference_ci"]
    assert -1.0 <= d_low <= -0.5 <= d_high <= 0.0 + 1e-9
    assert report["gate"]["judged"] == [DR.value] and len(report["gate"]["regressions"]) == 2
    assert (tmp_path / "report" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report" / "comparison.json").read_text())["signed"][0]["images"] == 4

    code, out = run("model", "compare", "v2")
    assert code == 0, out
    assert "0.600 [0.231, 0.882]" in out and "not worse" not in out

    code, out = run("model", "compare", "v1", "--against", "v2", "--json")
    report = json.loads(out)
    assert code == 0 and report["signed"][0]["candidate"]["auc"] == 1.0 and report["gate"]["regressions"] == []


def test_worklist_shows_the_active_result_not_the_newer_shadow_one(site: Path) -> None:
    from worker.api.studies import WorklistQuery, worklist

    db = Database(load_settings(site).database.url)
    with db.reading() as session:
        total, rows = worklist(session, WorklistQuery())
    db.dispose()
    unsigned = next(row for row in rows if row["study_instance_uid"] == "1.2.826.0.1.5")
    assert total == 5 and unsigned["impression"] == "read by v1"


def test_activate_gate_refuses_worse_candidate_unless_forced(site: Path) -> None:
    code, out = run("model", "activate", "v2")
    assert code != 0
    assert "worse than the active v1" in out and "AUC 0.500 vs 1.000" in out and "--force" in out
    assert ModelRegistry(load_settings(site).model.registry).active().version == "v1"

    code, out = run("model", "activate", "v2", "--force")
    assert code == 0, out
    assert "forced past the promotion gate" in out
    event = _forced_to_v2(site)
    assert event.actor.startswith("cli:") and event.detail["version"] == "v2" and event.detail["previous"] == "v1"
    assert event.detail["margin"] == 0.05 and any("AUC" in r for r in event.detail["reasons"])

    code, out = run("model", "activate", "v1")  # better than v2 on the signed cases: the gate lets it through
    assert code == 0 and "not worse" in out and "active model version: v1" in out


def _forced_to_v2(site: Path) -> AuditEvent:
    """After a forced activation: v2 is active and the one ``model.activated_forced`` audit event, returned."""
    settings = load_settings(site)
    assert ModelRegistry(settings.model.registry).active().version == "v2"
    db = Database(settings.database.url)
    with db.reading() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "model.activated_forced")).all()
    db.dispose()
    return event


def test_too_few_signed_cases_are_inconclusive_and_activate_refuses_unless_forced(site: Path) -> None:
    """Four signed images, five needed: compare says inconclusive, activate refuses and says both numbers."""
    site.write_text(site.read_text().replace("promotion_min_cases = 4", "promotion_min_cases = 5"))
    code, out = run("model", "compare", "v2", "--json")
    assert code == 0, out
    gate = json.loads(out)["gate"]
    assert (gate["verdict"], gate["judged"], gate["regressions"]) == ("inconclusive", [], [])
    assert f"{DR.value} 4 (2 present)" in gate["shortfall"] and "at least 5 signed images" in gate["shortfall"]
    code, out = run("model", "compare", "v2")
    assert code == 0 and "inconclusive: 4 signed studies" in out and "not worse" not in out, out

    code, out = run("model", "activate", "v2")
    assert code != 0
    assert "cannot judge v2" in out and "4 signed studies" in out and "at least 5 signed images" in out, out
    assert "--force" in out
    assert ModelRegistry(load_settings(site).model.registry).active().version == "v1"

    code, out = run("model", "activate", "v2", "--force")
    assert code == 0 and "forced past the promotion gate: inconclusive" in out, out
    event = _forced_to_v2(site)
    assert event.detail["verdict"] == "inconclusive" and event.detail["min_cases"] == 5
    assert event.detail["previous"] == "v1" and "4 signed studies" in event.detail["reasons"][0]


def test_gate_margin_and_min_cases_are_validated(tmp_path: Path) -> None:
    for bad in ("promotion_margin = -0.1", "promotion_margin = 0.9", "promotion_min_cases = 0",
                "operating_threshold = 1.0"):
        config = tmp_path / "bad.toml"
        config.write_text(f'home = "{tmp_path}"\n[model]\n{bad}\n')
        with pytest.raises(ConfigError):
            load_settings(config)


def test_compare_and_gate_never_import_torch(site: Path) -> None:
    """The CLI process that compares (and the activate gate) imports training.metrics, never torch."""
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom worker.cli.app import app\n"
            "for args in (['model', 'compare', 'v2', '--json'], ['model', 'activate', 'v2']):\n"
            "    CliRunner().invoke(app, args)\n"
            "print(sorted(m for m in ('torch', 'training.metrics') if m in sys.modules))\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['training.metrics']"
