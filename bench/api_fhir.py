"""FHIR facade and worklist: indexing cost per study and request latency as the database grows.

Builds N studies (two OP images each, the realistic test analysis shape: DR graded per eye, lesions, disc/cup,
measurements), indexes each study's transaction Bundle from :func:`reporting.fhir.bundle.build_bundle` with
:func:`worker.fhir_store.index_bundle`, then times API requests in-process (httpx over ASGI, no network).
Reference: ``GET /healthz`` in the same run (routing, middleware and auth-free overhead only), so the ratios
show what the database work adds.

    .venv/bin/python bench/api_fhir.py --studies 200 --repeat 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "api"))
sys.path.insert(0, str(REPO))

from api_fixtures import MODEL, StudySpec, make_analysis  # noqa: E402

from model.schema import Laterality, Referral  # noqa: E402
from reporting.fhir.bundle import build_bundle  # noqa: E402
from worker.api import create_app  # noqa: E402
from worker.config import load_settings  # noqa: E402
from worker.db import Analysis, Database, Instance, Series, Study, StudyState  # noqa: E402
from worker.db.migrate import upgrade  # noqa: E402
from worker.fhir_store import index_bundle  # noqa: E402
from worker.pipeline.sources import ophthalmic_photograph  # noqa: E402

TOKEN = "bench-token"
REFERRALS = [Referral.NONE, Referral.ROUTINE, Referral.URGENT, Referral.UNGRADABLE]


def populate(db: Database, n: int) -> tuple[list[float], list[str]]:
    rgb = np.zeros((32, 32, 3), np.uint8)
    index_ms: list[float] = []
    patients: list[str] = []
    for i in range(n):
        spec = StudySpec(f"P{i:05d}", f"Bench^{i}", dt.date(2026, 1, 1) + dt.timedelta(days=i % 300), "RL",
                         f"CAMERA{i % 3}", REFERRALS[i % 4], StudyState.DELIVERED, dr_grade=i % 5)
        series = generate_uid()
        sources = [ophthalmic_photograph(rgb, study_instance_uid=spec.uid, series_instance_uid=series,
                                         patient_id=spec.patient_id, patient_name=spec.patient_name,
                                         laterality=Laterality(side), instance_number=k + 1,
                                         when=dt.datetime.combine(spec.date, dt.time(9)))
                   for k, side in enumerate(spec.eyes)]
        analysis = make_analysis(spec, sources)
        bundle = build_bundle(analysis, sources)
        with db.session() as session:
            study = Study(study_instance_uid=spec.uid, patient_id=spec.patient_id, study_date=spec.date.strftime("%Y%m%d"),
                          state=spec.state)
            row = Series(series_instance_uid=series, study=study)
            for ds in sources:
                session.add(Instance(study=study, series=row, sop_instance_uid=str(ds.SOPInstanceUID),
                                     sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid="1.2.840.10008.1.2.1",
                                     laterality=str(ds.ImageLaterality), path="/dev/null", size_bytes=0, sha256="0" * 64,
                                     calling_ae_title=spec.calling_ae, peer_host="127.0.0.1", revision=1, analysable=True))
            session.add(study)
            session.flush()
            session.add(Analysis(study_id=study.id, revision=1, model_name=MODEL.name, model_version=MODEL.version,
                                 result=analysis.model_dump(mode="json")))
            started = time.perf_counter()
            index_bundle(session, study.id, 1, bundle)
            index_ms.append((time.perf_counter() - started) * 1000)
        patients.append(spec.patient_id)
    return index_ms, patients


def timed(http: TestClient, url: str, repeat: int, headers: dict[str, str]) -> float:
    http.get(url, headers=headers).raise_for_status()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        http.get(url, headers=headers).raise_for_status()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-api-"))
    settings = load_settings(None, home=home, model={"enabled": False}, api={"tokens": [
        {"name": "bench", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(), "role": "read"}]})
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    index_ms, patients = populate(db, args.studies)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(settings, db=db)) as http:
        patient = http.get(f"/fhir/r4/Patient?identifier=urn:retinalgpt:patient-id|{patients[len(patients) // 2]}",
                           headers=headers).json()["entry"][0]["resource"]["id"]
        cases = [
            ("reference: GET /healthz", "/healthz"),
            ("DiagnosticReport read by id", None),
            ("DiagnosticReport?patient=…", f"/fhir/r4/DiagnosticReport?patient={patient}"),
            ("… &_include=result&_include=imaging-study",
             f"/fhir/r4/DiagnosticReport?patient={patient}&_include=DiagnosticReport:result"
             "&_include=DiagnosticReport:imaging-study"),
            ("Observation?code=71491-5&_count=50", "/fhir/r4/Observation?code=http://loinc.org|71491-5&_count=50"),
            ("Observation?date=ge…&_count=50 (last page)", None),
            ("/api/worklist?urgency=urgent (50 rows)", "/api/worklist?urgency=urgent"),
            ("/api/worklist default sort, page 3", "/api/worklist?offset=100"),
        ]
        report = http.get(f"/fhir/r4/DiagnosticReport?patient={patient}", headers=headers).json()["entry"][0]["resource"]
        total = http.get("/fhir/r4/Observation?date=ge2026-03-01&_count=0", headers=headers).json()["total"]
        rows = []
        for name, url in cases:
            if name.startswith("DiagnosticReport read"):
                url = f"/fhir/r4/DiagnosticReport/{report['id']}"
            elif url is None:
                url = f"/fhir/r4/Observation?date=ge2026-03-01&_count=50&_offset={max(0, total - 50)}"
            rows.append((name, timed(http, url, args.repeat, headers)))
    db.dispose()
    reference = rows[0][1]
    observations = args.studies * 7
    print(f"{args.studies} studies (~{observations} Observations); index_bundle per study: median "
          f"{statistics.median(index_ms):.1f} ms, p95 {sorted(index_ms)[int(0.95 * len(index_ms))]:.1f} ms")
    print(f"{'request':48} {'ms':>8} {'x ref':>7}")
    for name, ms in rows:
        print(f"{name:48} {ms:8.2f} {ms / reference:7.1f}")


if __name__ == "__main__":
    main()
