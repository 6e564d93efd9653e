"""JSON API under ``/api``: worklist, study detail, fundus images, rerun (admin), sign-off (clinician) and chat."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from worker.api.auth import Admin, Clinician, Reader
from worker.api.chat import ChatAnswer, ChatRequest, ChatUnavailable, ask
from worker.api.context import ApiContext, Ctx
from worker.api.images import render_png
from worker.api.params import UidPath
from worker.api.studies import (
    SORT_KEYS,
    Urgency,
    WorklistQuery,
    current_analysis,
    find_study,
    instance_path,
    study_detail,
    worklist,
)
from worker.db import StudyState
from worker.signoff import SignOffRequest
from worker.pipeline.sources import ImageTooLarge

SortKey = Literal[tuple(k for key in SORT_KEYS for k in (key, f"-{key}"))]  # type: ignore[valid-type]


class WorklistPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[dict[str, Any]]
    next: str | None = None
    previous: str | None = None


class SignOffResult(BaseModel):
    study_instance_uid: str
    signed_revision: int = Field(description="the revision the clinician read")
    revision: int = Field(description="the new, signed result revision (delivered through the outbox)")
    changed: bool = Field(description="the clinician corrected something (FHIR 'amended', else 'final')")
    changes: list[dict[str, Any]]
    observer: str
    organisation: str
    signed_at: dt.datetime


class RerunResult(BaseModel):
    study_instance_uid: str
    revision: int
    state: str


def worklist_query(
    date_from: Annotated[dt.date | None, Query(description="study date from (inclusive), YYYY-MM-DD")] = None,
    date_to: Annotated[dt.date | None, Query(description="study date to (inclusive), YYYY-MM-DD")] = None,
    state: Annotated[list[StudyState], Query()] = [],  # noqa: B006 - FastAPI copies query defaults
    urgency: Annotated[list[Urgency], Query(description="referral urgency; 'pending' = no result yet")] = [],  # noqa: B006
    calling_ae: Annotated[list[str], Query(max_length=16, description="calling AE title of any instance")] = [],  # noqa: B006
    laterality: Annotated[list[Literal["R", "L"]], Query(description="an image of this eye")] = [],  # noqa: B006
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    sort: Annotated[list[SortKey], Query(description="sort keys, '-' for descending")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> WorklistQuery:
    query = WorklistQuery(date_from=date_from, date_to=date_to, states=state, urgencies=urgency,
                          calling_ae=calling_ae, laterality=laterality, patient_id=patient_id, limit=limit,
                          offset=offset)
    if sort:
        query.sort = list(sort)
    return query


def _page_url(request: Request, ctx: ApiContext, offset: int) -> str:
    kept = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
    return f"{ctx.base_url(request)}{request.url.path}?{urlencode([*kept, ('offset', str(offset))])}"


def router() -> APIRouter:
    api = APIRouter(prefix="/api", tags=["worklist and studies"])

    @api.get("/worklist", response_model=WorklistPage)
    def get_worklist(request: Request, query: Annotated[WorklistQuery, Depends(worklist_query)],
                     ctx: Ctx, _: Reader) -> WorklistPage:
        """Studies with state and referral urgency; filters are AND-ed, repeated values OR-ed."""
        with ctx.db.reading() as session:
            total, items = worklist(session, query)
        page = WorklistPage(total=total, offset=query.offset, limit=query.limit, items=items)
        if query.offset + query.limit < total:
            page.next = _page_url(request, ctx, query.offset + query.limit)
        if query.offset > 0:
            page.previous = _page_url(request, ctx, max(0, query.offset - query.limit))
        return page

    @api.get("/studies/{study_instance_uid}")
    def get_study(study_instance_uid: UidPath, request: Request, ctx: Ctx,
                  _: Reader) -> dict[str, Any]:
        """The full record of one study: instances, current result, jobs, deliveries, audit trail."""
        with ctx.db.reading() as session:
            study = find_study(session, study_instance_uid)
            if study is None:
                raise HTTPException(404, f"no study {study_instance_uid}")
            return study_detail(session, study, ctx.base_url(request))

    @api.get("/studies/{study_instance_uid}/instances/{sop_instance_uid}/image.png",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def get_image(study_instance_uid: UidPath, sop_instance_uid: UidPath, ctx: Ctx, _: Reader,
                  size: Annotated[int, Query(ge=64, le=4096, description="longest side in pixels")] = 1024) -> Response:
        """The instance's first frame as PNG (for display only; never a diagnostic rendering)."""
        with ctx.db.reading() as session:
            path = instance_path(session, study_instance_uid, sop_instance_uid)
        if path is None:
            raise HTTPException(404, f"study {study_instance_uid} has no instance {sop_instance_uid}")
        try:
            png = render_png(Path(path), size, ctx.settings.analysis.max_image_pixels)
        except FileNotFoundError:
            raise HTTPException(410, "the stored file of this instance is gone") from None
        except ImageTooLarge as exc:
            raise HTTPException(422, f"the instance cannot be rendered: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - pydicom and pixel decoders raise many types for bad data
            raise HTTPException(422, f"the instance cannot be rendered: {type(exc).__name__}") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @api.post("/studies/{study_instance_uid}/rerun", response_model=RerunResult, status_code=202)
    def rerun(study_instance_uid: UidPath, ctx: Ctx,
              principal: Admin) -> RerunResult:
        """Admin only: open a new revision and queue its analysis (audited)."""
        from worker.pipeline.jobs import Pipeline, PipelineError

        pipeline = Pipeline(ctx.settings, ctx.db, ctx.celery)
        try:
            revision = pipeline.rerun(study_instance_uid, actor=principal.actor)
        except PipelineError as exc:
            raise HTTPException(404 if str(exc).startswith("no study") else 409, str(exc)) from None
        with ctx.db.reading() as session:
            study = find_study(session, study_instance_uid)
            state = study.state.value if study else "unknown"
        return RerunResult(study_instance_uid=study_instance_uid, revision=revision, state=state)

    @api.post("/studies/{study_instance_uid}/signoff", response_model=SignOffResult, status_code=201,
              responses={403: {"description": "the token is not a clinician's"},
                         404: {"description": "no such study"},
                         409: {"description": "the revision signed is not the current one, or nothing to sign"},
                         422: {"description": "an invalid correction (condition, grade, box, image)"}})
    def sign_off(study_instance_uid: UidPath, body: SignOffRequest, ctx: Ctx,
                 principal: Clinician) -> SignOffResult:
        """Clinician only: confirm or correct the current result revision. Creates the next, signed revision,
        re-issued through the delivery outbox (SR VERIFIED with the Verifying Observer, FHIR DiagnosticReport
        ``final``/``amended`` with the clinician as resultsInterpreter, HL7 F/C); audited as ``study.signed``."""
        from worker.celery_app import DELIVER_STUDY
        from worker.signoff import SignOffError, sign

        token = next(t for t in ctx.settings.api.tokens if t.name == principal.name)
        try:
            with ctx.db.session() as session:
                row = sign(session, ctx.settings, study_instance_uid, body, token, principal.actor)
                result = SignOffResult(study_instance_uid=study_instance_uid, signed_revision=row.signed_revision,
                                       revision=row.revision, changed=row.changed,
                                       changes=row.corrections["changes"], observer=row.observer_name,
                                       organisation=row.organisation, signed_at=row.signed_at)
        except SignOffError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        try:  # a nudge only: the bookkeeper delivers the outbox rows if the broker is unreachable now
            ctx.celery.send_task(DELIVER_STUDY, kwargs={"study_instance_uid": study_instance_uid,
                                                        "revision": result.revision})
        except Exception:  # noqa: BLE001 - kombu raises many types for an unreachable broker
            pass
        return result

    @api.post("/studies/{study_instance_uid}/chat", response_model=ChatAnswer,
              responses={409: {"description": "the study has no result yet"},
                         502: {"description": "the inference worker could not answer (e.g. no model)"},
                         504: {"description": "the inference workers did not answer in time"}})
    def chat(study_instance_uid: UidPath, body: ChatRequest, ctx: Ctx,
             principal: Reader) -> ChatAnswer:
        """Ask RetinalGPT a question about a study (with optional earlier turns); the answer is grounded by the
        inference worker in the study's stored results and the exchange is audited."""
        with ctx.db.reading() as session:
            study = find_study(session, study_instance_uid)
            if study is None:
                raise HTTPException(404, f"no study {study_instance_uid}")
            if current_analysis(session, study) is None:
                raise HTTPException(409, f"study {study_instance_uid} has no result yet")
        try:
            return ask(ctx.celery, ctx.db, study_instance_uid, body, actor=principal.actor,
                       timeout=ctx.settings.api.chat_timeout_seconds, chat_text=ctx.settings.audit.chat_text)
        except ChatUnavailable as exc:
            raise HTTPException(504 if exc.timed_out else 502, str(exc)) from None

    return api
