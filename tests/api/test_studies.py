"""Worklist filters, sorting and paging; study detail; rendered images; chat through a real Celery worker with
the audit trail; admin rerun through the pipeline."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.api_fixtures import SPECS, populate
from tests.api.conftest import ADMIN_TOKEN, READ_TOKEN, Deployment, running_worker, settings_for
from worker.api import create_app
from worker.celery_app import make_celery
from worker.db import AuditEvent, Database, Job, JobKind, Study, StudyState
from worker.db.migrate import upgrade
from worker.pipeline.tasks import register_tasks

pytestmark = pytest.mark.xdist_group("api")

READ = {"Authorization": f"Bearer {READ_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STABLE = [s for s in SPECS if s.patient_id != "P-006"]  # P-006 is re-run below


def worklist(deployment: Deployment, **params: Any) -> dict[str, Any]:
    response = httpx.get(f"{deployment.base_url}/api/worklist", params=params, headers=READ, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def patients(page: dict[str, Any]) -> list[str]:
    return [item["patient_id"] for item in page["items"] if item["patient_id"] != "P-006"]


def test_worklist_sorted_by_urgency_by_default(deployment: Deployment) -> None:
    page = worklist(deployment)
    assert page["total"] == len(SPECS)
    assert patients(page)[:2] == ["P-001", "P-004"]  # urgent, then ungradable
    assert patients(page)[-1] == "P-005"  # pending: no result yet
    first = page["items"][0]
    assert first["referral"] == "urgent" and first["calling_ae_titles"] == ["CAMERA1"]
    assert first["laterality"] == ["L", "R"] and first["instances"] == 2 and first["study_date"] == "2026-01-05"


@pytest.mark.parametrize(("params", "expected"), [
    ({"urgency": "urgent"}, {"P-001"}),
    ({"urgency": ["routine", "none"]}, {"P-002", "P-003"}),
    ({"urgency": "pending"}, {"P-005"}),
    ({"state": "analysed"}, {"P-002"}),
    ({"calling_ae": "CAMERA2"}, {"P-002", "P-004"}),
    ({"laterality": "L"}, {"P-001", "P-003", "P-004"}),
    ({"laterality": "R", "calling_ae": "CAMERA1"}, {"P-001", "P-005"}),
    ({"date_from": "2026-02-10", "date_to": "2026-03-01"}, {"P-002", "P-003"}),
    ({"patient_id": "P-003"}, {"P-003"}),
])
def test_worklist_filters(deployment: Deployment, params: dict[str, Any], expected: set[str]) -> None:
    assert set(patients(worklist(deployment, **params))) == expected


def test_worklist_sorting_and_paging(deployment: Deployment) -> None:
    by_date = patients(worklist(deployment, sort="-study_date"))
    assert by_date == [s.patient_id for s in sorted(STABLE, key=lambda s: s.date, reverse=True)]
    seen: list[str] = []
    page = worklist(deployment, limit=2, sort="study_date")
    while True:
        seen += [item["patient_id"] for item in page["items"]]
        if page["next"] is None:
            break
        assert page["next"].startswith(deployment.base_url) and "sort=study_date" in page["next"]
        page = httpx.get(page["next"], headers=READ).json()
        assert page["previous"] is not None
    assert seen == [s.patient_id for s in sorted(SPECS, key=lambda s: s.date)]
    bad = httpx.get(f"{deployment.base_url}/api/worklist", params={"sort": "colour"}, headers=READ)
    assert bad.status_code == 422


def test_study_detail_and_image(deployment: Deployment) -> None:
    spec = SPECS[0]
    detail = httpx.get(f"{deployment.base_url}/api/studies/{spec.uid}", headers=READ).json()
    assert detail["referral"] == "urgent" and detail["analysis"]["study_instance_uid"] == spec.uid
    assert detail["fhir_diagnostic_report"].startswith(f"{deployment.base_url}/fhir/r4/DiagnosticReport/")
    rows = next(iter(detail["measurements"].values()))
    cdr = next(r for r in rows if r["key"] == "CDR_vertical")
    assert cdr["reference"] == "0–0.6" and cdr["flag"] in {"normal", "high"}
    instance = detail["series"][0]["instances"][0]
    png = httpx.get(instance["image_url"], params={"size": 128}, headers=READ)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (128, 128) and image.mode == "RGB"
    missing = httpx.get(f"{deployment.base_url}/api/studies/{spec.uid}/instances/1.2.3/image.png", headers=READ)
    assert missing.status_code == 404
    assert httpx.get(f"{deployment.base_url}/api/studies/1.2.3", headers=READ).status_code == 404


def test_chat_answers_through_the_inference_queue_and_is_audited(deployment: Deployment) -> None:
    spec = SPECS[1]
    url = f"{deployment.base_url}/api/studies/{spec.uid}/chat"
    history = [{"role": "user", "content": "Grade?"}, {"role": "assistant", "content": "Mild NPDR."}]
    response = httpx.post(url, json={"question": "Does this need referral?", "history": history}, headers=READ,
                          timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["answer"].startswith("Referral routine: Diabetic retinopathy grade 1")
    assert "2 earlier turns" in answer["answer"] and answer["model"]["name"] == "RetinalGPT"
    with deployment.db.session() as session:
        event = session.query(AuditEvent).filter_by(action="chat", study_instance_uid=spec.uid).one()
        assert event.actor == "api:reader"
        # audit.chat_text = "hash" (default): a question may name the patient, so only digests and lengths
        question = "Does this need referral?"
        assert event.detail["question"] == {"sha256": hashlib.sha256(question.encode()).hexdigest(),
                                            "length": len(question)}
        assert event.detail["answer"]["sha256"] == hashlib.sha256(answer["answer"].encode()).hexdigest()
        assert question not in json.dumps(event.detail) and answer["answer"] not in json.dumps(event.detail)
    deployment.settings.audit.chat_text = "full"
    try:
        again = httpx.post(url, json={"question": "Full text, please?"}, headers=READ, timeout=60)
    finally:
        deployment.settings.audit.chat_text = "hash"
    assert again.status_code == 200, again.text
    with deployment.db.session() as session:
        events = session.query(AuditEvent).filter(AuditEvent.study_instance_uid == spec.uid,
                                                  AuditEvent.action.like("chat%")).order_by(AuditEvent.id).all()
        assert [e.action for e in events] == ["chat", "chat"]
        assert events[1].detail["question"] == "Full text, please?"
        assert events[1].detail["answer"] == again.json()["answer"]
    pending = httpx.post(f"{deployment.base_url}/api/studies/{SPECS[4].uid}/chat", json={"question": "?"}, headers=READ)
    assert pending.status_code == 409
    assert httpx.post(url, json={"question": ""}, headers=READ).status_code == 422
    assert httpx.post(url, json={"question": "x", "history": [{"role": "system", "content": "x"}]},
                      headers=READ).status_code == 422


def test_read_token_cannot_rerun_admin_can(deployment: Deployment) -> None:
    spec = next(s for s in SPECS if s.patient_id == "P-006")
    url = f"{deployment.base_url}/api/studies/{spec.uid}/rerun"
    assert httpx.post(url).status_code == 401
    denied = httpx.post(url, headers=READ)
    assert denied.status_code == 403
    with deployment.db.session() as session:
        assert session.query(Study).filter_by(study_instance_uid=spec.uid).one().revision == 1
    accepted = httpx.post(url, headers=ADMIN)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"study_instance_uid": spec.uid, "revision": 2, "state": "queued"}
    with deployment.db.session() as session:
        job = session.query(Job).join(Study).filter(Study.study_instance_uid == spec.uid).one()
        assert (job.kind, job.revision, job.celery_task_id is not None) == (JobKind.ANALYSIS, 2, True)
        audit = session.query(AuditEvent).filter_by(action="study.rerun", study_instance_uid=spec.uid).one()
        assert audit.actor == "api:operator"
        job_id = job.id
    deadline = time.monotonic() + 30
    while job_id not in deployment.processed_jobs and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_id in deployment.processed_jobs  # the worker received retinalgpt.process_study(job_id=…)
    page = worklist(deployment, patient_id="P-006")
    assert page["items"][0]["referral"] == "pending" and page["items"][0]["state"] == StudyState.QUEUED.value
    assert httpx.post(f"{deployment.base_url}/api/studies/{SPECS[4].uid}/rerun", headers=ADMIN).status_code == 409


def test_chat_with_the_pipeline_task_reports_a_worker_without_model(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    """The API against the real ``retinalgpt.answer_question`` of :mod:`worker.pipeline.tasks` (same task name
    and keyword arguments): a worker without a model answers with an error the API passes on as 502."""
    settings = settings_for(tmp_path)
    settings.analysis.vessel_method = "classical"
    settings.model.enabled = False
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    populate(db, settings.storage.path, retina_rgb, SPECS[:1])
    worker_app = make_celery(settings)
    register_tasks(worker_app, settings)
    with running_worker(worker_app), TestClient(create_app(settings, db=db)) as http:
        response = http.post(f"/api/studies/{SPECS[0].uid}/chat", json={"question": "Any DR?"}, headers=READ)
    assert response.status_code == 502
    assert "RetinalGPT is not available" in response.json()["detail"]
    with db.session() as session:
        event = session.query(AuditEvent).filter_by(action="chat", study_instance_uid=SPECS[0].uid).one()
        assert "RetinalGPT is not available" in event.detail["error"]
    db.dispose()


def test_chat_is_answered_by_the_default_model_grounded_in_the_study(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    """The whole chat path with a real model: API → Celery → ``answer_question`` → RetinalGPT (the bundled
    default model) with the study's stored results as context → API, audited."""
    settings = settings_for(tmp_path)
    settings.analysis.vessel_method = "classical"
    settings.model.enabled = True  # the API fixtures switch the model off; here the default model answers
    settings.api.chat_timeout_seconds = 120.0  # the first question loads torch, transformers and the model (≈ 20 s
    # on a loaded 2-core machine): the product default, not the fixtures' short one
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    populate(db, settings.storage.path, retina_rgb, SPECS[:1])
    worker_app = make_celery(settings)
    register_tasks(worker_app, settings)
    with running_worker(worker_app), TestClient(create_app(settings, db=db)) as http:
        response = http.post(f"/api/studies/{SPECS[0].uid}/chat",
                             json={"question": "What is the diabetic retinopathy grade?"}, headers=READ)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"].strip()
    assert body["model"]["device_uid"].startswith("2.25.")
    with db.session() as session:  # audited once, by the API (the inference task no longer audits too)
        events = session.query(AuditEvent).filter(AuditEvent.study_instance_uid == SPECS[0].uid,
                                                  AuditEvent.action.like("chat%")).all()
        assert [e.action for e in events] == ["chat"] and events[0].actor == "api:reader"
        assert events[0].detail["answer"]["sha256"] == hashlib.sha256(body["answer"].encode()).hexdigest()
    db.dispose()


