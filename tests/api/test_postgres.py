"""The production database path: the same FHIR searches, worklist queries and metrics on PostgreSQL."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient

import worker.fhir_store  # noqa: F401 - registers the FHIR tables on Base.metadata
from tests.api.api_fixtures import SPECS, populate
from tests.api.conftest import READ_TOKEN, settings_for
from tests.support.services import postgres_database
from worker.api import create_app
from worker.db import Base, Database, Job, JobKind, JobState, Study
from worker.db.migrate import upgrade

pytestmark = [pytest.mark.postgres, pytest.mark.xdist_group("api")]
READ = {"Authorization": f"Bearer {READ_TOKEN}"}


def test_fhir_worklist_and_metrics_on_postgres(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with postgres_database("api") as url:
        settings = settings_for(tmp_path)
        settings.database.url = url
        upgrade(url)
        db = Database(url)
        with db.engine.connect() as connection:  # migration 0002 creates exactly the fhir_store models
            diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        populate(db, settings.storage.path, retina_rgb)
        start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        with db.session() as session:
            study = session.query(Study).filter_by(study_instance_uid=SPECS[0].uid).one()
            session.add(Job(study_id=study.id, revision=1, kind=JobKind.ANALYSIS, state=JobState.SUCCEEDED,
                            started_at=start, finished_at=start + dt.timedelta(seconds=12)))
        try:
            with TestClient(create_app(settings, db=db)) as http:
                fhir = "/fhir/r4"
                reports = http.get(f"{fhir}/DiagnosticReport", headers=READ,
                                   params={"date": ["ge2026-02-01", "lt2026-03-10"], "_sort": "date"}).json()
                assert [e["resource"]["subject"]["reference"] for e in reports["entry"]] and reports["total"] == 2
                first = http.get(f"{fhir}/DiagnosticReport", headers=READ, params={
                    "subject:identifier": f"urn:retinalgpt:patient-id|{SPECS[0].patient_id}",
                    "_include": "DiagnosticReport:result", "status": "preliminary"}).json()
                assert first["total"] == 1 and len(first["entry"]) == 1 + len(first["entry"][0]["resource"]["result"])
                paged = http.get(f"{fhir}/Observation", headers=READ, params={"_count": 3, "_offset": 3}).json()
                assert len(paged["entry"]) == 3 and {"previous", "next"} <= {lk["relation"] for lk in paged["link"]}
                assert http.get(f"{fhir}/Observation", headers=READ,
                                params={"code:not": "http://loinc.org|71491-5"}).json()["total"] > 0
                worklist = http.get("/api/worklist", headers=READ,
                                    params={"urgency": ["urgent", "routine"], "sort": "-study_date"}).json()
                assert [i["patient_id"] for i in worklist["items"]] == ["P-006", "P-002", "P-001"]
                assert http.get("/api/worklist", headers=READ, params={"laterality": "L", "calling_ae": "CAMERA3"}
                                ).json()["total"] == 1
                metrics = http.get("/metrics").text
                assert 'retinalgpt_job_duration_seconds_bucket{kind="analysis",le="30"} 1.0' in metrics
                assert 'retinalgpt_studies{state="delivered"} 4.0' in metrics
        finally:
            db.dispose()
