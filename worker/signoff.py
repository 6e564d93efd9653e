"""Clinician sign-off of a study's current result revision (issue 17 item 1).

A clinician (API token role ``clinician``) confirms or corrects the AI result of the study's *current* revision:
grades per condition per eye, each lesion box right or wrong, missed lesions with a drawn box, the referral and a
free-text comment. Signing, in one transaction:

* stores the next revision of the study (``revision + 1``): an :class:`~worker.db.Analysis` holding the
  clinician's values (model monitoring counts the AI's analysis of the signed revision, never this one):
  a grade the clinician set or corrected becomes a finding with the source ``clinician`` and no AI probability;
  wrong boxes are removed, missed ones added with the source ``clinician``; the comment becomes a note; and a
  :class:`~worker.db.SignOff` row keeping who signed, as which observer and organisation, what changed and the AI's
  original analysis;
* creates that revision's delivery rows (the outbox, :func:`worker.pipeline.delivery.create_outbox`), so the
  bookkeeper re-issues the SR (VERIFIED, Verifying Observer; it lists the previous SR as predecessor), the FHIR
  DiagnosticReport (``final``, or ``amended`` when something changed, with the clinician as resultsInterpreter)
  and the HL7 ORU (``F``, ``C`` when correcting a signed result) — see :mod:`reporting.verification`;
* writes an audit event ``study.signed`` naming the identity and every change.

A sign-off names the revision it read; any other revision is stale (:class:`StaleRevision`, HTTP 409), so a
clinician never signs a result they did not see (a late image opened a new revision, or someone else signed).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from model.schema import (
    Condition,
    Finding,
    Laterality,
    Lesion,
    LesionType,
    Referral,
    Source,
    StudyAnalysis,
    max_grade,
)
from reporting.verification import Verification, is_verified_note, verification_note
from worker.config import ApiToken, Settings
from worker.db import Analysis, AuditEvent, SignOff, Study, StudyState, utcnow

ACTION = "study.signed"
SIGNABLE_STATES = frozenset({StudyState.ANALYSED, StudyState.DELIVERING, StudyState.DELIVERED, StudyState.FAILED})
"""A study whose current revision has an analysis and is not being re-analysed."""
Eye = Literal["R", "L"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GradeCorrection(_Strict):
    """The clinician's grade of one condition in one eye (on the condition's own scale, ``model.schema``)."""

    eye: Eye
    condition: Condition
    grade: int = Field(ge=0)

    @model_validator(mode="after")
    def _in_scale(self) -> GradeCorrection:
        top = max_grade(self.condition)
        if self.grade > top:
            raise ValueError(f"{self.condition.value} grade {self.grade} is outside 0..{top}")
        return self


class LesionVerdict(_Strict):
    """Whether the AI's lesion box number ``index`` (0-based, as listed for that image) is right or wrong."""

    sop_instance_uid: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0)
    verdict: Literal["right", "wrong"]


