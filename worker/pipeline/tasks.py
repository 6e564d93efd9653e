"""Celery tasks of the pipeline, registered on an app built from the configuration.

- ``retinalgpt.process_study(job_id)`` (queue ``inference``): analyse a study revision (its delivery rows are
  created with the analysis), then nudge the delivery queue; if that message is lost, the bookkeeper sends it.
- ``retinalgpt.deliver_study(study_instance_uid, revision)`` (queue ``delivery``): build the result objects
  once and send them to every destination.
- ``retinalgpt.answer_question(study_instance_uid, question, history)`` (queue ``inference``): a follow-up
  question about a study answered by RetinalGPT, grounded in the study's stored results (audited by the API).

Each worker process opens its own database engine (engines must not cross a fork) and loads the model and the
measurement pipeline once, on first use.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Celery, Task
from sqlalchemy import select

from worker.celery_app import ANSWER_QUESTION, DELIVER_STUDY, PROCESS_STUDY, SHADOW_STUDY
from worker.config import Settings
from worker.db import Analysis, Database, Instance, Study
from worker.pipeline.jobs import Pipeline, PipelineError
from worker.pipeline.limits import analysis_options, chat_options, delivery_options, record_timeout

log = logging.getLogger(__name__)

_databases: dict[tuple[int, str], Database] = {}


def _db(settings: Settings) -> Database:
    """This process's engine for the database of ``settings``: one per (process, URL), so a forked pool
    process opens its own connections and tasks registered for another configuration in the same process
    (:func:`register_tasks` is called once per app) never read the first configuration's database."""
    key = (os.getpid(), settings.database.url)
    if key not in _databases:
        for stale in [k for k in _databases if k[0] != key[0]]:
            del _databases[stale]  # inherited from the parent across fork: never used here
        _databases[key] = Database(settings.database.url)
    return _databases[key]


def register_tasks(app: Celery, settings: Settings) -> None:
    """Define the pipeline tasks on ``app`` bound to ``settings``.

    ``shared=False``: Celery otherwise adds every task to each app created later in the process, where the
    first registration of a name wins, so a second app (another configuration, a test) would run tasks bound
    to the first app's settings."""

    def analysis_timed_out(task: Task, exc: BaseException, task_id: str, args: tuple, kwargs: dict,
                           einfo: object) -> None:
        record_timeout(settings, _db(settings), kwargs.get("job_id", args[0] if args else -1), exc)

    @app.task(name=PROCESS_STUDY, shared=False, acks_late=True, reject_on_worker_lost=True,
              on_failure=analysis_timed_out, **analysis_options(settings))
    def process_study(job_id: int) -> dict[str, Any]:
        from worker.pipeline.processing import run_job

        db = _db(settings)
        outcome = run_job(settings, db, job_id)
        if outcome.status == "analysed":
            try:
                Pipeline(settings, db, app).send_delivery(outcome.study_instance_uid, outcome.revision)
            except Exception:  # noqa: BLE001 - the delivery rows are pending; the bookkeeper sends them
                log.exception("cannot queue the delivery of study %s revision %d; the bookkeeper will",
                              outcome.study_instance_uid, outcome.revision)
            _send_shadow(app, settings, outcome.study_instance_uid, outcome.revision)
        return {"status": outcome.status, "study": outcome.study_instance_uid, "revision": outcome.revision,
                "detail": outcome.detail}

    @app.task(name=SHADOW_STUDY, shared=False, acks_late=True, reject_on_worker_lost=True,
              **analysis_options(settings))
    def shadow_study(study_instance_uid: str, revision: int, version: str) -> str:
        from worker.pipeline.processing import run_shadow

        return run_shadow(settings, _db(settings), study_instance_uid, revision, version)

    @app.task(name=DELIVER_STUDY, shared=False, acks_late=True, reject_on_worker_lost=True,
              **delivery_options(settings))
    def deliver_study(study_instance_uid: str, revision: int) -> str:
        from worker.pipeline.delivery import deliver_revision

        return deliver_revision(settings, _db(settings), study_instance_uid, revision).value

    @app.task(name=ANSWER_QUESTION, shared=False, **chat_options(settings))
    def answer_question(study_instance_uid: str, question: str, history: list[dict[str, str]] | None = None) -> dict:
        return answer(settings, _db(settings), study_instance_uid, question, history or [])


def _send_shadow(app: Celery, settings: Settings, study_instance_uid: str, revision: int) -> None:
    """Queue the shadow candidate's analysis of a study just analysed, at the lowest priority (best effort: a
    message that is lost is sent again by the bookkeeper, :meth:`worker.pipeline.bookkeeper.Bookkeeper.sweep`)."""
    from model.registry import ModelRegistry, RegistryError

    try:
        candidate = ModelRegistry(settings.model.registry).shadow()
    except RegistryError:
        log.exception("cannot read the shadow model version")
        return
    if candidate is None or not settings.model.enabled:
        return
    try:
        Pipeline(settings, _db(settings), app).send_shadow(study_instance_uid, revision, candidate.version)
    except Exception:  # noqa: BLE001 - see above
        log.exception("cannot queue the shadow analysis of study %s revision %d", study_instance_uid, revision)


def answer(
    settings: Settings, db: Database, study_instance_uid: str, question: str, history: list[dict[str, str]]
) -> dict[str, Any]:
    """Answer ``question`` about the study's first gradable image with the study's results as context."""
    from model.chat import study_context
    from model.schema import StudyAnalysis
    from worker.pipeline.sources import decode_limits, load_dicom
    from worker.runtime import analyzer

    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)).one_or_none()
        if study is None:
            raise PipelineError(f"no study {study_instance_uid}")
        row = session.scalars(select(Analysis).where(Analysis.study_id == study.id, Analysis.superseded.is_(False),
                                                   Analysis.shadow.is_(False))
                              .order_by(Analysis.revision.desc(), Analysis.id.desc())).first()
        if row is None:
            raise PipelineError(f"study {study_instance_uid} has no results yet")
        analysis = StudyAnalysis.model_validate(row.result)
        gradable = [i.sop_instance_uid for i in analysis.images if i.quality is None or i.quality.gradable]
        uid = (gradable or [analysis.images[0].sop_instance_uid])[0]
        path = session.scalars(select(Instance.path).where(Instance.sop_instance_uid == uid)).one()
    engine = analyzer(settings).engine
    if engine is None:
        raise PipelineError("RetinalGPT is not available on this worker; chat needs a model")
    turns = [(history[i]["content"], history[i + 1]["content"]) for i in range(0, len(history) - 1, 2)
             if history[i].get("role") == "user" and history[i + 1].get("role") == "assistant"]
    text = engine.ask(load_dicom(Path(path), decode_limits(settings)).rgb, question, history=turns,
                      context=study_context(analysis))
    identity = engine.identity  # audited once, by the entry point that asked (worker/pipeline/chat_audit.py)
    return {"answer": text, "model": {"name": identity.name, "version": identity.version,
                                      "device_uid": identity.device_uid}}
