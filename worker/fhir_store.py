"""The FHIR R4 resources the HTTP API serves, stored exactly as :mod:`reporting.fhir` builds them.

One source of truth: :func:`index_bundle` takes the transaction Bundle of one analysis revision (the one that is
also posted to the EHR) and applies it the way a FHIR server processes a transaction (FHIR R4 §3.1.0.11.2):

* every entry's ``urn:uuid`` fullUrl becomes a logical id (the UUID itself, or the ``id`` the entry already has,
  as Provenance does) and references between entries are rewritten to ``Type/id``;
* ``POST`` with ``ifNoneExist`` (Patient, Device) is a conditional create: an existing resource is kept;
* ``PUT`` (ImagingStudy, Observations, DiagnosticReport, Provenance) is an update: a changed resource gets a new
  version (``meta.versionId`` + 1), the previous version stays readable through ``_history`` (vread); an
  unchanged one is left alone, so indexing the same revision twice changes nothing.

A new revision of a study therefore updates its DiagnosticReport and Observations in place (the reporting
module marks them ``amended``) and adds a Provenance record of its own.

Search (FHIR R4 §3.1.1.4 search) runs on :class:`FhirSearchToken` rows (token and reference parameters, one row
per value) and the resource's ``date`` and ``last_updated`` columns; :func:`search` implements the parameter
types of :data:`SEARCH_PARAMETERS`.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    and_,
    exists,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from worker.db.models import Base, utcnow

Resource = dict[str, Any]

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""A FHIR id (R4 §2.24.0.1 id datatype), matched whole (``fullmatch``): ``$`` would admit a trailing
newline."""
"""FHIR R4 ``id`` datatype."""

SERVED_TYPES = ("DiagnosticReport", "Observation", "ImagingStudy", "Device", "Provenance", "Patient")


