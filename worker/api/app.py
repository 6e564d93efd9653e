"""The FastAPI application: routers, error handling, CORS, request size limit, metrics and the review page."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from celery import Celery
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.api import dicomweb, fhir, routes, stow, ui
from worker.api.auth import SESSION_COOKIE, Reader
from worker.api.context import ApiContext, Ctx
from worker.api.limits import RequestSizeLimit
from worker.api.ops import HttpMetrics, PipelineCollector, readiness
from worker.config import Settings
from worker.db import Database
from worker.logsetup import ACCESS_LOGGER, access_line
from worker.monitoring import ModelCollector, ModelMonitor

FHIR_PREFIX = "/fhir/"
access_log = logging.getLogger(ACCESS_LOGGER)


def create_app(settings: Settings, *, db: Database | None = None, celery: Celery | None = None) -> FastAPI:
    """The API for ``settings``; ``db`` and ``celery`` default to ones built from the settings."""
    from worker.celery_app import make_celery

    ctx = ApiContext(settings=settings, db=db or Database(settings.database.url, echo=settings.database.echo),
                     celery=celery or make_celery(settings))
    app = FastAPI(
        title="RetinalGPT Worker API",
        version=fhir.software_version(),
        description=("FHIR R4 read/search of fundus analysis results, the ophthalmology worklist, follow-up "
                     "questions about a study, and the review page. Authenticate with `Authorization: Bearer "
                     "<token>`; tokens have the read, admin or sender role (sender: DICOMweb STOW-RS only)."),
    )
    app.state.context = ctx
    registry = CollectorRegistry()
    registry.register(PipelineCollector(ctx.db, ctx.celery, settings))
    monitor = ModelMonitor(ctx.db, settings) if settings.monitoring.enabled else None
    if monitor is not None:
        registry.register(ModelCollector(monitor))
    http_metrics = HttpMetrics(registry)

    _install_error_handlers(app)
    app.include_router(fhir.router())
    app.include_router(routes.router())
    app.include_router(stow.router())
    app.include_router(dicomweb.router())
    app.include_router(ui.router())
    app.mount("/ui/static", ui.static_files(), name="static")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=303)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """Liveness: the process serves requests."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "a dependency is not ready"}})
    def readyz(ctx: Ctx, scope: Literal["pipeline", "api"] = "pipeline") -> JSONResponse:
        """Readiness. ``pipeline`` (default): database reachable and migrated, broker reachable, and an inference
        and a delivery worker consuming (worker heartbeats); a missing one is named with its last problem; and
        free space on the storage folder at least ``storage.min_free_gb`` (below it the node refuses C-STORE).
        ``api``: only what this API process needs (database and broker), for a load balancer's probe.
        ``pipeline`` also reports ``model_drift`` (the drift check of :mod:`worker.monitoring`), informational:
        it makes readiness fail only when ``monitoring.drift_fails_readiness`` is set and a condition drifted."""
        stale_after = ctx.settings.pipeline.stale_after_seconds if scope == "pipeline" else None
        checks = readiness(ctx.db, ctx.celery, stale_after=stale_after, settings=ctx.settings)
        ready = all(v == "ok" for v in checks.values())
        if scope == "pipeline" and monitor is not None:
            try:
                drift = monitor.drift()
                checks["model_drift"] = drift.describe()
                ready = ready and not (drift.drifted and ctx.settings.monitoring.drift_fails_readiness)
            except Exception as exc:  # noqa: BLE001 - informational: an unreadable window is reported, not raised
                checks["model_drift"] = f"not checked: {type(exc).__name__}"
        return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

    def metrics_endpoint() -> Response:
        """Prometheus metrics (text exposition format 0.0.4)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if settings.api.metrics_public:
        app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], tags=["operations"])
    else:
        def protected_metrics(_: Reader) -> Response:
            return metrics_endpoint()

        protected_metrics.__doc__ = metrics_endpoint.__doc__
        app.add_api_route("/metrics", protected_metrics, methods=["GET"], tags=["operations"])

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        http_metrics.observe(request.method, route, response.status_code, started)
        elapsed = time.perf_counter() - started
        access_log.info(access_line(request.method, route, response.status_code, elapsed))
        if request.url.path.startswith("/ui/"):
            response.headers.setdefault("Content-Security-Policy", ui.CONTENT_SECURITY_POLICY)
            response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    if settings.api.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.api.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["ETag", "Last-Modified"])
    app.add_middleware(RequestSizeLimit, max_bytes=settings.api.max_request_bytes, upload_paths=(stow.STOW_PATH,),
                       upload_max_bytes=int(settings.api.stow_max_request_mb * (1 << 20)))
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """FHIR paths answer every error with an OperationOutcome; the review page sends a browser without a
    session to its login form; everything else keeps FastAPI's JSON errors."""

    def wants_login_page(request: Request, status: int) -> bool:
        return status == 401 and request.url.path.startswith("/ui/") and request.method == "GET"

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if request.url.path.startswith(FHIR_PREFIX):
            return fhir.outcome_response(exc.status_code, str(exc.detail), headers)
        if wants_login_page(request, exc.status_code):
            response = RedirectResponse(f"/ui/login?next={request.url.path}", status_code=303)
            response.delete_cookie(SESSION_COOKIE, path="/")
            return response
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith(FHIR_PREFIX):
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            return fhir.outcome_response(400, problems)
        return JSONResponse({"detail": _jsonable(exc.errors())}, status_code=422)

    async def server_error(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith(FHIR_PREFIX):
            return fhir.outcome_response(500, "internal server error")
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_error)


def _jsonable(errors: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors, custom_encoder={BaseException: str})
