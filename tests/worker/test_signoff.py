"""Clinician sign-off (issue 17 item 1): a clinician token signs the current result revision through the API with
one correction; the signed revision goes through the outbox to a real Orthanc (the new SR, VERIFIED with the
Verifying Observer, dciodvfy clean and listing the old SR as predecessor) and a real MLLP receiver (ORU status F,
then C for a later correction); its FHIR Bundle is final/amended with the clinician as resultsInterpreter and
valid for the npm ``fhir`` R4 validator. Unsigned results stay preliminary; read-only and admin tokens cannot
sign (403); a stale revision is refused (409); bad corrections are refused (422); everything is audited."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from reporting.hl7 import parse
from tests.reporting.test_fhir import r4_validate
from tests.support.mllp import MllpReceiver
from tests.support.orthanc import Orthanc
from tests.worker.delivery_world import World
from worker.api.app import create_app
from worker.celery_app import make_celery
from worker.db import Analysis, AuditEvent, DeliveryState, SignOff, StudyState

DCIODVFY, DSRDUMP = "/usr/bin/dciodvfy", "/usr/bin/dsrdump"
TOKENS = {"reader": ("read", "read-tok-8c1d"), "operator": ("admin", "admin-tok-4e7a"),
          "dr-smith": ("clinician", "clin-tok-9f2b"), "dr-jones": ("clinician", "clin-tok-1a5c")}
NAMES = {"dr-smith": "Smith^Jane", "dr-jones": "Jones^Tom"}


def _tokens() -> str:
    out = ""
    for name, (role, token) in TOKENS.items():
        out += (f'[[api.tokens]]\nname = "{name}"\nrole = "{role}"\n'
                f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n')
        if name in NAMES:
            out += f'observer_name = "{NAMES[name]}"\norganisation = "Eye Clinic"\n'
    return out


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})


def _dciodvfy_errors(path: Path) -> list[str]:
    run = _run(DCIODVFY, str(path))
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def peers(tmp_path: Path):
    with Orthanc(tmp_path / "orthanc") as pacs, MllpReceiver() as ehr:
        yield pacs, ehr


@pytest.fixture
def world(tmp_path: Path, retina_rgb: np.ndarray, peers) -> World:
    pacs, ehr = peers
    destinations = (
        f'name = "pacs"\nkind = "dicom"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {pacs.dicom_port}\n'
        "timeout = 10\n"
        f'[[destinations]]\nname = "ehr"\nkind = "hl7v2"\nhost = "127.0.0.1"\nport = {ehr.port}\n'
        "timeout = 2.0\nconnect_timeout = 2.0\n"
        f"{_tokens()}")
    return World(tmp_path / "home", retina_rgb, destinations)


@pytest.fixture
def client(world: World):
    app = create_app(world.settings, db=world.db, celery=make_celery(world.settings))
    with TestClient(app) as test_client:
        yield test_client


def _sign(client: TestClient, world: World, who: str = "dr-smith", **body: object):
    body.setdefault("revision", 1)
    body.setdefault("decision", "confirm")
    return client.post(f"/api/studies/{world.study_uid}/signoff", json=body, headers=_auth(who))


def _results(world: World, revision: int) -> Path:
    return world.settings.home / "results" / world.study_uid / f"r{revision}"


def _bundle_resource(world: World, revision: int, rtype: str) -> list[dict]:
    bundle = json.loads((_results(world, revision) / "fhir-bundle.json").read_text())
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_signing_with_a_correction_reissues_verified_sr_final_fhir_and_hl7(world, client, peers, tmp_path) -> None:
    pacs, ehr = peers
    assert world.deliver(1) == StudyState.DELIVERED  # the AI result, unsigned: preliminary everywhere
    old_sr = pydicom.dcmread(_results(world, 1) / "sr.dcm")
    assert old_sr.VerificationFlag == "UNVERIFIED" and "VerifyingObserverSequence" not in old_sr
    (report,) = _bundle_resource(world, 1, "DiagnosticReport")
    assert report["status"] == "preliminary" and "resultsInterpreter" not in report
    assert {o["status"] for o in _bundle_resource(world, 1, "Observation")} == {"preliminary"}
    assert parse(ehr.received[0]).oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.to_er7() == "P"

    right, left = world.uids
    answer = _sign(client, world, decision="correct", comment="Haemorrhage seen temporally.",
                   grades=[{"eye": "R", "condition": "diabetic_retinopathy", "grade": 3}],
                   missed=[{"sop_instance_uid": right, "type": "haemorrhage", "box": [0.6, 0.3, 0.7, 0.4]}])
    assert answer.status_code == 201, answer.text
    signed = answer.json()
    assert signed["revision"] == 2 and signed["signed_revision"] == 1 and signed["changed"] is True
    assert signed["observer"] == "Smith^Jane" and signed["organisation"] == "Eye Clinic"
    assert {c["kind"] for c in signed["changes"]} == {"grade", "lesion_missed"}
    with world.db.session() as session:
        row = session.scalars(select(SignOff)).one()
        assert row.actor == "api:dr-smith" and row.original["images"][0]["findings"][0]["grade"] == 2  # AI kept
        stored = session.scalars(select(Analysis).where(Analysis.revision == 2)).one().result
        assert stored["images"][0]["findings"][0]["grade"] == 3 and stored["images"][0]["lesions"][0]["box"] == [
            0.6, 0.3, 0.7, 0.4]
        assert stored["images"][0]["findings"][0]["source"] == "clinician"  # her grade, not the AI's
        assert stored["images"][0]["findings"][0]["probability"] is None
        assert stored["images"][1]["findings"][0]["source"] == "model"
        assert stored["images"][0]["lesions"][0]["source"] == "clinician"  # drawn by the clinician, not the AI
        assert stored["images"][1]["findings"][0]["grade"] == 2  # the left eye as the AI graded it
        (audit,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.signed")).all()
        assert audit.actor == "api:dr-smith" and audit.detail["changed"] is True
        assert {"kind": "grade", "eye": "R", "sop_instance_uid": right, "condition": "diabetic_retinopathy",
                "ai": 2, "clinician": 3} in audit.detail["changes"]
        assert audit.detail["comment"] == "Haemorrhage seen temporally."
    assert {r.state for r in world.rows() if r.revision == 2} == {DeliveryState.PENDING}  # the outbox
    detail = client.get(f"/api/studies/{world.study_uid}", headers=_auth("reader")).json()
    assert detail["revision"] == 2 and detail["signoff"]["observer"] == "Smith^Jane"
    assert detail["signoff"]["changed"] is True and detail["analysis"]["revision"] == 2

    assert world.deliver(2) == StudyState.DELIVERED
    sr_path = _results(world, 2) / "sr.dcm"
    sr = pydicom.dcmread(sr_path)
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE"
    (observer,) = sr.VerifyingObserverSequence
    assert observer.VerifyingObserverName == "Smith^Jane" and observer.VerifyingOrganization == "Eye Clinic"
    assert observer.VerificationDateTime.startswith(signed["signed_at"][:10].replace("-", ""))
    assert observer.VerifyingObserverIdentificationCodeSequence[0].CodeMeaning == "api:dr-smith"
    assert sr.SOPInstanceUID != old_sr.SOPInstanceUID
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old_sr.SOPInstanceUID
    assert _dciodvfy_errors(sr_path) == []
    dump = _run(DSRDUMP, "+Pl", str(sr_path)).stdout
    header = dict(line.split(" : ", 1) for line in dump.splitlines() if " : " in line)
    assert header["Verification Flag  "] == "VERIFIED" and header["Predecessor Docs   "] == "1"
    verifying = header["Verifying Observers"]
    assert "Smith^Jane" in verifying and "Eye Clinic" in verifying and "api:dr-smith" in verifying
    assert "Verified by a clinician: Smith^Jane (Eye Clinic)" in dump and "not verified by a clinician" not in dump
    assert '"Tracking Identifier")="haemorrhage 1 drawn by clinician"' in dump
    assert f'"Tracking Identifier")="graded by clinician {right}'[:80] in dump
    assert '(,,"Observer Type")=(121006,DCM,"Person")' in dump

    held = {pacs.get(f"/instances/{i['ID']}/tags?simplify")["SOPInstanceUID"]: pacs.get(
        f"/instances/{i['ID']}/tags?simplify") for i in pacs.get(f"/studies/{pacs.study_id(world.study_uid)}/instances")}
    assert old_sr.SOPInstanceUID in held and sr.SOPInstanceUID in held
    assert held[sr.SOPInstanceUID]["VerificationFlag"] == "VERIFIED"
    assert held[old_sr.SOPInstanceUID]["VerificationFlag"] == "UNVERIFIED"

    (report,) = _bundle_resource(world, 2, "DiagnosticReport")
    assert report["status"] == "amended"
    assert report["resultsInterpreter"] == [{"identifier": {"system": "urn:retinalgpt:clinician",
                                                            "value": "api:dr-smith"}, "display": "Jane Smith"}]
    assert "not verified" not in report["conclusion"] and "Verified by a clinician" in report["conclusion"]
    notes = [n["text"] for o in _bundle_resource(world, 2, "Observation") for n in o.get("note", [])]
    assert "Hemorrhage drawn by the clinician at sign-off (missed by the AI), box [0.60, 0.30, 0.70, 0.40]." in notes
    graded = [o for o in _bundle_resource(world, 2, "Observation") if o["identifier"][0]["value"].endswith(
        f"{right}/clinician-findings")]
    assert len(graded) == 1 and "device" not in graded[0]
    assert graded[0]["performer"][0]["identifier"]["value"] == "api:dr-smith"
    (provenance,) = _bundle_resource(world, 2, "Provenance")
    assert any(a["type"]["coding"][0]["code"] == "verifier" for a in provenance["agent"])
    bundle = json.loads((_results(world, 2) / "fhir-bundle.json").read_text())
    messages = r4_validate(bundle, tmp_path)
    assert [m for m in messages if m["severity"] == "error"] == []
    assert [m for m in messages if "Unexpected property" in m["message"]] == []

    order = parse(ehr.received[1]).oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_25.to_er7() == "F"
    assert {g.obx.obx_11.to_er7() for g in order.oru_r01_observation} == {"F"}

    # a later correction of the signed result: C in HL7, amended in FHIR, a third SR superseding the second
    again = _sign(client, world, who="dr-jones", revision=2, decision="correct", referral="urgent")
    assert again.status_code == 201, again.text
    assert world.deliver(3) == StudyState.DELIVERED
    with world.db.session() as session:
        third_result = session.scalars(select(Analysis).where(Analysis.revision == 3)).one().result
        assert third_result["referral"] == "urgent" and third_result["referral_source"] == "clinician"
        second_result = session.scalars(select(Analysis).where(Analysis.revision == 2)).one().result
        assert second_result["referral_source"] == "model"
    third = pydicom.dcmread(_results(world, 3) / "sr.dcm")
    assert third.VerifyingObserverSequence[0].VerifyingObserverName == "Jones^Tom"
    assert (third.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
            .ReferencedSOPInstanceUID == sr.SOPInstanceUID)
    assert parse(ehr.received[2]).oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.to_er7() == "C"


def test_a_confirmation_is_final(world, client) -> None:
    assert _sign(client, world).status_code == 201
    assert world.deliver(2) == StudyState.DELIVERED
    (report,) = _bundle_resource(world, 2, "DiagnosticReport")
    assert report["status"] == "final" and report["resultsInterpreter"][0]["identifier"]["value"] == "api:dr-smith"
    assert {o["status"] for o in _bundle_resource(world, 2, "Observation")} == {"final"}
    sr = pydicom.dcmread(_results(world, 2) / "sr.dcm")
    assert sr.VerificationFlag == "VERIFIED"
    assert _dciodvfy_errors(_results(world, 2) / "sr.dcm") == []


@pytest.mark.parametrize("who", ["reader", "operator"])
def test_read_only_and_admin_tokens_cannot_sign(world, client, who) -> None:
    answer = _sign(client, world, who=who)
    assert answer.status_code == 403 and "clinician" in answer.json()["detail"]
    with world.db.session() as session:
        assert session.scalars(select(SignOff)).all() == []


def test_no_token_is_401(world, client) -> None:
    answer = client.post(f"/api/studies/{world.study_uid}/signoff", json={"revision": 1, "decision": "confirm"})
    assert answer.status_code == 401


def test_a_stale_revision_is_409_and_signs_nothing(world, client) -> None:
    assert _sign(client, world).status_code == 201
    stale = _sign(client, world, who="dr-jones", revision=1)
    assert stale.status_code == 409 and "not the current result revision" in stale.json()["detail"]
    with world.db.session() as session:
        assert len(session.scalars(select(SignOff)).all()) == 1


@pytest.mark.parametrize("body, fragment", [
    ({"decision": "correct", "grades": [{"eye": "R", "condition": "dry_eye", "grade": 1}]}, "condition"),
    ({"decision": "correct", "grades": [{"eye": "R", "condition": "diabetic_retinopathy", "grade": 5}]}, "outside 0..4"),
    ({"decision": "correct", "grades": [{"eye": "R", "condition": "glaucoma", "grade": 2}]}, "outside 0..1"),
    ({"decision": "correct", "missed": [{"sop_instance_uid": "1.2.3", "type": "drusen", "box": [0.5, 0.5, 1.2, 0.6]}]},
     "box"),
    ({"decision": "confirm", "referral": "urgent"}, "confirmation carries no corrections"),
    ({"decision": "correct", "lesions": [{"sop_instance_uid": "1.2.3", "index": 0, "verdict": "wrong"}]},
     "not part of this result"),
    ({"decision": "correct", "surprise": 1}, "surprise"),
])
def test_invalid_corrections_are_422(world, client, body, fragment) -> None:
    answer = _sign(client, world, **body)
    assert answer.status_code == 422, answer.text
    assert fragment in answer.text
    with world.db.session() as session:
        assert session.scalars(select(SignOff)).all() == []


def test_a_study_without_a_result_cannot_be_signed(world, client) -> None:
    with world.db.session() as session:
        session.execute(Analysis.__table__.delete())
    answer = _sign(client, world)
    assert answer.status_code == 409
    assert client.post("/api/studies/1.2.3.4/signoff", json={"revision": 1, "decision": "confirm"},
                       headers=_auth("dr-smith")).status_code == 404


@pytest.mark.parametrize("token, problem", [
    ({"role": "clinician"}, "needs observer_name"),
    ({"role": "clinician", "observer_name": "drsmith"}, "needs observer_name"),
    ({"role": "read", "observer_name": "Smith^Jane"}, "are for clinician tokens"),
])
def test_clinician_tokens_need_a_person_name(token: dict, problem: str) -> None:
    from pydantic import ValidationError

    from worker.config import ApiToken

    with pytest.raises(ValidationError, match=problem):
        ApiToken(name="t", sha256="0" * 64, **token)