class FhirResource(Base):
    """One version of one FHIR resource. ``is_current`` marks the version read and searched."""

    __tablename__ = "fhir_resources"
    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id", "version_id", name="uq_fhir_resources_version"),
        Index("ix_fhir_resources_type_current", "resource_type", "is_current", "last_updated"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    study_revision: Mapped[int | None] = mapped_column(Integer)
    date: Mapped[dt.datetime | None] = mapped_column()
    last_updated: Mapped[dt.datetime] = mapped_column(default=utcnow)
    resource: Mapped[dict[str, Any]] = mapped_column()

    tokens: Mapped[list[FhirSearchToken]] = relationship(back_populates="owner", cascade="all, delete-orphan")


class FhirSearchToken(Base):
    """A token or reference search value of a current resource version (``system`` is None for references
    and codes without a system)."""

    __tablename__ = "fhir_search_tokens"
    __table_args__ = (Index("ix_fhir_search_tokens_param_value", "param", "value"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    resource_pk: Mapped[int] = mapped_column(ForeignKey("fhir_resources.id", ondelete="CASCADE"), index=True)
    param: Mapped[str] = mapped_column(String(32))
    system: Mapped[str | None] = mapped_column(String(255))
    value: Mapped[str] = mapped_column(String(255))

    owner: Mapped[FhirResource] = relationship(back_populates="tokens")


# --- search parameter definitions ---------------------------------------------------------------------------

ParamType = Literal["token", "reference", "date"]


@dataclass(frozen=True)
class SearchParameter:
    """A search parameter of one resource type: its FHIR type, the element paths it indexes and, for
    references, the resource types it may point to (the first one is assumed for a bare id)."""

    name: str
    type: ParamType
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    documentation: str = ""


def _p(name: str, kind: ParamType, *paths: str, targets: tuple[str, ...] = (), doc: str = "") -> SearchParameter:
    return SearchParameter(name, kind, paths, targets, doc)


_IDENTIFIER = _p("identifier", "token", "identifier", doc="Business identifier (system|value)")
_PATIENT = _p("patient", "reference", "subject", targets=("Patient",), doc="The subject, when it is a Patient")
_SUBJECT = _p("subject", "reference", "subject", targets=("Patient",), doc="The subject of the resource")

SEARCH_PARAMETERS: dict[str, tuple[SearchParameter, ...]] = {
    "DiagnosticReport": (
        _IDENTIFIER, _PATIENT, _SUBJECT,
        _p("status", "token", "status"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("date", "date", "effectiveDateTime", doc="Clinically relevant time of the report (the study's time)"),
        _p("result", "reference", "result", targets=("Observation",)),
        _p("imaging-study", "reference", "imagingStudy", targets=("ImagingStudy",),
           doc="The ImagingStudy the report is about (not a standard R4 parameter; used by _include)"),
    ),
    "Observation": (
        _IDENTIFIER, _PATIENT, _SUBJECT,
        _p("status", "token", "status"),
        _p("code", "token", "code"),
        _p("component-code", "token", "component.code"),
        _p("category", "token", "category"),
        _p("date", "date", "effectiveDateTime"),
        _p("device", "reference", "device", targets=("Device",)),
        _p("derived-from", "reference", "derivedFrom", targets=("ImagingStudy",)),
    ),
    "ImagingStudy": (
        _IDENTIFIER, _PATIENT, _SUBJECT,
        _p("status", "token", "status"),
        _p("started", "date", "started"),
        _p("series", "token", "series.uid"),
        _p("modality", "token", "series.modality"),
    ),
    "Device": (
        _IDENTIFIER,
        _p("status", "token", "status"),
        _p("device-name", "token", "deviceName.name"),
        _p("manufacturer", "token", "manufacturer"),
        _p("type", "token", "type"),
    ),
    "Provenance": (
        _p("target", "reference", "target", targets=("DiagnosticReport", "Observation")),
        _p("agent", "reference", "agent.who", targets=("Device",)),
        _p("entity", "reference", "entity.what", targets=("ImagingStudy",)),
        _p("recorded", "date", "recorded"),
    ),
    "Patient": (_IDENTIFIER,),
}
"""The search parameters each served type supports (besides ``_id`` and ``_lastUpdated``)."""

REFERENCE_IDENTIFIER_MODIFIER = "identifier"
"""``patient:identifier=system|value`` (FHIR R4 §3.1.1.4.9.6): match on the referenced Patient's identifier."""


def parameter(resource_type: str, name: str) -> SearchParameter | None:
    return next((p for p in SEARCH_PARAMETERS.get(resource_type, ()) if p.name == name), None)


def include_parameters(resource_type: str) -> list[SearchParameter]:
    """The reference parameters usable in ``_include=<resource_type>:<name>``."""
    return [p for p in SEARCH_PARAMETERS.get(resource_type, ()) if p.type == "reference"]


# --- extracting values --------------------------------------------------------------------------------------


def _walk(value: Any, path: Sequence[str]) -> Iterator[Any]:
    if not path:
        yield value
        return
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, path)
        return
    if isinstance(value, dict) and path[0] in value:
        yield from _walk(value[path[0]], path[1:])


def _values(resource: Resource, path: str) -> Iterator[Any]:
    for value in _walk(resource, path.split(".")):
        if isinstance(value, list):
            yield from value
        else:
            yield value


def _token_rows(value: Any) -> Iterator[tuple[str | None, str]]:
    """(system, code) pairs of a code, Coding, CodeableConcept or Identifier."""
    if isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if "coding" in value:
            for coding in value["coding"]:
                yield from _token_rows(coding)
        elif "code" in value:
            yield value.get("system"), str(value["code"])
        elif "value" in value:
            yield value.get("system"), str(value["value"])


def parse_instant(text: str) -> dt.datetime | None:
    """A FHIR date, dateTime or instant as the UTC start of the moment it names (timezone-less → UTC)."""
    low, _ = date_range(text)
    return low


def date_range(text: str) -> tuple[dt.datetime, dt.datetime]:
    """The half-open UTC interval ``[start, end)`` a FHIR date/dateTime value covers at its precision
    (FHIR R4 §3.1.1.4.2: ``2024`` is the whole year, ``2024-05-01`` the whole day)."""
    match = re.fullmatch(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                         r"(Z|[+-]\d{2}:\d{2})?)?)?)?", text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a FHIR date or dateTime")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = dt.UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        tz = dt.timezone(sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    if month is None:
        start = dt.datetime(int(year), 1, 1, tzinfo=tz)
        return start, start.replace(year=start.year + 1)
    if day is None:
        start = dt.datetime(int(year), int(month), 1, tzinfo=tz)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start, end
    if hour is None:
        start = dt.datetime(int(year), int(month), int(day), tzinfo=tz)
        return start, start + dt.timedelta(days=1)
    if second is None:
        start = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), tzinfo=tz)
        return start.astimezone(dt.UTC), (start + dt.timedelta(minutes=1)).astimezone(dt.UTC)
    micro = round(float(fraction) * 1_000_000) if fraction else 0
    start = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz)
    step = dt.timedelta(microseconds=1) if fraction else dt.timedelta(seconds=1)
    return start.astimezone(dt.UTC), (start + step).astimezone(dt.UTC)


def _date_of(resource: Resource) -> dt.datetime | None:
    """The value of the type's date parameter (each served type has at most one)."""
    for p in SEARCH_PARAMETERS.get(resource["resourceType"], ()):
        if p.type == "date" and p.paths[0] in resource:
            return parse_instant(str(resource[p.paths[0]]))
    return None


def search_tokens(resource: Resource, patient_identifiers: dict[str, Resource]) -> list[FhirSearchToken]:
    """The token rows of ``resource`` (references already rewritten to ``Type/id``). ``patient_identifiers``
    maps ``Patient/<id>`` to that Patient's first identifier, for the ``:identifier`` modifier."""
    rows: list[FhirSearchToken] = []
    seen: set[tuple[str, str | None, str]] = set()

    def add(param: str, system: str | None, value: str) -> None:
        key = (param, system, value)
        if key not in seen and len(value) <= 255:
            seen.add(key)
            rows.append(FhirSearchToken(param=param, system=system, value=value))

    for p in SEARCH_PARAMETERS.get(resource["resourceType"], ()):
        if p.type == "date":
            continue
        for path in p.paths:
            for value in _values(resource, path):
                if p.type == "token":
                    for system, code in _token_rows(value):
                        add(p.name, system, code)
                elif isinstance(value, dict) and isinstance(value.get("reference"), str):
                    ref = value["reference"]
                    add(p.name, None, ref)
                    ident = patient_identifiers.get(ref)
                    if ident is not None:
                        add(f"{p.name}:{REFERENCE_IDENTIFIER_MODIFIER}", ident.get("system"), str(ident["value"]))
    return rows


# --- indexing a transaction bundle -------------------------------------------------------------------------


class BundleError(ValueError):
    """The bundle is not a transaction bundle this store can apply."""


def _logical_id(entry: Resource) -> str:
    resource = entry["resource"]
    if resource.get("id"):
        return str(resource["id"])
    full_url = str(entry.get("fullUrl", ""))
    if full_url.startswith("urn:uuid:"):
        return full_url.removeprefix("urn:uuid:")
    raise BundleError(f"{resource['resourceType']} entry has neither an id nor a urn:uuid fullUrl")


def _rewrite(value: Any, targets: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, targets) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in targets:
            out["reference"] = targets[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, targets) for v in value]
    return value


