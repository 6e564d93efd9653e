"""Hung analysis drill (issue 18 item 10): under a real ``retinalgpt up`` (node with its bookkeeper, inference and
delivery workers), a study whose image sits on storage that never answers (a FIFO without writer: ``open``
blocks for good, like a hung NFS mount) hits the task time limit; the attempt is recorded as failed and retried
by the bookkeeper, and after ``max_attempts`` the job is dead with its reason. When billiard's pool does not
give its replacement process the retry (see ``worker.liveness``), the worker exits and ``up`` restarts it."""

from __future__ import annotations

import os
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from tests.support.net import free_port
from tests.support.roles import Roles, wait_for
from worker.celery_app import make_celery
from worker.config import load_settings
from worker.db import AuditEvent, Database, Instance, Job, JobState, Series, Study, StudyState
from worker.db.migrate import upgrade
from worker.pipeline.jobs import Pipeline

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def test_hung_analysis_hits_the_time_limit_and_follows_the_retry_policy(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        f'[dicom]\nbind_address = "127.0.0.1"\nport = {free_port()}\n'
        "[pipeline]\nanalysis_time_limit_seconds = 3\nmax_attempts = 2\nfailed_retry_seconds = 1\n"
        "sweep_seconds = 0.5\nheartbeat_seconds = 1\nstale_after_seconds = 6\nrequeue_after_seconds = 5\n"
        "[model]\nenabled = false\n"
    )
    settings = load_settings(config)
    upgrade(settings.database.url)
    db = Database(settings.database.url)
    hung = tmp_path / "hung.dcm"
    os.mkfifo(hung)
    study_uid = generate_uid()
    with db.session() as session:
        study = Study(study_instance_uid=study_uid, state=StudyState.COMPLETE, patient_id="P1")
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_instance_uid=generate_uid(), modality="OP")
        session.add(series)
        session.flush()
        session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=generate_uid(),
                             sop_class_uid=OP_8BIT, transfer_syntax_uid="1.2.840.10008.1.2.1", instance_number=1,
                             path=str(hung), size_bytes=0, sha256="0" * 64, calling_ae_title="CAMERA1",
                             peer_host="127.0.0.1", revision=1, analysable=True))
    pipeline = Pipeline(settings, db, make_celery(settings))
    roles = Roles(config, tmp_path / "logs")
    up = roles.start("up", "up", "--no-api")
    try:
        job_id = pipeline.enqueue(study_uid, 1, actor="test")

        def job() -> Job:
            with db.reading() as session:
                return session.get(Job, job_id)

        wait_for(lambda: job().state == JobState.DEAD, 180, "the job to be dead after two timed-out attempts",
                 diagnostics=lambda: roles.log("up"))
        assert up.poll() is None, roles.log("up")
    finally:
        roles.stop_all()
    final = job()
    assert final.attempts == 2
    assert "time limit of 3 s" in final.error
    with db.reading() as session:
        assert session.scalars(select(Study.state)).one() == StudyState.FAILED
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.action.like("job.%"))
                                  .order_by(AuditEvent.id)).all()
    assert actions == ["job.queued", "job.failed", "job.dead"]
    assert roles.log("up").count("Hard time limit") == 2
    db.dispose()
