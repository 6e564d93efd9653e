"""FHIR R4 facade under ``/fhir/r4``: ``metadata``, read, vread and search of the resources the reporting
module builds (stored by :mod:`worker.fhir_store`).

Responses are ``application/fhir+json`` (FHIR R4 §3.1.0.1.9); searches answer a ``searchset`` Bundle with
``self``/``first``/``previous``/``next``/``last`` links (§3.1.1.5.6, paging by ``_count`` and ``_offset``) and
``_include``d resources with ``search.mode = include``; every error is an OperationOutcome (§3.1.0.4).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from worker.api.auth import Reader
from worker.api.context import Ctx
from worker.fhir_store import (
    DEFAULT_COUNT,
    MAX_COUNT,
    SEARCH_PARAMETERS,
    SERVED_TYPES,
    FhirResource,
    SearchError,
    current,
    include_parameters,
    parse_search,
    search,
    subset,
    version,
)

FHIR_JSON = "application/fhir+json"
FHIR_VERSION = "4.0.1"


class FhirResponse(JSONResponse):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict[str, Any]:
    """An OperationOutcome with one issue (FHIR R4 OperationOutcome; ``code`` from the IssueType value set)."""
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               406: "not-supported", 409: "conflict", 410: "deleted", 413: "too-long", 415: "not-supported",
               422: "invalid", 429: "throttled"}


def outcome_response(status: int, diagnostics: str, headers: dict[str, str] | None = None) -> FhirResponse:
    code = ISSUE_CODES.get(status, "exception")
    return FhirResponse(operation_outcome(code, diagnostics), status_code=status, headers=headers)


def _instant(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def capability_statement(base: str, cors: bool) -> dict[str, Any]:
    """What this server does, generated from the same tables the search code uses."""
    type_docs = {"date": "date", "token": "token", "reference": "reference"}
    resources = []
    for rtype in SERVED_TYPES:
        params = [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]
        for p in SEARCH_PARAMETERS[rtype]:
            entry: dict[str, Any] = {"name": p.name, "type": type_docs[p.type]}
            if p.documentation:
                entry["documentation"] = p.documentation
            params.append(entry)
        resource: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "search-type"}],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalRead": "not-supported",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": params,
        }
        includes = [f"{rtype}:{p.name}" for p in include_parameters(rtype)]
        if includes:
            resource["searchInclude"] = includes
        resources.append(resource)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": _instant(dt.datetime.now(dt.UTC)),
        "publisher": "RetinalGPT Worker",
        "kind": "instance",
        "software": {"name": "RetinalGPT Worker", "version": software_version()},
        "implementation": {"description": "RetinalGPT fundus analysis results (read-only FHIR facade)", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": (f"Read-only. Searches are paged with _count (default {DEFAULT_COUNT}, at most "
                              f"{MAX_COUNT}) and _offset; _summary=count answers the total only; _elements subsets the matches "
                              "(tagged SUBSETTED); _sort accepts _id, _lastUpdated and date parameters; "
                              "token parameters accept system|code and :not; reference parameters accept "
                              ":identifier and type modifiers; unknown parameters are an error."),
            "security": {"cors": cors,
                         "description": "Bearer token (RFC 6750) with read or admin role required for read and "
                                        "search; metadata is public."},
            "resource": resources,
        }],
    }


def software_version() -> str:
    """The installed ``retinalgpt`` distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("retinalgpt")
    except PackageNotFoundError:
        return "0+unknown"


def _read_headers(row: FhirResource) -> dict[str, str]:
    return {"ETag": f'W/"{row.version_id}"',
            "Last-Modified": row.last_updated.astimezone(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")}


def _search_parameters_doc(rtype: str) -> list[dict[str, Any]]:
    """OpenAPI query parameters of a search (documentation; the handler parses the raw query)."""
    out = [
        {"name": "_id", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "_lastUpdated", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "date with optional prefix (eq, ne, gt, lt, ge, le, sa, eb)"},
        {"name": "_count", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
        {"name": "_offset", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
        {"name": "_sort", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "_summary", "in": "query", "required": False, "schema": {"type": "string", "enum": ["count", "false"]}},
        {"name": "_elements", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
    if include_parameters(rtype):
        out.append({"name": "_include", "in": "query", "required": False,
                    "schema": {"type": "string", "enum": [f"{rtype}:{p.name}" for p in include_parameters(rtype)]}})
    for p in SEARCH_PARAMETERS[rtype]:
        out.append({"name": p.name, "in": "query", "required": False, "schema": {"type": "string"},
                    "description": f"{p.type} parameter{': ' + p.documentation if p.documentation else ''}"})
    return out


FHIR_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}, "description": "FHIR resource"},
    400: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}, "description": "OperationOutcome"},
    401: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}, "description": "OperationOutcome"},
    404: {"content": {FHIR_JSON: {"schema": {"type": "object"}}}, "description": "OperationOutcome"},
}