def _without_meta(resource: Resource) -> Resource:
    return {k: v for k, v in resource.items() if k != "meta"}


def current(session: Session, resource_type: str, resource_id: str) -> FhirResource | None:
    return session.scalars(select(FhirResource).where(
        FhirResource.resource_type == resource_type, FhirResource.resource_id == resource_id,
        FhirResource.is_current.is_(True))).one_or_none()


def version(session: Session, resource_type: str, resource_id: str, version_id: int) -> FhirResource | None:
    return session.scalars(select(FhirResource).where(
        FhirResource.resource_type == resource_type, FhirResource.resource_id == resource_id,
        FhirResource.version_id == version_id)).one_or_none()


def index_bundle(session: Session, study_id: int, revision: int, bundle: Resource) -> None:
    """Store every resource of a transaction ``bundle`` (from :func:`reporting.fhir.bundle.build_bundle`) as
    the FHIR facade's current version, in the caller's transaction (types beyond :data:`SERVED_TYPES` are kept,
    so references stay resolvable, but the API does not serve them). Idempotent: an unchanged resource keeps
    its version. ``study_id``/``revision`` tie the study's resources to the :class:`~worker.db.Study` row
    (Patient and Device are shared between studies and are not tied)."""
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise BundleError("expected a transaction Bundle")
    entries = bundle.get("entry", [])
    targets: dict[str, str] = {}
    for entry in entries:
        rtype = str(entry["resource"].get("resourceType", ""))
        if not re.fullmatch(r"[A-Z][A-Za-z]{1,31}", rtype):
            raise BundleError(f"entry without a valid resourceType: {rtype!r}")
        logical = _logical_id(entry)
        if not ID_PATTERN.fullmatch(logical):
            raise BundleError(f"{rtype} id {logical!r} is not a valid FHIR id")
        if entry.get("fullUrl"):
            targets[entry["fullUrl"]] = f"{rtype}/{logical}"
    resources = []
    for entry in entries:
        resource = _rewrite(copy.deepcopy(entry["resource"]), targets)
        resource["id"] = _logical_id(entry)
        resources.append((entry.get("request", {}), resource))
    patients = {f"Patient/{r['id']}": r["identifier"][0] for _, r in resources
                if r["resourceType"] == "Patient" and r.get("identifier")}
    now = utcnow()
    for request, resource in resources:
        rtype = resource["resourceType"]
        shared = rtype in {"Patient", "Device"}
        existing = current(session, rtype, resource["id"])
        if existing is not None and (request.get("ifNoneExist") or
                                     _without_meta(existing.resource) == _without_meta(resource)):
            continue
        number = 1 if existing is None else existing.version_id + 1
        if existing is not None:
            existing.is_current = False
            existing.tokens.clear()
        resource["meta"] = {"versionId": str(number), "lastUpdated": now.isoformat().replace("+00:00", "Z")}
        session.add(FhirResource(
            resource_type=rtype, resource_id=resource["id"], version_id=number, is_current=True,
            study_id=None if shared else study_id, study_revision=None if shared else revision,
            date=_date_of(resource), last_updated=now, resource=resource,
            tokens=search_tokens(resource, patients)))
        session.flush()


