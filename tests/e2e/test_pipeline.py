"""End to end with real peers: Orthanc is the camera and the PACS, a local FHIR server is the EHR.

Orthanc sends an OP study to our node through its REST ``modalities/…/store``; the node, an inference worker
and a delivery worker (real processes) analyse it and deliver the SR, key images and PDF back into the same
study in Orthanc and the FHIR transaction to the FHIR server. Run on the embedded default (SQLite + kombu's
SQLAlchemy broker), on PostgreSQL + Redis and on PostgreSQL + RabbitMQ. On the embedded default the study's
originals are then purged by retention and ``studies rerun`` fetches them back from Orthanc (the query/retrieve
archive, C-GET): the revision-2 SR names the first as its predecessor and the same FHIR report is updated (still
preliminary: nobody signed it). That run also reads the API and chats about a patient with distinctive
identifiers, and then no log line or audit event of it holds them (issue 19 item 4).
"""

from __future__ import annotations

import contextlib
import hashlib
import datetime as dt
import io
import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select

from model.schema import Laterality, Referral, StudyAnalysis
from tests.reporting.reporting_fhir_server import FhirTestServer
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.roles import Roles, retinalgpt, wait_for
from tests.support.services import postgres_database, rabbitmq_vhost, redis_database
from worker.config import load_settings
from worker.db import (
    Analysis,
    AuditEvent,
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Study,
    StudyState,
    utcnow,
)
from worker.pipeline.retention import purge_expired
from worker.pipeline.sources import ophthalmic_photograph

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("e2e")]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
RESULT_CLASSES = {COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, ENCAPSULATED_PDF}
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


@dataclass
class Stack:
    """A configured product with its peers; roles are started by the test."""

    home: Path
    config: Path
    node_port: int
    pacs: Orthanc
    fhir: FhirTestServer
    roles: Roles

    @property
    def db(self) -> Database:
        return Database(load_settings(self.config).database.url)

    def study(self, uid: str) -> Study | None:
        db = self.db
        try:
            with db.session() as session:
                return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
        finally:
            db.dispose()

    def diagnostics(self) -> str:
        logs = "\n".join(f"--- {name}\n{self.roles.log(name)}" for name in sorted(self.roles.processes))
        jobs = retinalgpt("jobs", "list", "--json", config=self.config, check=False).stdout
        return f"{logs}\n--- jobs\n{jobs}"


def write_config(home: Path, *, node_port: int, pacs: Orthanc, fhir_url: str, database: str | None = None,
                 broker: str | None = None, backend: str | None = None, pacs_ae: str | None = None) -> Path:
    lines = [
        f'home = "{home}"',
        "[dicom]",
        'ae_title = "RETINALGPT"',
        'bind_address = "127.0.0.1"',
        f"port = {node_port}",
        'allowed_callers = [{ ae_title = "ORTHANC", host = "127.0.0.1" }]',
        "stable_seconds = 2",
        "[pipeline]",
        "heartbeat_seconds = 1",
        "stale_after_seconds = 6",
        "requeue_after_seconds = 30",
        "failed_retry_seconds = 2",
        "sweep_seconds = 1",
    ]
    if database:
        lines += ["[database]", f'url = "{database}"']
    if broker:
        lines += ["[broker]", f'url = "{broker}"'] + ([f'result_backend = "{backend}"'] if backend else [])
    lines += [
        "[[destinations]]", 'name = "pacs"', 'kind = "dicom"', f'ae_title = "{pacs_ae or pacs.ae_title}"',
        'host = "127.0.0.1"', f"port = {pacs.dicom_port}", "backoff_seconds = 0.5", "max_attempts = 40",
        "[[destinations]]", 'name = "ehr"', 'kind = "fhir"', f'url = "{fhir_url}"', "backoff_seconds = 0.5",
        "[[destinations]]", 'name = "archive"', 'kind = "folder"', 'path = "delivered"',
        "[[archives]]", 'name = "pacs"', f'ae_title = "{pacs_ae or pacs.ae_title}"', 'host = "127.0.0.1"',
        f"port = {pacs.dicom_port}",
    ]
    config = home / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextlib.contextmanager
