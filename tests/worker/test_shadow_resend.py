"""A shadow analysis whose Celery message is lost is sent again by the bookkeeper (issue 17 item 3).

Real registry (v1 active, v2 put in shadow with ``retinalgpt model shadow v2``, which audits when), real SQLite
database, real Redis broker (a private DB index) and the real :meth:`Bookkeeper.sweep`; what it sends is read
back from the broker's ``inference`` queue. Of six analysed studies only the ones analysed by the active model
after the shadow version was set, longer than ``pipeline.requeue_after_seconds`` ago, on their current,
unsigned revision and without v2's analysis are re-sent, at the shadow priority, newest first,
``pipeline.shadow_resend_per_sweep`` a sweep, each at most ``pipeline.max_attempts`` times.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from tests.support.model_site import two_version_site
from tests.support.services import redis_database
from worker.celery_app import SHADOW_STUDY, make_celery, shadow_priority
from worker.cli.app import app as cli
from worker.db import Analysis, AuditEvent, Database, SignOff, Study, StudyState, utcnow
from worker.pipeline.bookkeeper import Bookkeeper
from worker.pipeline.jobs import Pipeline

MINUTE = dt.timedelta(minutes=1)


def _queued(settings) -> list[tuple[str, dict, int | None]]:
    """(task, kwargs, priority) of every message waiting in the inference queue, taken off it."""
    out = []
    with make_celery(settings).connection_for_read() as connection:
        queue = connection.SimpleQueue("inference")
        while True:
            try:
                message = queue.get(timeout=0.5)
            except queue.Empty:
                break
            out.append((message.headers["task"], message.payload[1], message.properties.get("priority")))
            message.ack()
        queue.close()
    return out


def _study(session, uid: str, analysed: dt.datetime, *, version: str = "v1", revision: int = 1,
           shadow: bool = False, signed: bool = False) -> None:
    study = Study(study_instance_uid=uid, state=StudyState.DELIVERED, revision=revision)
    session.add(study)
    session.flush()
    session.add(Analysis(study_id=study.id, revision=1, model_name="retinalgpt", model_version=version,
                         result={}, created_at=analysed))
    if shadow:
        session.add(Analysis(study_id=study.id, revision=1, model_name="retinalgpt", model_version="v2",
                             result={}, created_at=analysed, shadow=True))
    if signed:
        session.add(Analysis(study_id=study.id, revision=2, model_name="retinalgpt", model_version=version,
                             result={}, created_at=analysed))
        session.add(SignOff(study_id=study.id, signed_revision=1, revision=2, actor="api:dr", observer_name="A^B",
                            organisation="Clinic", signed_at=analysed, changed=False, corrects_signed=False,
                            corrections={}, original={}))


def test_lost_shadow_messages_are_sent_again_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with redis_database() as broker:
        config = tmp_path / "retinalgpt.toml"
        config.write_text(f'home = "{tmp_path / "home"}"\n[broker]\nurl = "{broker}"\n'
                          "[pipeline]\nrequeue_after_seconds = 2\nshadow_resend_per_sweep = 2\nmax_attempts = 2\n")
        settings = two_version_site(config, monkeypatch)
        db = Database(settings.database.url)
        bookkeeper = Bookkeeper(Pipeline(settings, db, make_celery(settings)))
        assert bookkeeper.sweep()["shadows"] == 0 and _queued(settings) == []  # no shadow version

        result = CliRunner().invoke(cli, ["model", "shadow", "v2"])
        assert result.exit_code == 0, result.output
        now = utcnow()
        with db.session() as session:
            session.execute(update(AuditEvent).where(AuditEvent.action == "model.shadow")
                            .values(at=now - 30 * MINUTE))
            _study(session, "1.2.3.1", now - 5 * MINUTE)  # lost: sent again
            _study(session, "1.2.3.2", now - 2 * MINUTE)  # lost, newer: sent first
            _study(session, "1.2.3.3", now - 10 * MINUTE)  # lost, oldest: past this sweep's limit of two
            _study(session, "1.2.3.4", now - 5 * MINUTE, shadow=True)  # v2 has read it
            _study(session, "1.2.3.5", now - 40 * MINUTE)  # analysed before the shadow version was set
            _study(session, "1.2.3.6", now - 5 * MINUTE, revision=2, signed=True)  # current revision is signed
            _study(session, "1.2.3.7", utcnow())  # just analysed: its own message may still come
        priority = shadow_priority(broker)
        assert priority == 9

        def sent(*uids: str) -> list[tuple[str, dict, int | None]]:
            return [(SHADOW_STUDY, {"study_instance_uid": uid, "revision": 1, "version": "v2"}, priority)
                    for uid in uids]

        assert bookkeeper.sweep()["shadows"] == 2
        assert _queued(settings) == sent("1.2.3.2", "1.2.3.1")
        assert bookkeeper.sweep()["shadows"] == 1  # the two just sent wait requeue_after; the third now
        assert _queued(settings) == sent("1.2.3.3")
        with db.session() as session:  # the first one's shadow analysis arrived
            study_id = session.query(Study.id).filter(Study.study_instance_uid == "1.2.3.2").scalar()
            session.add(Analysis(study_id=study_id, revision=1, model_name="retinalgpt", model_version="v2",
                                 result={}, shadow=True))
        time.sleep(2.1)
        assert bookkeeper.sweep()["shadows"] == 2  # still lost after requeue_after: a second attempt each
        assert _queued(settings) == sent("1.2.3.7", "1.2.3.1")  # newest first
        assert bookkeeper.sweep()["shadows"] == 1 and _queued(settings) == sent("1.2.3.3")
        time.sleep(2.1)
        assert bookkeeper.sweep()["shadows"] == 1  # 1.2.3.1 and .3 have had max_attempts; .7 its second
        assert _queued(settings) == sent("1.2.3.7")

        assert CliRunner().invoke(cli, ["model", "shadow", "--off"]).exit_code == 0
        assert bookkeeper.sweep()["shadows"] == 0 and _queued(settings) == []
        db.dispose()