# --- search --------------------------------------------------------------------------------------------------


class SearchError(ValueError):
    """A search the server cannot process; the message goes into an OperationOutcome (HTTP 400)."""


@dataclass
class SearchRequest:
    """A parsed search: AND-ed filters (each an OR of values), sort, paging and includes."""

    resource_type: str
    filters: list[ColumnElement[bool]] = field(default_factory=list)
    sort: list[str] = field(default_factory=list)
    count: int = 20
    offset: int = 0
    includes: list[SearchParameter] = field(default_factory=list)
    summary_count: bool = False
    elements: list[str] = field(default_factory=list)


MAX_COUNT = 200
DEFAULT_COUNT = 20
MAX_OFFSET = 1_000_000
"""Largest ``_offset`` served (as the worklist's ``offset``): beyond it a search answers 400, never overflows
the database's 64-bit integer."""
def _token_filter(param: str, raw: str) -> ColumnElement[bool]:
    if "|" in raw:
        system, _, value = raw.partition("|")
        conditions = [FhirSearchToken.param == param]
        conditions.append(FhirSearchToken.system.is_(None) if system == "" else FhirSearchToken.system == system)
        if value:
            conditions.append(FhirSearchToken.value == value)
        return and_(*conditions)
    return and_(FhirSearchToken.param == param, FhirSearchToken.value == raw)