def stack(tmp_path: Path, *, database: str | None = None, broker: str | None = None,
          backend: str | None = None, start_pacs: bool = True) -> Iterator[Stack]:
    node_port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    pacs = Orthanc(tmp_path / "orthanc", modalities={"retinalgpt": ["RETINALGPT", "127.0.0.1", node_port]})
    if start_pacs:
        pacs.start()
    with contextlib.closing(_Stopper(pacs)), FhirTestServer() as fhir:
        config = write_config(home, node_port=node_port, pacs=pacs, fhir_url=fhir.url, database=database,
                              broker=broker, backend=backend)
        retinalgpt("db", "upgrade", config=config)
        roles = Roles(config, tmp_path / "logs")
        try:
            yield Stack(home, config, node_port, pacs, fhir, roles)
        finally:
            roles.stop_all()


class _Stopper:
    def __init__(self, pacs: Orthanc) -> None:
        self.pacs = pacs

    def close(self) -> None:
        self.pacs.stop()


def op_files(folder: Path, retina: np.ndarray, size: int = 768, *, patient_id: str = "E2E-1",
             patient_name: str = "Test^Eye", birth_date: str | None = None) -> tuple[str, list[Path]]:
    """Two OP instances (right eye, mirrored left eye) of a new study, written as files."""
    right = np.asarray(Image.fromarray(retina).resize((size, size), Image.Resampling.LANCZOS))
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, (eye, pixels) in enumerate(((Laterality.RIGHT, right), (Laterality.LEFT, right[:, ::-1])), 1):
        ds = ophthalmic_photograph(np.ascontiguousarray(pixels), study_instance_uid=study_uid,
                                   series_instance_uid=series_uid, patient_id=patient_id, patient_name=patient_name,
                                   laterality=eye, instance_number=number, accession_number="ACC1")
        if birth_date is not None:
            ds.PatientBirthDate = birth_date
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


def node_answers_orthanc(s: Stack) -> bool:
    try:
        s.pacs.post("/modalities/retinalgpt/echo", {})
    except httpx.HTTPError:
        return False
    return True


def camera_sends_study(s: Stack, retina: np.ndarray, folder: Path, **patient: str) -> str:
    """Orthanc (as the camera) stores an OP study (``patient``: :func:`op_files`' patient keywords) and sends it
    to our node by C-STORE."""
    wait_for(lambda: node_answers_orthanc(s), 90, "our node to answer Orthanc's C-ECHO", diagnostics=s.diagnostics)
    study_uid, paths = op_files(folder, retina, **patient)
    for path in paths:
        s.pacs.upload(path)
    orthanc_study = s.pacs.study_id(study_uid)
    s.pacs.post("/modalities/retinalgpt/store", {"Resources": [orthanc_study], "Synchronous": True})
    return study_uid


def results_in_pacs(s: Stack, study_uid: str, timeout: float = 420) -> list[str]:
    def arrived() -> list[str] | None:
        study = s.study(study_uid)
        if study is not None and study.state == StudyState.FAILED:
            raise AssertionError(f"study {study_uid} failed:\n{s.diagnostics()}")
        classes = s.pacs.sop_classes_in_study(study_uid)
        return classes if RESULT_CLASSES <= set(classes) else None

    return wait_for(arrived, timeout, "SR, key image and PDF in Orthanc's study", interval=1,
                    diagnostics=s.diagnostics)


def fhir_reports(s: Stack) -> list[dict]:
    return list(s.fhir.store.resources.get("DiagnosticReport", {}).values())


def assert_delivered_once(s: Stack, study_uid: str) -> StudyAnalysis:
    """Every delivery of the current revision delivered; one SR per revision in Orthanc; a sound analysis."""
    db = s.db
    try:
        with db.session() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
            assert study.state == StudyState.DELIVERED
            deliveries = session.scalars(select(Delivery).where(Delivery.study_id == study.id,
                                                                Delivery.revision == study.revision)).all()
            assert {d.destination for d in deliveries} == {"pacs", "ehr", "archive"}
            assert all(d.state == DeliveryState.DELIVERED for d in deliveries)
            row = session.scalars(select(Analysis).where(Analysis.study_id == study.id,
                                                         Analysis.revision == study.revision)).one()
            analysis = StudyAnalysis.model_validate(row.result)
            revision = study.revision
    finally:
        db.dispose()
    classes = s.pacs.sop_classes_in_study(study_uid)
    assert classes.count(COMPREHENSIVE_3D_SR) == revision
    assert classes.count(OP_8BIT) == 2
    assert {i.laterality for i in analysis.images} == {Laterality.RIGHT, Laterality.LEFT}
    assert analysis.referral in set(Referral)
    assert all(i.measurements for i in analysis.images)
    archived = s.home / "delivered" / study_uid / f"r{revision}"
    assert (archived / "sr.dcm").is_file() and (archived / "fhir-bundle.json").is_file()
    return analysis


