"""Worklist and study queries shared by the JSON API and the review page.

The worklist shows every study with its state and the referral urgency of its current (not superseded)
analysis; "pending" stands for a study without one yet. Sorting by ``urgency`` puts urgent first, then
ungradable, routine, none and pending.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Select, and_, case, exists, func, select
from sqlalchemy.orm import Session

from model.schema import StudyAnalysis
from reporting.summary import measurement_row, reported_measurements
from worker.db import Analysis, AuditEvent, Delivery, Instance, Job, Series, SignOff, Study, StudyState
from worker.db.queries import current_analysis
from worker.fhir_store import FhirResource

Urgency = Literal["urgent", "ungradable", "routine", "none", "pending"]
URGENCY_RANK: dict[str, int] = {"urgent": 0, "ungradable": 1, "routine": 2, "none": 3, "pending": 4}
SORT_KEYS = ("urgency", "study_date", "received", "updated", "patient_id", "state")


@dataclass
class WorklistQuery:
    """Filters (AND of fields, OR within a list), sort keys (``-`` prefix = descending) and paging."""

    date_from: dt.date | None = None
    date_to: dt.date | None = None
    states: list[StudyState] = field(default_factory=list)
    urgencies: list[Urgency] = field(default_factory=list)
    calling_ae: list[str] = field(default_factory=list)
    laterality: list[Literal["R", "L"]] = field(default_factory=list)
    patient_id: str | None = None
    sort: list[str] = field(default_factory=lambda: ["urgency", "-received"])
    limit: int = 50
    offset: int = 0


def _current_analysis() -> Any:
    """Subquery: the newest non-superseded analysis id of each study revision that is current."""
    return (select(Analysis.study_id, func.max(Analysis.id).label("analysis_id"))
            .join(Study, and_(Study.id == Analysis.study_id, Study.revision == Analysis.revision))
            .where(Analysis.superseded.is_(False), Analysis.shadow.is_(False)).group_by(Analysis.study_id).subquery())


def _worklist_select(query: WorklistQuery) -> tuple[Select[Any], Any]:
    latest = _current_analysis()
    referral = func.coalesce(Analysis.result["referral"].as_string(), "pending")
    stmt = (select(Study, referral.label("referral"), Analysis.result["impression"].as_string().label("impression"))
            .outerjoin(latest, latest.c.study_id == Study.id)
            .outerjoin(Analysis, Analysis.id == latest.c.analysis_id))
    if query.date_from:
        stmt = stmt.where(Study.study_date >= query.date_from.strftime("%Y%m%d"))
    if query.date_to:
        stmt = stmt.where(Study.study_date <= query.date_to.strftime("%Y%m%d"))
    if query.states:
        stmt = stmt.where(Study.state.in_(query.states))
    if query.urgencies:
        stmt = stmt.where(referral.in_(query.urgencies))
    if query.calling_ae:
        stmt = stmt.where(exists().where(Instance.study_id == Study.id, Instance.calling_ae_title.in_(query.calling_ae)))
    if query.laterality:
        stmt = stmt.where(exists().where(Instance.study_id == Study.id, Instance.laterality.in_(query.laterality)))
    if query.patient_id:
        stmt = stmt.where(Study.patient_id == query.patient_id)
    return stmt, referral


def worklist(session: Session, query: WorklistQuery) -> tuple[int, list[dict[str, Any]]]:
    """(total matching, one page of worklist rows)."""
    stmt, referral = _worklist_select(query)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rank = case(*[(referral == name, r) for name, r in URGENCY_RANK.items()], else_=len(URGENCY_RANK))
    columns = {"urgency": rank, "study_date": Study.study_date, "received": Study.created_at,
               "updated": Study.updated_at, "patient_id": Study.patient_id, "state": Study.state}
    order = []
    for key in query.sort:
        column = columns[key.removeprefix("-")]
        order.append(column.desc() if key.startswith("-") else column.asc())
    rows = session.execute(stmt.order_by(*order, Study.id.desc()).offset(query.offset).limit(query.limit)).all()
    ids = [row.Study.id for row in rows]
    aggregates: dict[int, dict[str, Any]] = {i: {"instances": 0, "calling_ae_titles": set(), "laterality": set()}
                                             for i in ids}
    if ids:
        for study_id, ae, side, count in session.execute(
                select(Instance.study_id, Instance.calling_ae_title, Instance.laterality, func.count())
                .where(Instance.study_id.in_(ids))
                .group_by(Instance.study_id, Instance.calling_ae_title, Instance.laterality)):
            agg = aggregates[study_id]
            agg["instances"] += count
            agg["calling_ae_titles"].add(ae)
            if side:
                agg["laterality"].add(side)
    items = []
    for row in rows:
        study, agg = row.Study, aggregates[row.Study.id]
        items.append({**study_summary(study), "referral": row.referral, "impression": row.impression or "",
                      "instances": agg["instances"], "calling_ae_titles": sorted(agg["calling_ae_titles"]),
                      "laterality": sorted(agg["laterality"])})
    return total, items


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def study_summary(study: Study) -> dict[str, Any]:
    date = study.study_date
    return {
        "study_instance_uid": study.study_instance_uid,
        "patient_id": study.patient_id,
        "patient_name": study.patient_name,
        "accession_number": study.accession_number,
        "study_date": f"{date[:4]}-{date[4:6]}-{date[6:]}" if date and len(date) == 8 else None,
        "study_description": study.study_description,
        "state": study.state.value,
        "revision": study.revision,
        "received_at": _iso(study.created_at),
        "updated_at": _iso(study.updated_at),
    }


def find_study(session: Session, uid: str) -> Study | None:
    return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()


def measurement_table(analysis: StudyAnalysis) -> dict[str, list[dict[str, str]]]:
    """Per image (by SOP Instance UID or file path): the measured values with their reference ranges and verdicts
    (model-emitted numbers stay in the analysis document only)."""
    out: dict[str, list[dict[str, str]]] = {}
    for img in analysis.images:
        rows = []
        for m in reported_measurements(img):
            row = measurement_row(m)
            rows.append({"key": m.key, "name": row.name, "value": row.value, "unit": row.unit,
                         "source": row.source, "reference": row.reference, "flag": row.flag})
        out[img.sop_instance_uid or img.file_path or ""] = rows
    return out


def study_detail(session: Session, study: Study, base_url: str) -> dict[str, Any]:
    """Everything about one study: series and instances (with image URLs), the current analysis with its
    measurement table, the clinician's sign-off of the current revision (None: unsigned, preliminary), jobs, deliveries, the FHIR DiagnosticReport reference and the audit trail."""
    analysis = current_analysis(session, study)
    uid = study.study_instance_uid
    series = []
    for s in session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)):
        instances = [{
            "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
            "instance_number": i.instance_number, "laterality": i.laterality, "analysable": i.analysable,
            "calling_ae_title": i.calling_ae_title, "received_at": _iso(i.received_at), "revision": i.revision,
            "image_url": f"{base_url}/api/studies/{uid}/instances/{i.sop_instance_uid}/image.png",
        } for i in session.scalars(select(Instance).where(Instance.series_id == s.id)
                                   .order_by(Instance.instance_number, Instance.id))]
        series.append({"series_instance_uid": s.series_instance_uid, "modality": s.modality,
                       "series_number": s.series_number, "series_description": s.series_description,
                       "instances": instances})
    report = session.scalars(select(FhirResource.resource_id).where(
        FhirResource.study_id == study.id, FhirResource.resource_type == "DiagnosticReport",
        FhirResource.is_current.is_(True))).first()
    jobs = [{"id": j.id, "kind": j.kind.value, "state": j.state.value, "revision": j.revision,
             "model": f"{j.model_name} {j.model_version}".strip(), "attempts": j.attempts, "error": j.error,
             "started_at": _iso(j.started_at), "finished_at": _iso(j.finished_at)}
            for j in session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id))]
    deliveries = [{"destination": d.destination, "object": d.object_kind.value, "state": d.state.value,
                   "revision": d.revision, "attempts": d.attempts, "last_error": d.last_error,
                   "delivered_at": _iso(d.delivered_at)}
                  for d in session.scalars(select(Delivery).where(Delivery.study_id == study.id).order_by(Delivery.id))]
    signed = session.scalars(select(SignOff).where(SignOff.study_id == study.id,
                                                   SignOff.revision == study.revision)).first()
    signoff = None if signed is None else {
        "signed_revision": signed.signed_revision, "revision": signed.revision, "actor": signed.actor,
        "observer": signed.observer_name, "organisation": signed.organisation, "signed_at": _iso(signed.signed_at),
        "changed": signed.changed, "changes": signed.corrections.get("changes", []), "comment": signed.comment}
    audit = [{"at": _iso(a.at), "actor": a.actor, "action": a.action, "detail": a.detail}
             for a in session.scalars(select(AuditEvent).where(AuditEvent.study_instance_uid == uid)
                                      .order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(50))]
    return {
        **study_summary(study),
        "referral": analysis.referral.value if analysis else "pending",
        "series": series,
        "analysis": analysis.model_dump(mode="json") if analysis else None,
        "measurements": measurement_table(analysis) if analysis else {},
        "signoff": signoff,
        "fhir_diagnostic_report": f"{base_url}/fhir/r4/DiagnosticReport/{report}" if report else None,
        "jobs": jobs,
        "deliveries": deliveries,
        "audit": audit,
    }


def instance_path(session: Session, study_uid: str, sop_uid: str) -> str | None:
    """The stored file of an instance of this study (None when the study has no such instance)."""
    return session.scalar(select(Instance.path).join(Study, Study.id == Instance.study_id).where(
        Study.study_instance_uid == study_uid, Instance.sop_instance_uid == sop_uid))