def router() -> APIRouter:
    """The ``/fhir/r4`` routes; one read, vread and search route per served type."""
    api = APIRouter(prefix="/fhir/r4", tags=["FHIR R4"])

    @api.get("/metadata", response_class=FhirResponse, responses=FHIR_RESPONSES, summary="CapabilityStatement")
    def metadata(request: Request, ctx: Ctx) -> FhirResponse:
        return FhirResponse(capability_statement(ctx.fhir_base(request), bool(ctx.settings.api.cors_origins)))

    for rtype in SERVED_TYPES:
        api.add_api_route(f"/{rtype}", _search_endpoint(rtype), methods=["GET"], response_class=FhirResponse,
                          responses=FHIR_RESPONSES, summary=f"Search {rtype}", name=f"search_{rtype}",
                          openapi_extra={"parameters": _search_parameters_doc(rtype)})
        api.add_api_route(f"/{rtype}/{{resource_id}}", _read_endpoint(rtype), methods=["GET"],
                          response_class=FhirResponse, responses=FHIR_RESPONSES, summary=f"Read {rtype}",
                          name=f"read_{rtype}")
        api.add_api_route(f"/{rtype}/{{resource_id}}/_history/{{version_id}}", _vread_endpoint(rtype),
                          methods=["GET"], response_class=FhirResponse, responses=FHIR_RESPONSES,
                          summary=f"Read a version of {rtype}", name=f"vread_{rtype}")
    return api


def _read_endpoint(rtype: str) -> Callable[..., Response]:
    def read(resource_id: str, ctx: Ctx, _: Reader) -> Response:
        with ctx.db.reading() as session:
            row = current(session, rtype, resource_id)
        if row is None:
            return outcome_response(404, f"{rtype}/{resource_id} is not known")
        return FhirResponse(row.resource, headers=_read_headers(row))

    read.__doc__ = f"Read the current version of a {rtype} (FHIR R4 read interaction)."
    return read


def _vread_endpoint(rtype: str) -> Callable[..., Response]:
    def vread(resource_id: str, version_id: str, ctx: Ctx,
              _: Reader) -> Response:
        if not (version_id.isascii() and version_id.isdigit()) or len(version_id) > 9:
            return outcome_response(404, f"{rtype}/{resource_id} has no version {version_id}")
        with ctx.db.reading() as session:
            row = version(session, rtype, resource_id, int(version_id))
        if row is None:
            return outcome_response(404, f"{rtype}/{resource_id} has no version {version_id}")
        return FhirResponse(row.resource, headers=_read_headers(row))

    vread.__doc__ = f"Read one version of a {rtype} (FHIR R4 vread interaction)."
    return vread


def _search_endpoint(rtype: str) -> Callable[..., Response]:
    def search_type(request: Request, ctx: Ctx,
                    _: Reader) -> Response:
        base = ctx.fhir_base(request)
        params = list(request.query_params.multi_items())
        try:
            parsed = parse_search(rtype, params, base)
        except SearchError as exc:
            return outcome_response(400, str(exc))
        with ctx.db.reading() as session:
            result = search(session, parsed)
        kept = [(k, v) for k, v in params if k not in {"_offset", "_count", "_format"}]

        def link(relation: str, offset: int) -> dict[str, str]:
            query = urlencode([*kept, ("_count", str(parsed.count)), ("_offset", str(offset))])
            return {"relation": relation, "url": f"{base}/{rtype}?{query}"}

        links = [link("self", parsed.offset), link("first", 0)]
        if parsed.count > 0:
            if parsed.offset > 0:
                links.append(link("previous", max(0, parsed.offset - parsed.count)))
            if parsed.offset + parsed.count < result.total:
                links.append(link("next", parsed.offset + parsed.count))
            last = max(0, (result.total - 1) // parsed.count * parsed.count)
            links.append(link("last", last))
        def shown(row: FhirResource) -> dict[str, Any]:
            return subset(row.resource, parsed.elements) if parsed.elements else row.resource

        entries = [{"fullUrl": f"{base}/{row.resource_type}/{row.resource_id}", "resource": shown(row),
                    "search": {"mode": "match"}} for row in result.matches]
        entries += [{"fullUrl": f"{base}/{row.resource_type}/{row.resource_id}", "resource": row.resource,
                     "search": {"mode": "include"}} for row in result.included]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                  "timestamp": _instant(dt.datetime.now(dt.UTC)), "total": result.total,
                                  "link": links}
        if entries:
            bundle["entry"] = entries
        return FhirResponse(bundle)

    search_type.__doc__ = f"Search {rtype} (FHIR R4 search-type interaction); answers a searchset Bundle."
    return search_type