PATIENT_ID = "PRIV-51873"
FAMILY, GIVEN = "Privacyson", "Patricia"
BIRTH_DATE = "19470203"
TOKEN = "e2e-read-token-4kQ9sXv2"
IDENTIFIERS = (PATIENT_ID, FAMILY, GIVEN, BIRTH_DATE, "1947-02-03", TOKEN)
"""What must never appear in a log line or an audit event (issue 19 item 4)."""


def test_camera_to_pacs_and_ehr_on_embedded_default_with_rerun(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    """`retinalgpt up` (node, workers, API) on the embedded default: Orthanc as the camera sends a study of a
    patient with distinctive identifiers; its results reach the PACS, the EHR and a folder; the EHR searches the
    API by the patient's MRN (worklist and FHIR, one client careless enough to put its token in the query string)
    and a clinician asks RetinalGPT a question that names the patient; retention purges the originals and a
    re-run fetches them back from Orthanc for revision 2. Then no log line and no audit event of the whole run
    holds the patient's name, ID or birth date, or the token (issue 19 item 4)."""
    with stack(tmp_path) as s:
        api_port = free_port()
        with s.config.open("a") as config:  # TOML: plain tables may follow the [[destinations]] array
            config.write(f'[api]\nhost = "127.0.0.1"\nport = {api_port}\n'
                         f'tokens = [{{ name = "ehr", sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}" }}]\n')
        s.roles.start("up", "up")
        assert retinalgpt("echo", "pacs", config=s.config).returncode == 0
        study_uid = camera_sends_study(s, retina_rgb, tmp_path / "camera", patient_id=PATIENT_ID,
                                       patient_name=f"{FAMILY}^{GIVEN}", birth_date=BIRTH_DATE)
        results_in_pacs(s, study_uid)
        wait_for(lambda: (st := s.study(study_uid)) and st.state == StudyState.DELIVERED, 120, "state delivered",
                 diagnostics=s.diagnostics)
        assert_delivered_once(s, study_uid)
        reports = fhir_reports(s)
        assert len(reports) == 1 and reports[0]["status"] == "preliminary"  # unsigned AI result
        first_sr = _srs(s, study_uid)[0]
        _ehr_reads_and_a_clinician_asks(s, f"http://127.0.0.1:{api_port}", study_uid)

        # retention purges the delivered study's originals; the re-run fetches them back from Orthanc (C-GET)
        settings = load_settings(s.config)
        settings.storage = settings.storage.model_copy(update={"retain_days": 1})
        db = s.db
        try:
            purged = purge_expired(db, settings, now=utcnow() + dt.timedelta(days=2))
        finally:
            db.dispose()
        assert [p.study_instance_uid for p in purged] == [study_uid] and purged[0].files == 2
        out = retinalgpt("studies", "rerun", study_uid, config=s.config).stdout
        assert "retrieved from pacs; revision 2 opened" in out
        wait_for(lambda: s.pacs.sop_classes_in_study(study_uid).count(COMPREHENSIVE_3D_SR) == 2, 420,
                 "the revision-2 SR in Orthanc", interval=1, diagnostics=s.diagnostics)
        wait_for(lambda: (st := s.study(study_uid)) and st.state == StudyState.DELIVERED and st.revision == 2, 120,
                 "revision 2 delivered", diagnostics=s.diagnostics)
        assert_delivered_once(s, study_uid)
        second_sr = next(ds for ds in _srs(s, study_uid) if ds.SOPInstanceUID != first_sr.SOPInstanceUID)
        predecessor = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
        assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
        reports = fhir_reports(s)
        assert len(reports) == 1 and reports[0]["status"] == "preliminary"  # same report updated, not a second
        db = s.db
        with db.session() as session:
            rows = session.scalars(select(Analysis).order_by(Analysis.revision)).all()
            assert [(r.revision, r.superseded) for r in rows] == [(1, True), (2, False)]
        db.dispose()
        s.roles.stop_all()
        _no_identifier_in_logs_or_audit(s, tmp_path / "logs")


def _ehr_reads_and_a_clinician_asks(s: Stack, api: str, study_uid: str) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    wait_for(lambda: _up(f"{api}/healthz"), 60, "the API", diagnostics=s.diagnostics)
    worklist = httpx.get(f"{api}/api/worklist", params={"patient_id": PATIENT_ID}, headers=auth, timeout=30)
    assert worklist.status_code == 200 and worklist.json()["total"] == 1, worklist.text
    patients = httpx.get(f"{api}/fhir/r4/Patient", params={"identifier": PATIENT_ID, "access_token": TOKEN},
                         headers=auth, timeout=30)
    assert patients.status_code in {200, 400}, patients.text  # unknown parameter or match: either is fine
    question = f"Does {GIVEN} {FAMILY} ({PATIENT_ID}, born 1947-02-03) need a referral?"
    chat = httpx.post(f"{api}/api/studies/{study_uid}/chat", json={"question": question}, headers=auth, timeout=180)
    assert chat.status_code == 200, chat.text


def _no_identifier_in_logs_or_audit(s: Stack, logs_folder: Path) -> None:
    logs = {path.name: path.read_text(errors="replace") for path in logs_folder.glob("*.log")}
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


def _srs(s: Stack, study_uid: str) -> list[pydicom.Dataset]:
    study = s.pacs.study_id(study_uid)
    datasets = []
    for item in s.pacs.get(f"/studies/{study}/instances"):
        tags = s.pacs.get(f"/instances/{item['ID']}/tags?simplify")
        if tags["SOPClassUID"] == COMPREHENSIVE_3D_SR:
            raw = httpx.get(f"{s.pacs.url}/instances/{item['ID']}/file", timeout=30).content
            datasets.append(pydicom.dcmread(io.BytesIO(raw)))
    return sorted(datasets, key=lambda ds: str(ds.ContentDate) + str(ds.ContentTime))


@pytest.mark.postgres
@pytest.mark.redis
def test_postgres_redis_survives_sigkilled_inference_worker(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with postgres_database() as database, redis_database() as broker, stack(
        tmp_path, database=database, broker=broker, backend=broker
    ) as s:
        s.roles.start("node", "node")
        s.roles.start("delivery", "worker", "--queues", "delivery")
        s.roles.start("inference-1", "worker", "--queues", "inference")
        study_uid = camera_sends_study(s, retina_rgb, tmp_path / "camera")

        def running_job() -> bool:
            db = s.db
            try:
                with db.session() as session:
                    return bool(session.scalars(select(Job).where(Job.state == JobState.RUNNING)).first())
            finally:
                db.dispose()

        wait_for(running_job, 240, "the analysis job to start", interval=0.1, diagnostics=s.diagnostics)
        s.roles.kill("inference-1", signal.SIGKILL)
        s.roles.start("inference-2", "worker", "--queues", "inference")
        results_in_pacs(s, study_uid)
        wait_for(lambda: (st := s.study(study_uid)) and st.state == StudyState.DELIVERED, 120, "state delivered",
                 diagnostics=s.diagnostics)
        assert_delivered_once(s, study_uid)
        assert len(fhir_reports(s)) == 1
        assert s.fhir.store.transactions == 1
        db = s.db
        with db.session() as session:
            job = session.scalars(select(Job)).one()
            assert job.state == JobState.SUCCEEDED and job.attempts == 2
            assert all(d.attempts == 1 for d in session.scalars(select(Delivery)))
        db.dispose()


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_postgres_rabbitmq_pipeline(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with postgres_database() as database, rabbitmq_vhost() as broker, stack(
        tmp_path, database=database, broker=broker, backend=f"db+{database}"
    ) as s:
        s.roles.start("node", "node")
        s.roles.start("workers", "worker", "--queues", "inference,delivery")
        study_uid = camera_sends_study(s, retina_rgb, tmp_path / "camera")
        results_in_pacs(s, study_uid)
        wait_for(lambda: (st := s.study(study_uid)) and st.state == StudyState.DELIVERED, 120, "state delivered",
                 diagnostics=s.diagnostics)
        assert_delivered_once(s, study_uid)
        bundle = json.loads((s.home / "delivered" / study_uid / "r1" / "fhir-bundle.json").read_text())
        assert bundle["type"] == "transaction"
