"""DICOMweb STOW-RS ingest (PS3.18 §10.5): ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``.

A modality, router or PACS that speaks only DICOMweb reaches the same pipeline as a C-STORE sender. The
request body (``multipart/related; type="application/dicom"``, one PS3.10 file per part) is streamed: each
part's File Meta Information is checked as soon as it has arrived (SOP class accepted, UIDs, transfer syntax)
and its data set is spooled to a temp file in the store's ``.incoming/stow`` folder, at most
``dicom.max_instance_mb`` per part and ``api.stow_max_request_mb`` per request, never held in memory. Only when
the whole body has arrived is each part filed, in order, by :class:`dicom_node.intake.InstanceIntake` — the very
code the DIMSE listener uses: identified in place, UID conflicts and patient mismatches refused, duplicate
policy applied, renamed into place with fsync, recorded through :class:`worker.ingest.IngestService`. A body
cut off or over the limit stores nothing; the node's completion tracker picks the recorded studies up
(:class:`worker.ingest.ReceivingWatcher`) and completes and analyses them like C-STORE ones.

The answer is the PS3.18 Store Instances Response (Table 10.5.3-2) in ``application/dicom+json``: Referenced SOP
Sequence for the stored instances, Failed SOP Sequence with a Failure Reason (the C-STORE status we would have
answered, :class:`dicom_node.status.StoreStatus`) for the others, and one ``Warning: 299`` header field per
failure with the reason in words (PS3.18 §8.6.3). 200 when every instance was stored, 202 when some were, 409
when none were.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dicom_node.events import AssociationSummary
from dicom_node.intake import InstanceIntake, Outcome, Source
from dicom_node.part10 import FileMeta, Part10Receiver, Refusal
from dicom_node.status import StoreStatus
from dicom_node.storage import InstanceStore
from dicom_node.uids import require_uid
from worker.api.auth import Sender
from worker.api.context import ApiContext, Ctx
from worker.api.multipart import MultipartError, MultipartReader, content_type_params
from worker.dicom_params import listener_params
from worker.ingest import IngestService

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
STOW_PATH = "/dicomweb/studies"
_MAX_WARNINGS = 20
MAX_PARTS = 10_000
"""The most instances one STOW-RS request may carry (each becomes a spool file until the body has arrived)."""
STALE_SPOOL_SECONDS = 24 * 3600
_AE_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class StowService:
    """What the STOW-RS routes share in one API process: the store and the intake (built on first use)."""

    def __init__(self, ctx: ApiContext) -> None:
        params = listener_params(ctx.settings)
        self.params = params
        self.store = InstanceStore(params.storage_root, fsync=params.fsync)
        self.sink = IngestService(ctx.db, own_manufacturer=ctx.settings.reporting.manufacturer,
                                  rules=ctx.settings.rules)  # routing: calling AE = sender, called AE = ours
        self.intake = InstanceIntake(params, self.store, self.sink)
        self.spool_folder = self.store.incoming / "stow"  # not the node's: its start clears ``.incoming/*.part``
        self.spool_folder.mkdir(exist_ok=True)
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Spool files of requests that never finished (an API process killed mid-request). Other API processes
        may be receiving into the same folder, so only files untouched for :data:`STALE_SPOOL_SECONDS` go."""
        cutoff = time.time() - STALE_SPOOL_SECONDS
        removed = 0
        for path in self.spool_folder.glob("*.part"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.warning("removed %d spool files of STOW-RS requests that never finished", removed)


def stow_service(ctx: ApiContext) -> StowService:
    service = getattr(ctx, "_stow", None)
    if service is None:
        service = StowService(ctx)
        ctx._stow = service  # type: ignore[attr-defined]
    return service


class TooManyParts(Exception):
    """The request carries more than :data:`MAX_PARTS` instances."""


@dataclass
class _Part:
    receiver: Part10Receiver | None
    refusal: Refusal | None = None


@dataclass
class _Parts:
    """Receives the parts of one request (a :class:`worker.api.multipart.PartHandler`)."""

    service: StowService
    source: Source
    parts: list[_Part] = field(default_factory=list)

    def part_begin(self, headers: dict[str, str]) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise TooManyParts(f"more than {MAX_PARTS} parts in one request; send the study in several requests")
        media = content_type_params(headers.get("content-type", "application/dicom"))[0]
        if media != "application/dicom":
            self.parts.append(_Part(None, Refusal(StoreStatus.CANNOT_UNDERSTAND,
                                                  f"part has Content-Type {media}, not application/dicom")))
            return
        params = self.service.params
        self.parts.append(_Part(Part10Receiver(self.service.spool_folder, max_bytes=params.max_instance_bytes,
                                               source_ae_title=self.source.calling_ae_title, accept=self._accept,
                                               fsync=params.fsync)))

    def part_data(self, data: bytes) -> None:
        receiver = self.parts[-1].receiver
        if receiver is not None:
            receiver.write(data)

    def part_end(self) -> None:
        part = self.parts[-1]
        if part.receiver is not None:
            part.receiver.close()
            part.refusal = part.receiver.refusal

    def _accept(self, meta: FileMeta) -> Refusal | None:
        intake = self.service.intake
        refused = intake.check_request(self.source, meta.sop_class_uid, meta.sop_instance_uid)
        if refused is None and (low := intake.space_refusal()) is not None:  # before a byte of it is written
            refused = intake.refuse(self.source, StoreStatus.OUT_OF_RESOURCES_STORAGE, low, meta.sop_class_uid,
                                    meta.sop_instance_uid, no_space=True)
        return None if refused is None else Refusal(refused.status, refused.reason, meta, reported=True)

    def discard(self) -> None:
        for part in self.parts:
            if part.receiver is not None:
                part.receiver.discard()

    def file(self, expected_study: str | None) -> list[Outcome]:
        """File every received part in order (blocking: fsync and database)."""
        intake = self.service.intake
        outcomes = []
        try:
            for part in self.parts:
                receiver, refusal = part.receiver, part.refusal
                meta = receiver.meta if receiver is not None else None
                if refusal is not None:
                    if refusal.reported:
                        outcomes.append(Outcome(refusal.status, refusal.reason, meta.sop_class_uid if meta else None,
                                                meta.sop_instance_uid if meta else None))
                    else:
                        outcomes.append(intake.refuse(self.source, refusal.status, refusal.reason,
                                                      meta.sop_class_uid if meta else None,
                                                      meta.sop_instance_uid if meta else None))
                    continue
                assert receiver is not None and receiver.spool is not None and meta is not None
                outcomes.append(intake.file(receiver.spool, transfer_syntax=meta.transfer_syntax,
                                            sop_class_uid=meta.sop_class_uid, sop_instance_uid=meta.sop_instance_uid,
                                            source=self.source, expected_study=expected_study))
        finally:
            self.discard()  # whatever was not filed (an exception half-way) leaves no temp file
        stored = [o for o in outcomes if o.ok]
        summary = AssociationSummary(
            calling_ae_title=self.source.calling_ae_title, peer_host=self.source.peer_host,
            stored=sum(1 for o in stored if not o.duplicate), duplicates=sum(1 for o in stored if o.duplicate),
            failed=len(outcomes) - len(stored),
            studies=tuple(sorted({o.study_instance_uid for o in stored if o.study_instance_uid})), aborted=False)
        try:
            self.service.sink.association_ended(summary)  # audit; marks its studies as cleanly sent so far
        except Exception:  # noqa: BLE001 - the instances are stored and recorded; the audit line is not worth a 500
            log.exception("cannot audit the STOW-RS request of %s", self.source.calling_ae_title)
        return outcomes


def sender_ae_title(name: str) -> str:
    """The token name as it is recorded for a STOW-RS sender where a calling AE title goes (16 characters,
    PS3.5 AE value representation)."""
    return _AE_UNSAFE.sub("_", name)[:16] or "STOW-RS"


def response_dataset(outcomes: list[Outcome]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-2)."""
    answer = Dataset()
    referenced, failed = [], []
    for outcome in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid or None
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or None
        if outcome.ok:
            referenced.append(item)
        else:
            item.FailureReason = int(outcome.status)
            failed.append(item)
    if referenced:
        answer.ReferencedSOPSequence = referenced
    if failed:
        answer.FailedSOPSequence = failed
    return answer


async def _store(request: Request, ctx: ApiContext, principal_name: str, study: str | None) -> JSONResponse:
    try:
        return await _receive_and_file(request, ctx, principal_name, study)
    except HTTPException as exc:
        host = request.client.host if request.client else "unknown"
        log.warning("STOW-RS request of %s@%s refused with %d: %s", principal_name, host, exc.status_code, exc.detail)
        raise


async def _receive_and_file(request: Request, ctx: ApiContext, principal_name: str,
                            study: str | None) -> JSONResponse:
    media, params = content_type_params(request.headers.get("content-type", ""))
    if media != "multipart/related":
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom" (PS3.18 §10.5.1)')
    if params.get("type", "application/dicom").lower() != "application/dicom":
        raise HTTPException(415, f"multipart/related type {params['type']!r} is not supported; send "
                                 "application/dicom parts")
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, "the Content-Type has no boundary parameter")
    service = stow_service(ctx)
    host = request.client.host if request.client else "unknown"
    parts = _Parts(service, Source(sender_ae_title(principal_name), host, "STOW-RS"))
    try:
        reader = MultipartReader(boundary, parts)
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(reader.feed, chunk)
        reader.close()
    except MultipartError as exc:
        parts.discard()
        raise HTTPException(400, f"malformed multipart body: {exc}; nothing was stored") from None
    except TooManyParts as exc:
        parts.discard()
        raise HTTPException(413, f"{exc}; nothing was stored") from None
    except ClientDisconnect:
        parts.discard()
        log.warning("STOW-RS request of %s@%s cut off (or over api.stow_max_request_mb); nothing was stored",
                    principal_name, host)
        raise HTTPException(400, "the request body did not arrive whole; nothing was stored") from None
    except BaseException:
        parts.discard()
        raise
    if not parts.parts:
        raise HTTPException(400, "the multipart body has no parts")
    outcomes = await run_in_threadpool(parts.file, study)
    stored = sum(1 for o in outcomes if o.ok)
    status = 200 if stored == len(outcomes) else 409 if stored == 0 else 202
    warnings = [f'299 retinalgpt "{o.sop_instance_uid or "part " + str(n)}: 0x{int(o.status):04X} {_quoted(o.reason)}"'
                for n, o in enumerate(outcomes, start=1) if not o.ok][:_MAX_WARNINGS]
    log.info("STOW-RS from %s@%s: %d of %d instances stored", principal_name, host, stored, len(outcomes))
    headers = {"Warning": ", ".join(warnings)} if warnings else None
    return JSONResponse(response_dataset(outcomes).to_json_dict(), status_code=status, media_type=DICOM_JSON,
                        headers=headers)


def _quoted(text: str) -> str:
    return text.replace("\\", "/").replace('"', "'").encode("ascii", "replace").decode()[:200]


StudyPath = Annotated[str, Path(description="the Study Instance UID every instance must belong to")]


def router() -> APIRouter:
    api = APIRouter(tags=["dicomweb"])
    responses = {200: {"description": "every instance stored"}, 202: {"description": "some instances stored"},
                 409: {"description": "no instance stored"}, 413: {"description": "body over api.stow_max_request_mb"},
                 415: {"description": "not multipart/related application/dicom"}}

    @api.post(STOW_PATH, responses=responses, response_class=JSONResponse)
    async def store_instances(request: Request, ctx: Ctx, principal: Sender) -> JSONResponse:
        """STOW-RS Store Instances (PS3.18 §10.5): ``multipart/related; type="application/dicom"``, one DICOM
        file per part. Needs a token with the sender (or admin) role."""
        return await _store(request, ctx, principal.name, None)

    @api.post(STOW_PATH + "/{study}", responses=responses, response_class=JSONResponse)
    async def store_study_instances(study: StudyPath, request: Request, ctx: Ctx, principal: Sender) -> JSONResponse:
        """STOW-RS Store Instances of one study (PS3.18 §10.5): an instance of another study is refused with
        Failure Reason 0xA900 and nothing of it is stored."""
        try:
            require_uid(study)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        return await _store(request, ctx, principal.name, study)

    return api
