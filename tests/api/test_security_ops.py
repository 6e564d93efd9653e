"""Authentication, tokens kept out of logs, CORS, request size limit, health, readiness, metrics, and the API
process never importing torch."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.api.api_fixtures import SPECS
from tests.api.conftest import ADMIN_TOKEN, READ_TOKEN, Deployment, settings_for
from worker.api import create_app
from worker.api.auth import principal_for, token_digest

pytestmark = pytest.mark.xdist_group("api")

READ = {"Authorization": f"Bearer {READ_TOKEN}"}


@pytest.mark.parametrize("path", ["/api/worklist", "/api/studies/{uid}", "/fhir/r4/Observation", "/ui/"])
def test_no_token_is_refused(deployment: Deployment, path: str) -> None:
    path = path.format(uid=SPECS[0].uid)
    response = httpx.get(deployment.base_url + path, follow_redirects=False)
    if path == "/ui/":
        assert response.status_code == 303 and response.headers["location"].startswith("/ui/login")
    else:
        assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.get(deployment.base_url + path, headers={"Authorization": "Bearer not-a-token"},
                      follow_redirects=False)
    assert wrong.status_code in {401, 303}


def test_public_endpoints(deployment: Deployment) -> None:
    assert httpx.get(f"{deployment.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{deployment.base_url}/readyz", params={"scope": "api"})
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}
    pipeline = httpx.get(f"{deployment.base_url}/readyz")  # no worker runs in this deployment
    assert pipeline.status_code == 503 and pipeline.json() == {
        "status": "not ready", "database": "ok", "broker": "ok",
        "inference_workers": "no inference worker is running (no heartbeat)",
        "delivery_workers": "no delivery worker is running (no heartbeat)", "storage": "ok",
        # informational (issue 17): the populated model version has no evaluation distribution to compare with
        "model_drift": "not checked: no evaluation distribution (score_histograms) for RetinalGPT 7b-v1.2"}
    assert httpx.get(f"{deployment.fhir}/metadata").status_code == 200
    schema = httpx.get(f"{deployment.base_url}/openapi.json").json()
    assert "/api/studies/{study_instance_uid}/chat" in schema["paths"] and "/fhir/r4/DiagnosticReport" in schema["paths"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/api/worklist"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_tokens_are_never_logged(deployment: Deployment, caplog: pytest.LogCaptureFixture,
                                 capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "Bearer wrong-token-Kd93nLq"
    with httpx.Client(base_url=deployment.base_url, timeout=60) as http:
        http.get("/api/worklist", headers=READ)
        http.get("/api/worklist", headers={"Authorization": bad})
        http.post(f"/api/studies/{SPECS[2].uid}/chat", json={"question": "Any glaucoma?"}, headers=READ)
        http.post(f"/api/studies/{SPECS[2].uid}/rerun", headers=READ)
        http.post("/ui/login", content=f"token={READ_TOKEN}&next=/ui/",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        http.get("/metrics")
    out, err = capfd.readouterr()
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]  # not the test client
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args}" for r in server_side) + out + err
    assert "GET /api/worklist" in logged  # the access log was captured
    for secret in (READ_TOKEN, ADMIN_TOKEN, "wrong-token-Kd93nLq", token_digest(READ_TOKEN)):
        assert secret not in logged
    with deployment.db.session() as session:
        from worker.db import AuditEvent

        details = " ".join(str(e.detail) + e.actor for e in session.query(AuditEvent))
    assert READ_TOKEN not in details and ADMIN_TOKEN not in details


def test_review_login_cookie_and_csrf_guard(deployment: Deployment) -> None:
    with httpx.Client(base_url=deployment.base_url, timeout=30) as http:
        rejected = http.post("/ui/login", data={"token": "nope", "next": "/ui/"})
        assert rejected.status_code == 401 and "retinalgpt_session" not in http.cookies
        login = http.post("/ui/login", data={"token": READ_TOKEN, "next": "https://evil.example/"})
        assert login.status_code == 303 and login.headers["location"] == "/ui/"  # no open redirect
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        page = http.get("/ui/")
        assert page.status_code == 200 and "Content-Security-Policy" in page.headers
        url = f"/api/studies/{SPECS[0].uid}/chat"
        assert http.post(url, json={"question": "x"}).status_code == 403  # cookie without X-Requested-With
        marked = http.post(url, json={"question": "x"}, headers={"X-Requested-With": "retinalgpt-review"})
        assert marked.status_code == 200
        assert 'id="rerun"' not in http.get(f"/ui/studies/{SPECS[0].uid}").text  # read role: no rerun button
    with httpx.Client(base_url=deployment.base_url, timeout=30) as http:
        http.post("/ui/login", data={"token": ADMIN_TOKEN, "next": f"/ui/studies/{SPECS[0].uid}"})
        assert 'id="rerun"' in http.get(f"/ui/studies/{SPECS[0].uid}").text


def test_cors_and_request_size_limit(deployment: Deployment) -> None:
    preflight = httpx.options(f"{deployment.base_url}/api/worklist", headers={
        "Origin": "https://ehr.example.org", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.headers["access-control-allow-origin"] == "https://ehr.example.org"
    other = httpx.get(f"{deployment.base_url}/api/worklist", headers={**READ, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    big = {"question": "x" * 1000, "history": [{"role": "user", "content": "y" * 3000}] * 2}
    too_large = httpx.post(f"{deployment.base_url}/api/studies/{SPECS[0].uid}/chat", json=big, headers=READ)
    assert too_large.status_code == 413
    fhir = httpx.post(f"{deployment.fhir}/Observation", content=b"{" * 5000, headers=READ)
    assert fhir.status_code == 413 and fhir.json()["resourceType"] == "OperationOutcome"
    chunked = httpx.post(f"{deployment.base_url}/api/studies/{SPECS[0].uid}/chat",  # no Content-Length
                         content=iter([b'{"question": "' + b"x" * 3000, b"y" * 3000 + b'"}']),
                         headers={**READ, "Content-Type": "application/json"})
    assert chunked.status_code == 413


def test_metrics(deployment: Deployment) -> None:
    text = httpx.get(f"{deployment.base_url}/metrics").text
    assert 'retinalgpt_instances_received_total{calling_ae="CAMERA1"}' in text
    assert 'retinalgpt_studies{state="receiving"} 1.0' in text
    assert 'retinalgpt_queue_depth{queue="inference"}' in text and "retinalgpt_broker_up 1.0" in text
    assert "# TYPE retinalgpt_job_duration_seconds histogram" in text
    assert "# TYPE retinalgpt_delivery_duration_seconds histogram" in text
    assert "retinalgpt_api_requests_total" in text


def test_metrics_figures_from_jobs_and_deliveries(tmp_path: Path) -> None:
    import datetime as dt

    from worker.db import (
        AuditEvent,
        Database,
        Delivery,
        DeliveryObject,
        DeliveryState,
        FailureReason,
        Job,
        JobKind,
        JobState,
        Study,
    )
    from worker.db.migrate import upgrade

    settings = settings_for(tmp_path)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with db.session() as session:
        study = Study(study_instance_uid="1.2.3.4")
        session.add(study)
        session.flush()
        for n, (seconds, state) in enumerate([(3, JobState.SUCCEEDED), (40, JobState.SUCCEEDED), (1, JobState.DEAD)]):
            session.add(Job(study_id=study.id, revision=n + 1, kind=JobKind.ANALYSIS, state=state,
                            started_at=start, finished_at=start + dt.timedelta(seconds=seconds),
                            failure=FailureReason.NO_ANALYSABLE_IMAGE if state == JobState.DEAD else None))
        session.add_all([AuditEvent(actor="CAMERA1@127.0.0.1", action="instance.uid_conflict", detail={}),
                         AuditEvent(actor="CAMERA1@127.0.0.1", action="instance.rejected", detail={}),
                         AuditEvent(actor="CAMERA1@127.0.0.1", action="instance.uid_conflict", detail={})])
        session.add(Delivery(study_id=study.id, revision=1, destination="pacs", object_kind=DeliveryObject.SR,
                             state=DeliveryState.DELIVERED, created_at=start, delivered_at=start + dt.timedelta(seconds=7)))
        session.add(Delivery(study_id=study.id, revision=1, destination="ehr", object_kind=DeliveryObject.FHIR,
                             state=DeliveryState.DEAD, failure=FailureReason.ATTEMPTS_EXHAUSTED))
    with TestClient(create_app(settings, db=db)) as http:
        text = http.get("/metrics").text
    assert 'retinalgpt_job_duration_seconds_bucket{kind="analysis",le="5"} 2.0' in text
    assert 'retinalgpt_job_duration_seconds_bucket{kind="analysis",le="60"} 3.0' in text
    assert 'retinalgpt_job_duration_seconds_count{kind="analysis"} 3.0' in text
    total = re.search(r'retinalgpt_job_duration_seconds_sum\{kind="analysis"\} (\S+)', text)
    assert total is not None and float(total.group(1)) == pytest.approx(44.0, abs=1e-3)
    assert 'retinalgpt_delivery_duration_seconds_bucket{destination="pacs",le="10"} 1.0' in text
    assert 'retinalgpt_job_failures_total{kind="analysis"} 1.0' in text
    assert 'retinalgpt_delivery_failures_total{destination="ehr"} 1.0' in text
    assert 'retinalgpt_dead_jobs{kind="analysis",reason="no_analysable_image"} 1.0' in text
    assert 'retinalgpt_dead_deliveries{destination="ehr",reason="attempts_exhausted"} 1.0' in text
    assert 'retinalgpt_instances_refused_total{reason="uid_conflict"} 2.0' in text
    assert 'retinalgpt_instances_refused_total{reason="rejected"} 1.0' in text
    db.dispose()


def test_readiness_reports_a_missing_schema(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with TestClient(create_app(settings)) as http:
        ready = http.get("/readyz")
    assert ready.status_code == 503 and "retinalgpt db upgrade" in ready.json()["database"]


def test_principal_lookup_uses_digests() -> None:
    settings = settings_for(Path("/nonexistent"))
    assert principal_for(READ_TOKEN, settings.api.tokens).role == "read"
    assert principal_for(ADMIN_TOKEN, settings.api.tokens).role == "admin"
    assert principal_for(token_digest(READ_TOKEN), settings.api.tokens) is None


def test_api_process_never_imports_torch(tmp_path: Path) -> None:
    code = ("import sys\n"
            "from worker.config import load_settings\n"
            "import worker.cli.app\n"
            "from worker.api import create_app\n"
            f"app = create_app(load_settings(None, home={str(tmp_path)!r}))\n"
            "app.openapi()\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'model.engine') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