@pytest.mark.parametrize("path", [
    "/api/studies/{uid}%0A", "/api/studies/{uid}%0A/instances/{sop}/image.png",
    "/api/studies/{uid}/instances/{sop}%0A/image.png", "/ui/studies/{uid}%0A", "/api/studies/1.02.3",
])
def test_uids_in_paths_are_validated_whole(deployment: Deployment, path: str) -> None:
    """A UID in a URL path goes through dicom_node.uids.require_uid (issue 19): a trailing newline is refused
    as invalid (422) instead of being looked up."""
    study = deployment.specs[0]
    sop = next(iter(deployment.analyses[study.uid].images)).sop_instance_uid
    url = deployment.base_url + path.format(uid=study.uid, sop=sop)
    response = httpx.get(url, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert response.status_code == 422, response.text
    assert "not a valid DICOM UID" in response.text
    chat = httpx.post(f"{deployment.base_url}/api/studies/{study.uid}%0A/chat", json={"question": "DR grade?"},
                      headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert chat.status_code == 422


@pytest.mark.parametrize("params", [{"offset": "99999999999999999999"}, {"limit": "99999999999999999999"},
                                    {"offset": "-1"}, {"limit": "0"}])
def test_worklist_paging_is_bounded(deployment: Deployment, params: dict[str, str]) -> None:
    response = httpx.get(f"{deployment.base_url}/api/worklist", params=params,
                         headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert response.status_code == 422, response.text
