"""No patient identifier in any log line or audit event of a full run (issue 19, item 4).

A camera (Orthanc) sends a study of a patient with distinctive identifiers to ``retinalgpt up`` (node, workers
and API, the embedded default); the results are delivered to the PACS, the EHR and a folder; the EHR then
searches the API by the patient's MRN (worklist and FHIR, one client careless enough to put its token in the
query string), and a clinician asks RetinalGPT a question that names the patient. Every line the product logged
and every audit event are then searched for the patient's name, ID and birth date, and for the token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select

from model.schema import Laterality
from tests.e2e.test_pipeline import node_answers_orthanc, results_in_pacs, stack
from tests.support.net import free_port
from tests.support.roles import wait_for
from worker.db import AuditEvent, StudyState
from worker.pipeline.sources import ophthalmic_photograph

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("e2e")]

PATIENT_ID = "PRIV-51873"
FAMILY, GIVEN = "Privacyson", "Patricia"
BIRTH_DATE = "19470203"
TOKEN = "e2e-read-token-4kQ9sXv2"
IDENTIFIERS = (PATIENT_ID, FAMILY, GIVEN, BIRTH_DATE, "1947-02-03", TOKEN)


def _send_study(s, retina: np.ndarray, folder: Path) -> str:
    wait_for(lambda: node_answers_orthanc(s), 90, "our node to answer Orthanc's C-ECHO", diagnostics=s.diagnostics)
    right = np.asarray(Image.fromarray(retina).resize((768, 768), Image.Resampling.LANCZOS))
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for number, (eye, pixels) in enumerate(((Laterality.RIGHT, right), (Laterality.LEFT, right[:, ::-1])), 1):
        ds = ophthalmic_photograph(np.ascontiguousarray(pixels), study_instance_uid=study_uid,
                                   series_instance_uid=series_uid, patient_id=PATIENT_ID,
                                   patient_name=f"{FAMILY}^{GIVEN}", laterality=eye, instance_number=number,
                                   accession_number="ACC-PRIV")
        ds.PatientBirthDate = BIRTH_DATE
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        s.pacs.upload(path)
    s.pacs.post("/modalities/retinalgpt/store", {"Resources": [s.pacs.study_id(study_uid)], "Synchronous": True})
    return study_uid


def test_no_patient_identifier_in_logs_or_audit_of_a_full_run(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with stack(tmp_path) as s:
        api_port = free_port()
        with s.config.open("a") as config:  # TOML: plain tables may follow the [[destinations]] array
            config.write(f'[api]\nhost = "127.0.0.1"\nport = {api_port}\n'
                         f'tokens = [{{ name = "ehr", sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}" }}]\n')
        s.roles.start("up", "up")
        api = f"http://127.0.0.1:{api_port}"
        study_uid = _send_study(s, retina_rgb, tmp_path / "camera")
        results_in_pacs(s, study_uid)
        wait_for(lambda: (st := s.study(study_uid)) and st.state == StudyState.DELIVERED, 120, "state delivered",
                 diagnostics=s.diagnostics)

        auth = {"Authorization": f"Bearer {TOKEN}"}
        wait_for(lambda: _up(f"{api}/healthz"), 60, "the API", diagnostics=s.diagnostics)
        worklist = httpx.get(f"{api}/api/worklist", params={"patient_id": PATIENT_ID}, headers=auth, timeout=30)
        assert worklist.status_code == 200 and worklist.json()["total"] == 1, worklist.text
        patients = httpx.get(f"{api}/fhir/r4/Patient", params={"identifier": PATIENT_ID, "access_token": TOKEN},
                             headers=auth, timeout=30)
        assert patients.status_code in {200, 400}, patients.text  # unknown parameter or match: either is fine
        question = f"Does {GIVEN} {FAMILY} ({PATIENT_ID}, born 1947-02-03) need a referral?"
        chat = httpx.post(f"{api}/api/studies/{study_uid}/chat", json={"question": question}, headers=auth,
                          timeout=180)
        assert chat.status_code == 200, chat.text
        s.roles.stop_all()

        logs = {path.name: path.read_text(errors="replace") for path in (tmp_path / "logs").glob("*.log")}
        assert logs and sum(len(text.splitlines()) for text in logs.values()) > 20  # the run did log
        assert "retinalgpt.access: GET /api/worklist 200" in logs["up.log"]
        leaks = [f"{name}: {line}" for name, text in logs.items() for line in text.splitlines()
                 if any(identifier in line for identifier in IDENTIFIERS)]
        assert leaks == [], "\n".join(leaks[:20])

        db = s.db
        try:
            with db.session() as session:
                events = session.scalars(select(AuditEvent)).all()
        finally:
            db.dispose()
        assert {"study.complete", "study.analysed", "chat"} <= {e.action for e in events}
        audited = [json.dumps({"actor": e.actor, "action": e.action, "detail": e.detail}) for e in events]
        leaked = [line for line in audited if any(identifier in line for identifier in IDENTIFIERS)]
        assert leaked == [], "\n".join(leaked[:20])


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