def _reference_value(p: SearchParameter, raw: str, base_url: str) -> str:
    raw = raw.removeprefix(base_url.rstrip("/") + "/") if base_url else raw
    parts = raw.split("/")
    if len(parts) >= 2 and parts[-2] in SERVED_TYPES:
        return f"{parts[-2]}/{parts[-1]}"
    if len(parts) == 1 and p.targets:
        return f"{p.targets[0]}/{raw}"
    raise SearchError(f"{p.name}: {raw!r} is not a reference to a served resource")


def _token_exists(condition: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists().where(FhirSearchToken.resource_pk == FhirResource.id, condition)


def _date_filter(column: Any, raw: str, name: str) -> ColumnElement[bool]:
    prefix = raw[:2] if raw[:2] in {"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"} else "eq"
    text = raw[2:] if raw[:2] == prefix else raw
    try:
        low, high = date_range(text)
    except ValueError as exc:
        raise SearchError(f"{name}: {exc}") from None
    return {
        "eq": and_(column >= low, column < high),
        "ne": or_(column < low, column >= high),
        "gt": column >= high, "sa": column >= high,
        "lt": column < low, "eb": column < low,
        "ge": column >= low,
        "le": column < high,
    }[prefix]


def parse_search(resource_type: str, params: Iterable[tuple[str, str]], base_url: str = "") -> SearchRequest:
    """Parse query parameters (FHIR R4 §3.1.1.4) into a :class:`SearchRequest`; :class:`SearchError` for
    unknown parameters, modifiers or malformed values (the server is strict rather than silently ignoring)."""
    request = SearchRequest(resource_type)
    for name, raw in params:
        if name == "_format":
            continue
        if name == "_summary":
            if raw not in {"count", "false"}:
                raise SearchError("_summary: only 'count' and 'false' are supported (use _elements to subset)")
            request.summary_count = raw == "count"
            continue
        if name == "_elements":
            names = [n.strip() for n in raw.split(",") if n.strip()]
            if not names or not all(re.fullmatch(r"[a-z][A-Za-z0-9]*", n) for n in names):
                raise SearchError("_elements: a comma-separated list of top-level element names")
            request.elements = names
            continue
        if name == "_count":
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
                raise SearchError(f"_count must be a non-negative integer (at most {MAX_COUNT} are served)")
            request.count = min(int(raw), MAX_COUNT)
        elif name == "_offset":
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 7 or int(raw) > MAX_OFFSET:
                raise SearchError(f"_offset must be an integer from 0 to {MAX_OFFSET}")
            request.offset = int(raw)
        elif name == "_sort":
            for key in raw.split(","):
                bare = key.removeprefix("-")
                p = parameter(resource_type, bare)
                if bare not in {"_id", "_lastUpdated"} and (p is None or p.type != "date"):
                    raise SearchError(f"_sort: cannot sort by {bare!r} (use _id, _lastUpdated or a date parameter)")
                request.sort.append(key)
        elif name == "_include":
            source, _, pname = raw.partition(":")
            p = parameter(resource_type, pname)
            if source != resource_type or p is None or p.type != "reference":
                raise SearchError(f"_include: {raw!r} is not supported on {resource_type}")
            request.includes.append(p)
        else:
            request.filters.append(_filter(resource_type, name, raw, base_url))
    return request


def _filter(resource_type: str, name: str, raw: str, base_url: str) -> ColumnElement[bool]:
    bare, _, modifier = name.partition(":")
    values = [v for v in raw.split(",")]
    if not raw or any(v == "" for v in values):
        raise SearchError(f"{name}: empty value")
    if bare == "_id" and not modifier:
        return FhirResource.resource_id.in_(values)
    if bare == "_lastUpdated" and not modifier:
        return or_(*[_date_filter(FhirResource.last_updated, v, name) for v in values])
    p = parameter(resource_type, bare)
    if p is None:
        raise SearchError(f"unknown search parameter {bare!r} for {resource_type}")
    if p.type == "date":
        if modifier:
            raise SearchError(f"{name}: modifiers are not supported on date parameters")
        return or_(*[_date_filter(FhirResource.date, v, name) for v in values])
    if p.type == "token":
        if modifier == "not":
            return not_(or_(*[_token_exists(_token_filter(p.name, v)) for v in values]))
        if modifier:
            raise SearchError(f"{name}: modifier :{modifier} is not supported (only :not on tokens)")
        return or_(*[_token_exists(_token_filter(p.name, v)) for v in values])
    if modifier == REFERENCE_IDENTIFIER_MODIFIER:
        return or_(*[_token_exists(_token_filter(f"{p.name}:{modifier}", v)) for v in values])
    if modifier and modifier not in p.targets:
        raise SearchError(f"{name}: modifier :{modifier} is not supported")
    refs = [_reference_value(p, v if not modifier or "/" in v else f"{modifier}/{v}", base_url) for v in values]
    return _token_exists(and_(FhirSearchToken.param == p.name, FhirSearchToken.value.in_(refs)))


@dataclass
class SearchResult:
    total: int
    matches: list[FhirResource]
    included: list[FhirResource]


SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}
MANDATORY_ELEMENTS = ("resourceType", "id", "meta")