class MissedLesion(_Strict):
    """A lesion the AI missed, drawn by the clinician: normalised box ``[x0, y0, x1, y1]`` (origin top-left)."""

    sop_instance_uid: str = Field(min_length=1, max_length=64)
    type: LesionType
    box: tuple[float, float, float, float]

    @field_validator("box")
    @classmethod
    def _box(cls, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"box {list(box)} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
        return box


class SignOffRequest(_Strict):
    """The body of ``POST /api/studies/{uid}/signoff``."""

    revision: int = Field(ge=1, description="the result revision the clinician read (409 when not current)")
    decision: Literal["confirm", "correct"]
    grades: list[GradeCorrection] = Field(default_factory=list, max_length=100)
    lesions: list[LesionVerdict] = Field(default_factory=list, max_length=1000)
    missed: list[MissedLesion] = Field(default_factory=list, max_length=1000)
    referral: Referral | None = None
    comment: str | None = Field(default=None, max_length=4000)

    @model_validator(mode="after")
    def _confirm_changes_nothing(self) -> SignOffRequest:
        wrong = any(v.verdict == "wrong" for v in self.lesions)
        if self.decision == "confirm" and (self.grades or wrong or self.missed or self.referral is not None):
            raise ValueError("a confirmation carries no corrections; use decision 'correct'")
        keys = [(g.eye, g.condition) for g in self.grades]
        if len(keys) != len(set(keys)):
            raise ValueError("one grade per condition per eye")
        return self


class SignOffError(Exception):
    """A sign-off that cannot be applied; ``status`` is the HTTP status the API answers."""

    status = 422


class StudyNotFound(SignOffError):
    status = 404


class StaleRevision(SignOffError):
    status = 409


class NotSignable(SignOffError):
    status = 409


def verification_of(row: SignOff) -> Verification:
    return Verification(observer_name=row.observer_name, observer_id=row.actor, organisation=row.organisation,
                        verified_at=row.signed_at, changed=row.changed, corrects_signed=row.corrects_signed)


def signoff_for(session: Session, study_id: int, revision: int) -> SignOff | None:
    """The sign-off that created ``revision``, or None (an unsigned AI result)."""
    return session.scalars(select(SignOff).where(SignOff.study_id == study_id, SignOff.revision == revision)).first()


def observer(token: ApiToken, settings: Settings) -> tuple[str, str]:
    """(DICOM person name, organisation) of a clinician token."""
    assert token.observer_name is not None  # required for clinician tokens (worker.config.ApiToken)
    name = token.observer_name
    organisation = token.organisation or settings.reporting.institution_name
    if not organisation:
        raise NotSignable(f"token {token.name!r} has no organisation and reporting.institution_name is unset: "
                          "the SR's Verifying Organization is required (PS3.3 C.17.2)")
    return name, organisation


def _images(analysis: StudyAnalysis, eye: str) -> list[Any]:
    return [img for img in analysis.images if img.laterality == Laterality(eye)]


def corrected(analysis: StudyAnalysis, request: SignOffRequest) -> tuple[StudyAnalysis, list[dict[str, Any]]]:
    """The clinician's version of ``analysis`` and the list of changes (empty: confirmed as it was)."""
    result = analysis.model_copy(deep=True)
    changes: list[dict[str, Any]] = []
    for fix in request.grades:
        images = _images(result, fix.eye)
        if not images:
            raise SignOffError(f"the study has no image of eye {fix.eye}")
        for img in images:
            finding = next((f for f in img.findings if f.condition == fix.condition), None)
            before = finding.grade if finding is not None else None
            if finding is not None and before == fix.grade:
                continue
            graded = Finding(condition=fix.condition, grade=fix.grade, source=Source.CLINICIAN)
            if finding is None:
                img.findings.append(graded)
                img.not_assessed = [c for c in img.not_assessed if c != fix.condition]
            else:
                img.findings[img.findings.index(finding)] = graded
            changes.append({"kind": "grade", "eye": fix.eye, "sop_instance_uid": img.sop_instance_uid,
                            "condition": fix.condition.value, "ai": before, "clinician": fix.grade})
    by_uid = {img.sop_instance_uid: img for img in result.images if img.sop_instance_uid}
    wrong: dict[str, set[int]] = {}
    for verdict in request.lesions:
        img = by_uid.get(verdict.sop_instance_uid)
        if img is None:
            raise SignOffError(f"image {verdict.sop_instance_uid} is not part of this result")
        if verdict.index >= len(img.lesions):
            raise SignOffError(f"image {verdict.sop_instance_uid} has no lesion {verdict.index}")
        if verdict.verdict == "wrong":
            wrong.setdefault(verdict.sop_instance_uid, set()).add(verdict.index)
    for uid, indexes in wrong.items():
        img = by_uid[uid]
        for index in sorted(indexes):
            lesion = img.lesions[index]
            changes.append({"kind": "lesion_wrong", "sop_instance_uid": uid, "index": index,
                            "type": lesion.type.value, "box": list(lesion.box)})
        img.lesions = [lesion for n, lesion in enumerate(img.lesions) if n not in indexes]
    for missed in request.missed:
        img = by_uid.get(missed.sop_instance_uid)
        if img is None:
            raise SignOffError(f"image {missed.sop_instance_uid} is not part of this result")
        img.lesions.append(Lesion(type=missed.type, box=missed.box, source=Source.CLINICIAN))
        changes.append({"kind": "lesion_missed", "sop_instance_uid": missed.sop_instance_uid,
                        "type": missed.type.value, "box": list(missed.box)})
    if request.referral is not None and request.referral != result.referral:
        changes.append({"kind": "referral", "ai": result.referral.value, "clinician": request.referral.value})
        result.referral, result.referral_source = request.referral, Source.CLINICIAN
    return result, changes


def sign(session: Session, settings: Settings, study_instance_uid: str, request: SignOffRequest,
         token: ApiToken, actor: str, *, now: dt.datetime | None = None) -> SignOff:
    """Apply a sign-off in the caller's transaction (see the module docstring); returns the new row."""
    from worker.pipeline.delivery import create_outbox, latest_analysis

    study = session.scalars(select(Study).where(Study.study_instance_uid == study_instance_uid)
                            .with_for_update()).one_or_none()
    if study is None:
        raise StudyNotFound(f"no study {study_instance_uid}")
    if request.revision != study.revision:
        raise StaleRevision(f"revision {request.revision} is not the current result revision "
                            f"({study.revision}); reload the study and sign what it shows now")
    row = latest_analysis(session, study, study.revision)
    if study.state not in SIGNABLE_STATES or row is None or row.superseded:
        raise NotSignable(f"study {study_instance_uid} revision {study.revision} has no result to sign "
                          f"(state {study.state.value})")
    name, organisation = observer(token, settings)
    original = StudyAnalysis.model_validate(row.result)
    result, changes = corrected(original, request)
    now = now or utcnow()
    previous = signoff_for(session, study.id, study.revision)
    verification = Verification(observer_name=name, observer_id=actor, organisation=organisation, verified_at=now,
                                changed=bool(changes), corrects_signed=previous is not None)
    result.notes = [n for n in result.notes if not is_verified_note(n)]  # re-signing: the new one counts
    result.notes.insert(0, verification_note(verification))
    if request.comment:
        result.notes.append(f"Clinician comment: {request.comment}")
    new_revision = study.revision + 1
    result.revision, result.created = new_revision, now
    session.add(Analysis(study_id=study.id, revision=new_revision, model_name=row.model_name,
                         model_version=row.model_version, result=result.model_dump(mode="json"), created_at=now))
    signoff = SignOff(study_id=study.id, signed_revision=study.revision, revision=new_revision, actor=actor,
                      observer_name=name, organisation=organisation, signed_at=now, changed=bool(changes),
                      corrects_signed=previous is not None,
                      corrections={"decision": request.decision, "changes": changes,
                                   "lesions_right": [v.model_dump() for v in request.lesions if v.verdict == "right"],
                                   "request": request.model_dump(mode="json")},
                      original=row.result, comment=request.comment)
    session.add(signoff)
    study.revision, study.state = new_revision, StudyState.ANALYSED
    create_outbox(session, settings, study, new_revision)
    session.add(AuditEvent(actor=actor, action=ACTION, study_instance_uid=study_instance_uid, at=now,
                           detail={"signed_revision": new_revision - 1, "revision": new_revision,
                                   "decision": request.decision, "observer": name, "organisation": organisation,
                                   "changed": bool(changes), "changes": changes,
                                   "comment": request.comment, "corrects_signed": previous is not None}))
    session.flush()
    return signoff
