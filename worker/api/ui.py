"""The review page: server-rendered HTML (Jinja2) plus one small script, no build step.

``/ui/`` is the worklist; ``/ui/studies/{uid}`` shows the fundus images with lesion boxes and the optic disc /
cup outline drawn from the stored :class:`~model.schema.StudyAnalysis` as SVG over the image, the findings
(conditions the model was not trained on as "not assessed"), the measured values against their reference ranges,
the model-vs-measured disagreement flags, and a chat box that calls ``POST /api/studies/{uid}/chat``.
The browser authenticates with the same bearer tokens, entered once in ``/ui/login`` and kept in an HttpOnly,
SameSite=Strict cookie.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from model.schema import ImageAnalysis, LandmarkType, LesionType, Referral, Source, StudyAnalysis, max_grade
from reporting import summary
from worker.api.auth import SESSION_COOKIE, Reader, principal_for
from worker.api.context import Ctx
from worker.api.params import UidPath
from worker.api.routes import worklist_query
from worker.api.studies import URGENCY_RANK, WorklistQuery, find_study, study_detail, worklist
from worker.db import StudyState
from worker.signoff import SIGNABLE_STATES

HERE = Path(__file__).parent
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SESSION_SECONDS = 12 * 3600

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals.update(max_grade=max_grade, condition_name=summary.condition_name,
                             lesion_types=[t.value for t in LesionType], referrals=[r.value for r in Referral])


def static_files() -> StaticFiles:
    return StaticFiles(directory=str(HERE / "static"))


def _safe_next(target: str | None) -> str:
    """Only local review-page paths are followed after login (no open redirect)."""
    return target if target and target.startswith("/ui/") and not target.startswith("//") else "/ui/"


def overlay(img: ImageAnalysis, width: int, height: int) -> dict[str, Any]:
    """Shapes in image pixel coordinates: lesion boxes, disc and cup outlines (contour, else the ellipse in
    their box) and the fovea."""
    def box(b: tuple[float, float, float, float]) -> dict[str, float]:
        return {"x": b[0] * width, "y": b[1] * height, "w": (b[2] - b[0]) * width, "h": (b[3] - b[1]) * height}

    outlines = []
    for kind in (LandmarkType.OPTIC_DISC, LandmarkType.OPTIC_CUP):
        mark = img.landmark(kind)
        if mark is None:
            continue
        if mark.contour:
            points = " ".join(f"{x * width:.1f},{y * height:.1f}" for x, y in mark.contour)
            outlines.append({"kind": kind.value, "points": points})
        elif mark.box:
            b = box(mark.box)
            outlines.append({"kind": kind.value, "cx": b["x"] + b["w"] / 2, "cy": b["y"] + b["h"] / 2,
                             "rx": b["w"] / 2, "ry": b["h"] / 2})
    fovea = img.landmark(LandmarkType.FOVEA)
    return {
        "width": width, "height": height, "font": height * 0.035,
        "lesions": [{**box(lesion.box), "score": lesion.score, "clinician": lesion.source == Source.CLINICIAN,
                     "label": lesion.type.value.replace("_", " ")
                     + (" (clinician)" if lesion.source == Source.CLINICIAN else "")} for lesion in img.lesions],
        "outlines": outlines,
        "fovea": {"x": fovea.center[0] * width, "y": fovea.center[1] * height, "r": max(width, height) * 0.012}
        if fovea else None,
    }


def findings_list(analysis: StudyAnalysis, img: ImageAnalysis) -> list[dict[str, str]]:
    """The findings list of one image: each finding (``present`` / ``absent``), each condition the model was not
    trained on (``not-assessed``), or one line saying why there is nothing (ungradable, model not run)."""
    rows = [{"text": summary.finding_text(f), "state": "present" if f.present else "absent"} for f in img.findings]
    rows += [{"text": f"{summary.condition_name(c)}: {summary.NOT_ASSESSED} (model not trained on it)",
              "state": "not-assessed"} for c in summary.not_assessed(img)]
    return rows or [{"text": line, "state": "none"} for line in summary.image_summary(analysis, img)]


def image_views(detail: dict[str, Any], analysis: StudyAnalysis | None) -> list[dict[str, Any]]:
    """One view per stored instance: its PNG URL and, when analysed, overlay, findings and quality."""
    views = []
    for series in detail["series"]:
        for inst in series["instances"]:
            img = analysis.image(inst["sop_instance_uid"]) if analysis else None
            view: dict[str, Any] = {"instance": inst, "analysis": img}
            if img is not None:
                view["overlay"] = overlay(img, img.width or 1000, img.height or 1000)
                view["findings"] = findings_list(analysis, img)
                view["measurements"] = detail["measurements"].get(inst["sop_instance_uid"], [])
                view["flags"] = [summary.disagreement_text(d) for d in img.disagreements]
            views.append(view)
    return views


def without_empty_filters(request: Request) -> None:
    """The worklist form submits every field; empty ones mean "any": redirect to the URL without them (before
    the filters are validated)."""
    params = request.query_params.multi_items()
    kept = [(k, v) for k, v in params if v != ""]
    if len(kept) != len(params):
        raise HTTPException(303, "filters without empty values", headers={"Location": f"/ui/?{urlencode(kept)}"})


def router() -> APIRouter:
    ui = APIRouter(prefix="/ui", include_in_schema=False)

    @ui.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str | None = None) -> Response:
        return templates.TemplateResponse(request, "login.html", {"next": _safe_next(next), "error": None})

    @ui.post("/login")
    async def login(request: Request, ctx: Ctx) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        token = (form.get("token") or [""])[0].strip()
        target = _safe_next((form.get("next") or [None])[0])
        principal = principal_for(token, ctx.settings.api.tokens) if token else None
        if principal is None:
            return templates.TemplateResponse(request, "login.html", {"next": target, "error": "Unknown token."},
                                              status_code=401)
        if not principal.may("read"):
            return templates.TemplateResponse(request, "login.html", {
                "next": target, "error": "This token may only send studies (DICOMweb STOW-RS), not read them."},
                status_code=403)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    @ui.post("/logout")
    def logout() -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @ui.get("/", response_class=HTMLResponse, dependencies=[Depends(without_empty_filters)])
    def worklist_page(request: Request, query: Annotated[WorklistQuery, Depends(worklist_query)],
                      ctx: Ctx, principal: Reader) -> Response:
        with ctx.db.reading() as session:
            total, items = worklist(session, query)
        kept = [(k, v) for k, v in request.query_params.multi_items() if k != "offset"]
        pages = {}
        if query.offset + query.limit < total:
            pages["next"] = "?" + urlencode([*kept, ("offset", query.offset + query.limit)])
        if query.offset > 0:
            pages["previous"] = "?" + urlencode([*kept, ("offset", max(0, query.offset - query.limit))])
        return templates.TemplateResponse(request, "worklist.html", {
            "items": items, "total": total, "query": query, "pages": pages, "principal": principal,
            "states": [s.value for s in StudyState], "urgencies": list(URGENCY_RANK)})

    @ui.get("/studies/{study_instance_uid}", response_class=HTMLResponse)
    def study_page(study_instance_uid: UidPath, request: Request, ctx: Ctx,
                   principal: Reader) -> Response:
        with ctx.db.reading() as session:
            study = find_study(session, study_instance_uid)
            if study is None:
                raise HTTPException(404, f"no study {study_instance_uid}")
            detail = study_detail(session, study, "")
        analysis = StudyAnalysis.model_validate(detail["analysis"]) if detail["analysis"] else None
        signing = (principal.may("clinician") and analysis is not None
                   and StudyState(detail["state"]) in SIGNABLE_STATES)
        return templates.TemplateResponse(request, "study.html", {
            "study": detail, "analysis": analysis, "views": image_views(detail, analysis), "principal": principal,
            "signing": signing})

    return ui