def subset(resource: Resource, elements: Sequence[str]) -> Resource:
    """``_elements`` (FHIR R4 §3.1.1.5.9): only the named top-level elements plus the mandatory ones, tagged
    SUBSETTED so no client mistakes it for the whole resource."""
    out = {k: v for k, v in resource.items() if k in elements or k in MANDATORY_ELEMENTS}
    meta = dict(out.get("meta", {}))
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out


def search(session: Session, request: SearchRequest) -> SearchResult:
    """Run a parsed search on the current versions; ``included`` holds the ``_include`` targets."""
    base = select(FhirResource).where(FhirResource.resource_type == request.resource_type,
                                      FhirResource.is_current.is_(True), *request.filters)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    if request.summary_count:
        return SearchResult(total=total, matches=[], included=[])
    order = []
    for key in request.sort or ["-_lastUpdated"]:
        bare = key.removeprefix("-")
        column = {"_id": FhirResource.resource_id, "_lastUpdated": FhirResource.last_updated}.get(bare, FhirResource.date)
        order.append(column.desc() if key.startswith("-") else column.asc())
    order.append(FhirResource.id.asc())
    matches = list(session.scalars(base.order_by(*order).offset(request.offset).limit(request.count)))
    included: list[FhirResource] = []
    if request.includes and matches:
        refs = set(session.scalars(select(FhirSearchToken.value).where(
            FhirSearchToken.resource_pk.in_([m.id for m in matches]),
            FhirSearchToken.param.in_([p.name for p in request.includes]))))
        matched = {(m.resource_type, m.resource_id) for m in matches}
        wanted: dict[str, list[str]] = {}
        for ref in sorted(refs):
            rtype, _, rid = ref.partition("/")
            if (rtype, rid) not in matched:
                wanted.setdefault(rtype, []).append(rid)
        for rtype, ids in wanted.items():
            included += session.scalars(select(FhirResource).where(
                FhirResource.resource_type == rtype, FhirResource.resource_id.in_(ids),
                FhirResource.is_current.is_(True)).order_by(FhirResource.resource_id))
    return SearchResult(total=total, matches=matches, included=included)
