"""Model monitoring (issue 17 item 4): per model version metrics derived from stored analyses, the drift check
against the evaluation distribution in ``/readyz`` and ``/metrics``, and the Grafana dashboard's metric names."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from model.schema import (
    Condition,
    Finding,
    ImageAnalysis,
    Laterality,
    ModelAnswer,
    ModelIdentity,
    Quality,
    QualityGrade,
    Referral,
    StudyAnalysis,
)
from tests.api.conftest import ADMIN_TOKEN, READ_TOKEN, sha
from tests.support.services import postgres_database
from training.evaluate import ImageOutcome, score_histograms
from worker.api import create_app
from worker.config import ConfigError, Settings, load_settings
from worker.db import Analysis, Database, Study, StudyState, WorkerHeartbeat
from worker.db.migrate import upgrade
from worker.monitoring import bin_counts, psi

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "retinalgpt-model-monitoring.json"

V1 = ModelIdentity(name="retinalgpt-site", version="v1", device_uid="2.25.1001")
V2 = ModelIdentity(name="retinalgpt-site", version="v2", device_uid="2.25.1002")
CONDITIONS = (Condition.DIABETIC_RETINOPATHY, Condition.GLAUCOMA)


def settings_for(home: Path, **monitoring: Any) -> Settings:
    return load_settings(None, home=home, model={"enabled": False}, storage={"min_free_gb": 0},
                         monitoring={"window_analyses": 200, "drift_min_samples": 50, **monitoring},
                         api={"tokens": [{"name": "reader", "sha256": sha(READ_TOKEN), "role": "read"},
                                         {"name": "operator", "sha256": sha(ADMIN_TOKEN), "role": "admin"}]})


def analysis(uid: str, model: ModelIdentity, probabilities: list[dict[Condition, float]], *,
             referral: Referral = Referral.NONE, ungradable: int = 0, unparsed: int = 0) -> StudyAnalysis:
    images = []
    for n, probs in enumerate(probabilities):
        grade = QualityGrade.REJECT if n < ungradable else QualityGrade.GRADABLE
        answers = [ModelAnswer(task="disease_grade", question="Grade?", answer="garbled" if n < unparsed else "ok",
                               parsed=n >= unparsed)]
        images.append(ImageAnalysis(
            sop_instance_uid=f"{uid}.{n + 1}", laterality=Laterality.RIGHT if n % 2 == 0 else Laterality.LEFT,
            quality=Quality(grade=grade, score=0.2 if grade == QualityGrade.REJECT else 0.9),
            findings=[Finding(condition=c, probability=p, grade=int(p >= 0.5)) for c, p in probs.items()],
            answers=answers))
    return StudyAnalysis(study_instance_uid=uid, model=model, images=images, referral=referral)


def store(db: Database, analyses: list[StudyAnalysis], *, created: dt.datetime | None = None,
          superseded: bool = False) -> None:
    with db.session() as session:
        for item in analyses:
            study = Study(study_instance_uid=item.study_instance_uid)
            session.add(study)
            session.flush()
            assert item.model is not None
            session.add(Analysis(study_id=study.id, revision=1, model_name=item.model.name,
                                 model_version=item.model.version, result=item.model_dump(mode="json"),
                                 superseded=superseded, **({"created_at": created} if created else {})))


def deployment(tmp_path: Path, url: str | None = None, **monitoring: Any) -> tuple[Settings, Database]:
    settings = settings_for(tmp_path, **monitoring)
    if url is not None:
        settings.database.url = url
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    with db.session() as session:  # a consuming worker, so that readiness depends on the drift setting alone
        session.add(WorkerHeartbeat(hostname="gpu-1", queues="inference,delivery", pid=1, processes=1,
                                    consuming=True))
    return settings, db


def write_reference(settings: Settings, model: ModelIdentity, scores: dict[str, np.ndarray]) -> Path:
    """An evaluation metrics.json in the registry's version directory, its histograms made by the same function
    ``retinalgpt evaluate`` uses."""
    n = len(next(iter(scores.values())))
    outcomes = [ImageOutcome(key=str(i), scores={task: float(s[i]) for task, s in scores.items()}) for i in range(n)]
    report = {"identity": model.model_dump(), "score_histograms": score_histograms({"test": ([None] * n, outcomes)})}
    path = settings.model.registry / "versions" / model.version / "evaluation" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(report))
    return path


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly ``labels`` (in any order) in the exposition ``text``."""
    for line in text.splitlines():
        found = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if found and dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or "")) == labels:
            return float(found.group(2))
    raise AssertionError(f"{name}{labels} not exposed")


