"""Read-side queries shared by the CLI and the API: study lists and study details as plain data."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from model.schema import StudyAnalysis
from worker.db.models import Analysis, Instance, Series, Study
from worker.db.states import StudyState


def list_studies(session: Session, *, state: StudyState | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Most recently active studies first, with instance counts."""
    counts = (
        select(Instance.study_id, func.count(Instance.id).label("instances"))
        .group_by(Instance.study_id)
        .subquery()
    )
    query = (
        select(Study, func.coalesce(counts.c.instances, 0))
        .outerjoin(counts, counts.c.study_id == Study.id)
        .order_by(Study.last_instance_at.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(Study.state == state)
    return [study_summary(study, instances) for study, instances in session.execute(query).all()]


def get_study(session: Session, study_instance_uid: str) -> Study | None:
    return session.scalars(
        select(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .options(selectinload(Study.series).selectinload(Series.instances))
    ).one_or_none()


def current_analysis(session: Session, study: Study) -> StudyAnalysis | None:
    """The newest analysis of the study's current revision that no later run superseded, or None."""
    row = session.scalars(select(Analysis).where(
        Analysis.study_id == study.id, Analysis.revision == study.revision, Analysis.superseded.is_(False),
        Analysis.shadow.is_(False))
        .order_by(Analysis.id.desc()).limit(1)).one_or_none()
    return StudyAnalysis.model_validate(row.result) if row is not None else None


def study_summary(study: Study, instances: int) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "state": study.state.value,
        "revision": study.revision,
        "instances": instances,
        "last_instance_at": study.last_instance_at.isoformat(),
        "completed_at": study.completed_at.isoformat() if study.completed_at else None,
    }


def study_detail(study: Study) -> dict[str, Any]:
    """A study with its series and instances."""
    instances = [i for s in study.series for i in s.instances]
    detail = study_summary(study, len(instances))
    detail.update(
        study_description=study.study_description,
        created_at=study.created_at.isoformat(),
        receiving_since=study.receiving_since.isoformat(),
        originals_purged_at=study.purged_at.isoformat() if study.purged_at else None,
        route=study.route,
        series=[
            {
                "series_instance_uid": s.series_instance_uid,
                "modality": s.modality,
                "series_number": s.series_number,
                "series_description": s.series_description,
                "instances": [
                    {
                        "sop_instance_uid": i.sop_instance_uid,
                        "sop_class_uid": i.sop_class_uid,
                        "transfer_syntax_uid": i.transfer_syntax_uid,
                        "instance_number": i.instance_number,
                        "laterality": i.laterality,
                        "revision": i.revision,
                        "analysable": i.analysable,
                        "not_analysed_reason": i.not_analysed_reason,
                        "path": i.path,
                        "size_bytes": i.size_bytes,
                        "sha256": i.sha256,
                        "calling_ae_title": i.calling_ae_title,
                        "peer_host": i.peer_host,
                        "received_at": i.received_at.isoformat(),
                        "purged_at": i.purged_at.isoformat() if i.purged_at else None,
                        "route": i.route,
                    }
                    for i in s.instances
                ],
            }
            for s in study.series
        ],
    )
    return detail