def test_score_histograms_of_evaluation() -> None:
    outcomes = [ImageOutcome(key=str(i), scores={"glaucoma": p}) for i, p in enumerate([0.0, 0.05, 0.1, 0.55, 1.0])]
    outcomes.append(ImageOutcome(key="x", scores={"diabetic_retinopathy": 0.99}))
    record = score_histograms({"a": ([None] * 4, outcomes[:4]), "b": ([None] * 2, outcomes[4:])})
    assert record["edges"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert record["conditions"]["glaucoma"] == {"counts": [2, 1, 0, 0, 0, 1, 0, 0, 0, 1], "n": 5}
    assert record["conditions"]["diabetic_retinopathy"]["counts"][9] == 1
    assert "cataract" not in record["conditions"]


def test_psi_and_bins() -> None:
    edges = [0.0, 0.5, 1.0]
    assert bin_counts([0.0, 0.49, 0.5, 1.0], edges) == [2, 2]
    assert psi([50, 50], [50, 50]) == 0.0
    assert psi([50, 50], [90, 10]) == pytest.approx(0.4 * np.log(1.8) + (-0.4) * np.log(0.2))
    with pytest.raises(ValueError):
        psi([0, 0], [1, 1])


def test_monitoring_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drift_min_samples"):
        settings_for(tmp_path, window_analyses=20, drift_min_samples=50)
    with pytest.raises(ConfigError, match="window_days"):
        settings_for(tmp_path, window_days=0)
    with pytest.raises(ConfigError, match="drift_threshold"):
        settings_for(tmp_path, drift_threshold=-1)


def test_metrics_per_model_version_from_stored_analyses(tmp_path: Path) -> None:
    settings, db = deployment(tmp_path, window_days=7)
    dr, gl = Condition.DIABETIC_RETINOPATHY, Condition.GLAUCOMA
    store(db, [analysis("1.2.1", V1, [{dr: 0.05, gl: 0.3}, {dr: 0.95, gl: 0.35}], referral=Referral.URGENT),
               analysis("1.2.2", V1, [{dr: 0.15}, {dr: 0.5}], referral=Referral.NONE, unparsed=1),
               analysis("1.2.3", V1, [{dr: 0.45}, {dr: 0.62}], referral=Referral.UNGRADABLE, ungradable=2),
               analysis("1.2.4", V2, [{dr: 0.8}], referral=Referral.ROUTINE)])
    # outside the window: superseded (the study was re-read), or older than window_days
    store(db, [analysis("1.2.5", V1, [{dr: 0.99}])], superseded=True)
    store(db, [analysis("1.2.6", V1, [{dr: 0.99}])], created=dt.datetime.now(dt.UTC) - dt.timedelta(days=8))
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
        again = http.get("/metrics").text  # from the per-process summary cache: the same figures
    v1 = {"model": "retinalgpt-site", "version": "v1"}
    v2 = {"model": "retinalgpt-site", "version": "v2"}
    assert "# TYPE retinalgpt_model_finding_probability histogram" in text
    assert metric(text, "retinalgpt_model_window_analyses", **v1) == 3
    assert metric(text, "retinalgpt_model_window_analyses", **v2) == 1
    assert metric(text, "retinalgpt_model_window_images", **v1) == 6
    bucket = "retinalgpt_model_finding_probability_bucket"
    dr1 = {**v1, "condition": "diabetic_retinopathy"}
    assert metric(text, bucket, **dr1, le="0.1") == 1
    assert metric(text, bucket, **dr1, le="0.5") == 4
    assert metric(text, bucket, **dr1, le="0.7") == 5
    assert metric(text, bucket, **dr1, le="+Inf") == 6
    assert metric(text, "retinalgpt_model_finding_probability_count", **dr1) == 6
    assert metric(text, "retinalgpt_model_finding_probability_sum", **dr1) == pytest.approx(2.72)
    assert metric(text, bucket, **v1, condition="glaucoma", le="0.3") == 1
    assert metric(text, bucket, **v1, condition="glaucoma", le="0.4") == 2
    assert metric(text, bucket, **v2, condition="diabetic_retinopathy", le="0.7") == 0
    assert metric(text, bucket, **v2, condition="diabetic_retinopathy", le="0.8") == 1
    assert metric(text, "retinalgpt_model_ungradable_ratio", **v1) == pytest.approx(2 / 6)
    assert metric(text, "retinalgpt_model_ungradable_ratio", **v2) == 0
    for referral, share in (("urgent", 1 / 3), ("none", 1 / 3), ("ungradable", 1 / 3), ("routine", 0)):
        assert metric(text, "retinalgpt_model_referral_ratio", **v1, referral=referral) == pytest.approx(share)
    assert metric(text, "retinalgpt_model_referral_ratio", **v2, referral="routine") == 1
    assert metric(text, "retinalgpt_model_parse_failures", **v1, task="disease_grade") == 1
    assert metric(text, "retinalgpt_model_parse_failure_ratio", **v1) == pytest.approx(1 / 6)
    assert metric(text, "retinalgpt_model_drift_reference", **v1) == 0  # no evaluation distribution recorded
    assert [line for line in again.splitlines() if line.startswith("retinalgpt_model_")] == \
           [line for line in text.splitlines() if line.startswith("retinalgpt_model_")]
    db.dispose()


def stream(rng: np.random.Generator, model: ModelIdentity, n: int, shift: float, prefix: str) -> list[StudyAnalysis]:
    """``n`` studies of two images; DR probabilities from Beta(2, 5) (+ ``shift``), glaucoma from Beta(1, 6)."""
    out = []
    for i in range(n):
        images = [{Condition.DIABETIC_RETINOPATHY: float(np.clip(rng.beta(2, 5) + shift, 0, 1)),
                   Condition.GLAUCOMA: float(rng.beta(1, 6))} for _ in range(2)]
        out.append(analysis(f"{prefix}.{i + 1}", model, images))
    return out


@pytest.mark.parametrize(("shift", "drifted"), [(0.0, False), (0.3, True)])
def test_drift_flag_from_stored_stream(tmp_path: Path, shift: float, drifted: bool) -> None:
    rng = np.random.default_rng(17)
    settings, db = deployment(tmp_path)
    write_reference(settings, V1, {"diabetic_retinopathy": rng.beta(2, 5, 2000), "glaucoma": rng.beta(1, 6, 2000),
                                   "cataract": rng.beta(1, 9, 2000)})
    store(db, stream(rng, V1, 150, shift, "1.3"))
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
        ready = http.get("/readyz")
    key = {"model": "retinalgpt-site", "version": "v1"}
    dr = metric(text, "retinalgpt_model_drift_psi", **key, condition="diabetic_retinopathy")
    glaucoma = metric(text, "retinalgpt_model_drift_psi", **key, condition="glaucoma")
    assert metric(text, "retinalgpt_model_drift_reference", **key) == 1
    assert metric(text, "retinalgpt_model_drift_samples", **key, condition="diabetic_retinopathy") == 300
    assert metric(text, "retinalgpt_model_drift_threshold") == 0.25
    assert glaucoma < 0.1 and metric(text, "retinalgpt_model_drift", **key, condition="glaucoma") == 0
    assert 'condition="cataract"' not in text  # no production probabilities: nothing to judge
    assert (dr > 0.25) is drifted and (dr < 0.1) is not drifted
    assert metric(text, "retinalgpt_model_drift", **key, condition="diabetic_retinopathy") == int(drifted)
    detail = ready.json()
    assert ready.status_code == 200 and detail["status"] == "ready", detail  # informational by default
    if drifted:
        assert detail["model_drift"].startswith("drift: retinalgpt-site v1 diabetic_retinopathy PSI")
        assert "glaucoma" not in detail["model_drift"]
    else:
        assert detail["model_drift"] == "ok"
    db.dispose()


def test_drift_fails_readiness_only_when_configured(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    settings, db = deployment(tmp_path, drift_fails_readiness=True)
    write_reference(settings, V1, {"diabetic_retinopathy": rng.beta(2, 5, 1000)})
    store(db, stream(rng, V1, 60, 0.4, "1.4"))
    with TestClient(create_app(settings, db=db)) as http:
        ready = http.get("/readyz")
        api_scope = http.get("/readyz", params={"scope": "api"})
    assert ready.status_code == 503 and ready.json()["model_drift"].startswith("drift:")
    assert api_scope.status_code == 200 and "model_drift" not in api_scope.json()
    db.dispose()


def test_too_few_samples_are_not_judged(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    settings, db = deployment(tmp_path, drift_min_samples=100)
    write_reference(settings, V1, {"diabetic_retinopathy": rng.beta(2, 5, 1000)})
    store(db, stream(rng, V1, 20, 0.5, "1.5"))  # 40 images, heavily shifted, but below the minimum
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
        ready = http.get("/readyz").json()
    assert "retinalgpt_model_drift_psi{" not in text
    assert ready["model_drift"] == "not checked: too few recent analyses"
    db.dispose()


def sign_one(settings: Settings, db: Database, uid: str) -> None:
    """A clinician confirms the study's first revision (worker.signoff.sign)."""
    from worker.config import ApiToken
    from worker.signoff import SignOffRequest, sign

    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.state = StudyState.ANALYSED
    token = ApiToken(name="dr-smith", sha256="0" * 64, role="clinician", observer_name="Smith^Jane",
                     organisation="Eye Clinic")
    with db.session() as session:
        sign(session, settings, uid, SignOffRequest(revision=1, decision="confirm"), token, "api:dr-smith")


def test_dashboard_metric_names_exist_in_the_exposition(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    settings, db = deployment(tmp_path)
    write_reference(settings, V1, {"diabetic_retinopathy": rng.beta(2, 5, 500), "glaucoma": rng.beta(1, 6, 500)})
    store(db, stream(rng, V1, 30, 0.0, "1.6"))
    store(db, [analysis("1.6.99", V1, [{Condition.GLAUCOMA: 0.5}], unparsed=1, ungradable=1)])
    sign_one(settings, db, "1.6.99")  # the clinician agreement metrics need a sign-off
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert expressions, "the dashboard has no queries"
    names = {n for expr in expressions for n in re.findall(r"\bretinalgpt_[a-z0-9_]+", expr)}
    assert names and names <= exposed, f"not exposed: {sorted(names - exposed)}"
    model_names = {n for n in exposed if n.startswith("retinalgpt_model_")}
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    assert {re.sub(r"_(bucket|count|sum)$", "", n) for n in model_names} <= families, "a model metric has no panel"
    assert all(isinstance(p.get("title"), str) and p.get("datasource") for p in dashboard["panels"])
    db.dispose()


@pytest.mark.postgres
def test_window_and_drift_on_postgres(tmp_path: Path) -> None:
    """The window query (row_number per model version, created_at range) and the drift check on PostgreSQL."""
    rng = np.random.default_rng(8)
    with postgres_database("monitoring") as url:
        settings, db = deployment(tmp_path, url, window_analyses=60)
        write_reference(settings, V1, {"diabetic_retinopathy": rng.beta(2, 5, 1000)})
        write_reference(settings, V2, {"diabetic_retinopathy": rng.beta(2, 5, 1000)})
        store(db, stream(rng, V1, 80, 0.0, "1.7"))  # 80 stored, the window keeps the newest 60
        store(db, stream(rng, V2, 60, 0.35, "1.8"))
        store(db, stream(rng, V2, 5, 0.0, "1.9"), created=dt.datetime.now(dt.UTC) - dt.timedelta(days=40))
        sign_one(settings, db, "1.7.80")  # the agreement window query (row_number over a join) on PostgreSQL
        try:
            with TestClient(create_app(settings, db=db)) as http:
                text = http.get("/metrics").text
                ready = http.get("/readyz").json()
        finally:
            db.dispose()
    v1 = {"model": "retinalgpt-site", "version": "v1"}
    v2 = {"model": "retinalgpt-site", "version": "v2"}
    assert metric(text, "retinalgpt_model_window_analyses", **v1) == 60
    assert metric(text, "retinalgpt_model_window_analyses", **v2) == 60
    assert metric(text, "retinalgpt_model_finding_probability_count", **v1, condition="diabetic_retinopathy") == 120
    assert metric(text, "retinalgpt_model_drift", **v1, condition="diabetic_retinopathy") == 0
    assert metric(text, "retinalgpt_model_drift", **v2, condition="diabetic_retinopathy") == 1
    assert metric(text, "retinalgpt_model_window_signoffs", **v1) == 1
    assert metric(text, "retinalgpt_model_agreement_ratio", **v1, condition="diabetic_retinopathy") == 1
    assert ready["model_drift"].startswith("drift: retinalgpt-site v2 diabetic_retinopathy")


def test_window_slides_and_replicas_agree(tmp_path: Path) -> None:
    """Analyses stored (by another process) after a scrape are counted at the next one, those pushed out of the
    window or superseded meanwhile are not, and a second API replica reports the same figures."""
    from sqlalchemy import update

    settings, db = deployment(tmp_path, window_analyses=10, drift_min_samples=10)
    dr = Condition.DIABETIC_RETINOPATHY
    store(db, [analysis(f"1.10.{i}", V1, [{dr: 0.05}]) for i in range(10)])
    key = {"model": "retinalgpt-site", "version": "v1", "condition": "diabetic_retinopathy"}
    with TestClient(create_app(settings, db=db)) as first, TestClient(create_app(settings, db=db)) as second:
        before = first.get("/metrics").text
        assert metric(before, "retinalgpt_model_finding_probability_bucket", **key, le="0.1") == 10
        store(db, [analysis(f"1.11.{i}", V1, [{dr: 0.95}]) for i in range(4)])
        with db.session() as session:  # a re-read study: its analysis is superseded
            newest = session.query(Analysis).order_by(Analysis.id.desc()).first()
            assert newest is not None
            session.execute(update(Analysis).where(Analysis.id == newest.id).values(superseded=True))
        after, other = first.get("/metrics").text, second.get("/metrics").text
    assert metric(after, "retinalgpt_model_window_analyses", model="retinalgpt-site", version="v1") == 10
    assert metric(after, "retinalgpt_model_finding_probability_bucket", **key, le="0.1") == 7
    assert metric(after, "retinalgpt_model_finding_probability_bucket", **key, le="+Inf") == 10
    assert [line for line in after.splitlines() if line.startswith("retinalgpt_model_")] == \
           [line for line in other.splitlines() if line.startswith("retinalgpt_model_")]
    db.dispose()


def test_monitoring_can_be_turned_off(tmp_path: Path) -> None:
    settings, db = deployment(tmp_path, enabled=False)
    store(db, [analysis("1.12.1", V1, [{Condition.GLAUCOMA: 0.5}])])
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
        ready = http.get("/readyz").json()
    assert "retinalgpt_model_" not in text and "retinalgpt_studies" in text
    assert "model_drift" not in ready
    db.dispose()


def test_a_signed_revision_counts_as_the_model_answer_not_the_clinicians(tmp_path: Path) -> None:
    """A clinician's sign-off stores the next revision with the clinician's values under the same model identity
    (worker/signoff.py); the monitoring window counts the AI's analysis of the signed revision, never those."""
    from worker.config import ApiToken
    from worker.signoff import SignOffRequest, sign

    settings, db = deployment(tmp_path, window_days=7)
    dr = Condition.DIABETIC_RETINOPATHY
    store(db, [analysis("1.2.7", V1, [{dr: 0.9}], referral=Referral.URGENT)])
    with db.session() as session:
        study = session.scalars(select(Study)).one()
        study.state = StudyState.ANALYSED
    token = ApiToken(name="dr-smith", sha256="0" * 64, role="clinician", observer_name="Smith^Jane",
                     organisation="Eye Clinic")
    with db.session() as session:
        sign(session, settings, "1.2.7", SignOffRequest(revision=1, decision="correct", referral="none", grades=[
            {"eye": "R", "condition": "diabetic_retinopathy", "grade": 0}]), token, "api:dr-smith")
    with db.session() as session:
        assert len(session.scalars(select(Analysis)).all()) == 2  # the AI's and the clinician's
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
    v1 = {"model": "retinalgpt-site", "version": "v1"}
    assert metric(text, "retinalgpt_model_window_analyses", **v1) == 1
    assert metric(text, "retinalgpt_model_referral_ratio", **v1, referral="urgent") == 1  # the AI's referral
    assert metric(text, "retinalgpt_model_finding_probability_count", **v1, condition="diabetic_retinopathy") == 1
    db.dispose()


def graded(uid: str, model: ModelIdentity, images: list[dict[Condition, int]]) -> StudyAnalysis:
    """An analysis whose images alternate right, left eye, each finding with the given grade."""
    return StudyAnalysis(study_instance_uid=uid, model=model, referral=Referral.NONE, images=[
        ImageAnalysis(sop_instance_uid=f"{uid}.{n + 1}", laterality=Laterality.LEFT if n % 2 else Laterality.RIGHT,
                      quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                      findings=[Finding(condition=c, grade=g, probability=0.9 if g else 0.1)
                                for c, g in grades.items()])
        for n, grades in enumerate(images)])


def test_monitoring_agreement_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agreement_window_signoffs"):
        settings_for(tmp_path, agreement_window_signoffs=0)
    with pytest.raises(ConfigError, match="agreement_window_days"):
        settings_for(tmp_path, agreement_window_days=0)
    assert settings_for(tmp_path, agreement_window_signoffs=7).monitoring.agreement_window_signoffs == 7


def test_clinician_agreement_per_model_version_and_its_window_slides(tmp_path: Path) -> None:
    """Real sign-offs (worker.signoff.sign): per condition, the share of signed images whose present/absent call
    (and grade where graded) the clinician left as the AI's; the confirm-without-change rate; a re-sign and an old
    sign-off left out; a new sign-off pushes the oldest out of the window."""
    from worker.config import ApiToken
    from worker.signoff import SignOffRequest, sign

    settings, db = deployment(tmp_path, agreement_window_signoffs=3)
    dr, gl = Condition.DIABETIC_RETINOPATHY, Condition.GLAUCOMA
    store(db, [graded("1.20.1", V1, [{dr: 2, gl: 0}, {dr: 0, gl: 1}]),
               graded("1.20.2", V1, [{dr: 1, gl: 0}, {dr: 0, gl: 0}]),
               graded("1.20.3", V1, [{dr: 0}]),
               graded("1.20.4", V2, [{dr: 2}]),
               graded("1.20.5", V1, [{dr: 0}]),
               graded("1.20.6", V1, [{dr: 4}])])
    with db.session() as session:
        for study in session.scalars(select(Study)):
            study.state = StudyState.ANALYSED
    smith = ApiToken(name="dr-smith", sha256="0" * 64, role="clinician", observer_name="Smith^Jane",
                     organisation="Eye Clinic")
    now = dt.datetime.now(dt.UTC)

    def signs(uid: str, minutes: float, revision: int = 1, **body: Any) -> None:
        request = SignOffRequest(revision=revision, **{"decision": "correct", **body})
        with db.session() as session:
            sign(session, settings, uid, request, smith, "api:dr-smith", now=now + dt.timedelta(minutes=minutes))

    signs("1.20.6", -100 * 24 * 60, decision="confirm")  # older than agreement_window_days (90): not counted
    signs("1.20.1", 1, decision="confirm")  # DR 2/2, glaucoma 2/2
    signs("1.20.2", 2, grades=[{"eye": "R", "condition": "diabetic_retinopathy", "grade": 3},  # same call, other grade
                               {"eye": "L", "condition": "glaucoma", "grade": 1}])  # absent → present
    signs("1.20.3", 3, referral="urgent",  # DR agrees; glaucoma only the clinician called
          grades=[{"eye": "R", "condition": "glaucoma", "grade": 0}])
    signs("1.20.4", 4, decision="confirm")
    signs("1.20.1", 5, revision=2, referral="routine")  # a re-sign: clinician against clinician, left out
    v1 = {"model": "retinalgpt-site", "version": "v1"}
    v2 = {"model": "retinalgpt-site", "version": "v2"}
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
        assert metric(text, "retinalgpt_model_window_signoffs", **v1) == 3
        assert metric(text, "retinalgpt_model_confirm_ratio", **v1) == pytest.approx(1 / 3)
        assert metric(text, "retinalgpt_model_agreement_images", **v1, condition="diabetic_retinopathy") == 5
        assert metric(text, "retinalgpt_model_agreement_ratio", **v1, condition="diabetic_retinopathy") == \
               pytest.approx(4 / 5)
        assert metric(text, "retinalgpt_model_agreement_images", **v1, condition="glaucoma") == 5
        assert metric(text, "retinalgpt_model_agreement_ratio", **v1, condition="glaucoma") == pytest.approx(3 / 5)
        assert metric(text, "retinalgpt_model_window_signoffs", **v2) == 1
        assert metric(text, "retinalgpt_model_confirm_ratio", **v2) == 1
        assert metric(text, "retinalgpt_model_agreement_ratio", **v2, condition="diabetic_retinopathy") == 1
        signs("1.20.5", 6, grades=[{"eye": "R", "condition": "diabetic_retinopathy", "grade": 2}])  # absent → present
        after = http.get("/metrics").text  # the window keeps 3 sign-offs: 1.20.1's goes
    assert metric(after, "retinalgpt_model_window_signoffs", **v1) == 3
    assert metric(after, "retinalgpt_model_confirm_ratio", **v1) == 0
    assert metric(after, "retinalgpt_model_agreement_images", **v1, condition="diabetic_retinopathy") == 4
    assert metric(after, "retinalgpt_model_agreement_ratio", **v1, condition="diabetic_retinopathy") == \
           pytest.approx(2 / 4)
    assert metric(after, "retinalgpt_model_agreement_images", **v1, condition="glaucoma") == 3
    assert metric(after, "retinalgpt_model_agreement_ratio", **v1, condition="glaucoma") == pytest.approx(1 / 3)
    db.dispose()
