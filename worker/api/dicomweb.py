"""DICOMweb QIDO-RS and WADO-RS read of our own result objects (PS3.18 §10.6 Search, §10.4 Retrieve).

What is served: the DICOM objects the pipeline built — the SR, key images, the Encapsulated PDF and
segmentations — of every study revision, read from the result folders as written (never re-encoded), so a
zero-footprint viewer such as OHIF can show them next to the originals it reads from the PACS. The originals
themselves are not served here (the PACS holds them). Objects are found through ``result_objects`` (their UIDs
were recorded when they were built); one whose file is gone (retention) is not listed.

Routes (all need a token with the read role):

- QIDO-RS: ``/dicomweb/studies`` (query keys ``PatientID``, ``StudyInstanceUID``, ``ModalitiesInStudy``, by
  keyword or tag, plus ``limit`` and ``offset``), ``/studies/{s}/series`` (``Modality``, ``SeriesInstanceUID``),
  ``/studies/{s}/instances`` and ``/studies/{s}/series/{se}/instances`` (``SOPClassUID``, ``SOPInstanceUID``),
  answered in ``application/dicom+json`` (PS3.18 Annex F.2); an unsupported key is ignored and named in a
  ``Warning: 299`` header field.
- WADO-RS: ``/studies/{s}``, ``/studies/{s}/series/{se}`` and ``/…/instances/{i}`` as
  ``multipart/related; type="application/dicom"`` in the stored transfer syntax; ``…/metadata`` at each level as
  ``application/dicom+json`` with bulk data (Pixel Data, Encapsulated Document) replaced by a BulkDataURI that
  ``…/instances/{i}/bulkdata/{tag}`` answers as ``multipart/related; type="application/octet-stream"``;
  ``…/instances/{i}/frames/{n,…}`` the frames a viewer draws (native: ``application/octet-stream``;
  encapsulated: the frame's own media type).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from sqlalchemy import select

from worker.api.auth import Reader
from worker.api.context import ApiContext, Ctx
from worker.api.params import UidPath
from worker.api.stow import DICOM_JSON
from worker.db import ResultObject, Study
from worker.pipeline.delivery import results_folder

BASE = "/dicomweb"
_CHUNK = 1 << 20
STUDY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID",
              "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription")
SERIES_KEYS = ("Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames",
                 "ContentDate", "ContentTime")
_PAGING = {"limit", "offset", "includefield", "fuzzymatching"}


@dataclass(frozen=True)
class ResultFile:
    """One of our result objects on disk."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path

    def header(self) -> Dataset:
        return _header(str(self.path), self.path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _header(path: str, mtime_ns: int) -> Dataset:
    """The object without bulk data (cached per file version; result files are written once, atomically)."""
    return pydicom.dcmread(path, stop_before_pixels=True)


@functools.lru_cache(maxsize=256)
def _folder_index(folder: str, mtime_ns: int) -> dict[str, str]:
    """SOP Instance UID → file of every DICOM object in a result folder."""
    index = {}
    for path in Path(folder).glob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001,S112 - a stray unreadable file is simply not served
            continue
        index[str(ds.SOPInstanceUID)] = str(path)
    return index


def result_files(ctx: ApiContext, *, study: str | None = None, series: str | None = None, sop: str | None = None,
                 patient_id: str | None = None, studies: list[str] | None = None) -> list[ResultFile]:
    """Our result objects matching the filters, in study, revision and build order."""
    query = (select(Study.study_instance_uid, ResultObject.revision, ResultObject.series_instance_uid,
                    ResultObject.sop_instance_uid)
             .join(Study, Study.id == ResultObject.study_id)
             .order_by(Study.id, ResultObject.revision, ResultObject.id))
    if study is not None:
        query = query.where(Study.study_instance_uid == study)
    if studies:
        query = query.where(Study.study_instance_uid.in_(studies))
    if series is not None:
        query = query.where(ResultObject.series_instance_uid == series)
    if sop is not None:
        query = query.where(ResultObject.sop_instance_uid == sop)
    if patient_id is not None:
        query = query.where(Study.patient_id == patient_id)
    with ctx.db.reading() as session:
        rows = session.execute(query).all()
    found = []
    for row in rows:
        folder = results_folder(ctx.settings, row.study_instance_uid, row.revision)
        try:
            index = _folder_index(str(folder), folder.stat().st_mtime_ns)
        except FileNotFoundError:
            continue
        path = index.get(row.sop_instance_uid)
        if path is not None:
            found.append(ResultFile(row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid, Path(path)))
    return found


# -- QIDO-RS ---------------------------------------------------------------------------------------------


def _query_values(request: Request, keyword: str) -> list[str] | None:
    """The values asked for an attribute, by keyword or tag (PS3.18 §8.3.4.1), split on commas and
    backslashes (UID list matching); None when not asked."""
    tag = f"{tag_for_keyword(keyword):08X}"
    raw = [v for k, v in request.query_params.multi_items() if k == keyword or k.upper() == tag]
    if not raw:
        return None
    return [part.strip() for value in raw for part in value.replace("\\", ",").split(",") if part.strip()]


def _unsupported(request: Request, supported: tuple[str, ...]) -> list[str]:
    accepted = set(supported) | {f"{tag_for_keyword(k):08X}" for k in supported} | _PAGING
    return sorted({k for k in request.query_params if k not in accepted and k.upper() not in accepted})


def _paging(request: Request) -> tuple[int, int | None]:
    try:
        offset = int(request.query_params.get("offset", "0"))
        limit = int(request.query_params["limit"]) if "limit" in request.query_params else None
    except ValueError:
        raise HTTPException(400, "limit and offset must be integers") from None
    if offset < 0 or (limit is not None and limit < 0):
        raise HTTPException(400, "limit and offset must not be negative")
    return offset, limit


def _search_response(request: Request, items: list[Dataset], supported: tuple[str, ...]) -> JSONResponse:
    offset, limit = _paging(request)
    page = items[offset:] if limit is None else items[offset : offset + limit]
    ignored = _unsupported(request, supported)
    warning = f'299 retinalgpt "query keys not supported, ignored: {", ".join(ignored)}"'
    headers = {"Warning": warning} if ignored else None
    return JSONResponse([ds.to_json_dict() for ds in page], media_type=DICOM_JSON, headers=headers)


def _copy(target: Dataset, source: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if keyword in source:
            target[keyword] = source[keyword]


def _study_url(ctx: ApiContext, request: Request, study: str) -> str:
    return f"{ctx.base_url(request)}{BASE}/studies/{study}"


def _study_entries(ctx: ApiContext, request: Request, files: list[ResultFile],
                   modalities: list[str] | None) -> list[Dataset]:
    by_study: dict[str, list[ResultFile]] = {}
    for file in files:
        by_study.setdefault(file.study_uid, []).append(file)
    entries = []
    for study_uid, members in by_study.items():
        headers = [m.header() for m in members]
        present = sorted({str(h.get("Modality", "")) for h in headers} - {""})
        if modalities and not set(modalities) & set(present):
            continue
        entry = Dataset()
        _copy(entry, headers[0], STUDY_KEYS)
        entry.ModalitiesInStudy = present
        entry.NumberOfStudyRelatedSeries = len({m.series_uid for m in members})
        entry.NumberOfStudyRelatedInstances = len(members)
        entry.RetrieveURL = _study_url(ctx, request, study_uid)
        entries.append(entry)
    return entries


def _series_entries(ctx: ApiContext, request: Request, files: list[ResultFile]) -> list[Dataset]:
    by_series: dict[str, list[ResultFile]] = {}
    for file in files:
        by_series.setdefault(file.series_uid, []).append(file)
    entries = []
    for series_uid, members in by_series.items():
        first = members[0].header()
        entry = Dataset()
        _copy(entry, first, ("StudyInstanceUID", *SERIES_KEYS))
        entry.NumberOfSeriesRelatedInstances = len(members)
        entry.RetrieveURL = f"{_study_url(ctx, request, members[0].study_uid)}/series/{series_uid}"
        entries.append(entry)
    return entries


def _instance_entries(ctx: ApiContext, request: Request, files: list[ResultFile]) -> list[Dataset]:
    entries = []
    for file in files:
        entry = Dataset()
        _copy(entry, file.header(), ("StudyInstanceUID", "SeriesInstanceUID", "Modality", *INSTANCE_KEYS))
        entry.RetrieveURL = _instance_url(ctx, request, file)
        entries.append(entry)
    return entries


def _instance_url(ctx: ApiContext, request: Request, file: ResultFile) -> str:
    return f"{_study_url(ctx, request, file.study_uid)}/series/{file.series_uid}/instances/{file.sop_uid}"


def _filter_instances(request: Request, files: list[ResultFile]) -> list[ResultFile]:
    classes = _query_values(request, "SOPClassUID")
    sops = _query_values(request, "SOPInstanceUID")
    return [f for f in files if (not sops or f.sop_uid in sops)
            and (not classes or str(f.header().SOPClassUID) in classes)]


# -- WADO-RS ---------------------------------------------------------------------------------------------


def _multipart(paths: list[Path], media_type: str = "application/dicom") -> StreamingResponse:
    """The files as ``multipart/related`` parts (PS3.18 §8.7.3.3), streamed from disk."""
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for path in paths:
            yield f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode()
            with open(path, "rb") as file:
                while chunk := file.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="{media_type}"; boundary={boundary}')


def _metadata(ctx: ApiContext, request: Request, files: list[ResultFile]) -> JSONResponse:
    items = []
    for file in files:
        url = _instance_url(ctx, request, file)
        full = pydicom.dcmread(file.path, defer_size=1024)

        def bulk(element: DataElement, url: str = url) -> str:
            return f"{url}/bulkdata/{int(element.tag):08X}"

        items.append(full.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=bulk))
    return JSONResponse(items, media_type=DICOM_JSON)


def _one(files: list[ResultFile], what: str) -> list[ResultFile]:
    if not files:
        raise HTTPException(404, f"no result object of ours matches this {what}")
    return files


def router() -> APIRouter:
    api = APIRouter(prefix=BASE, tags=["dicomweb"])

    @api.get("/studies")
    def search_studies(request: Request, ctx: Ctx, _: Reader) -> JSONResponse:
        """QIDO-RS Search for Studies (PS3.18 §10.6) among studies that have result objects of ours."""
        patient = _query_values(request, "PatientID")
        uids = _query_values(request, "StudyInstanceUID")
        files = result_files(ctx, patient_id=patient[0] if patient else None, studies=uids)
        entries = _study_entries(ctx, request, files, _query_values(request, "ModalitiesInStudy"))
        return _search_response(request, entries, ("PatientID", "StudyInstanceUID", "ModalitiesInStudy"))

    @api.get("/studies/{study}/series")
    def search_series(study: UidPath, request: Request, ctx: Ctx, _: Reader) -> JSONResponse:
        """QIDO-RS Search for Series of a study (our result series)."""
        modalities = _query_values(request, "Modality")
        series = _query_values(request, "SeriesInstanceUID")
        files = [f for f in result_files(ctx, study=study) if (not series or f.series_uid in series)
                 and (not modalities or str(f.header().get("Modality", "")) in modalities)]
        return _search_response(request, _series_entries(ctx, request, files),
                                ("Modality", "SeriesInstanceUID"))

    @api.get("/studies/{study}/instances")
    def search_study_instances(study: UidPath, request: Request, ctx: Ctx, _: Reader) -> JSONResponse:
        """QIDO-RS Search for Instances of a study (our result objects)."""
        files = _filter_instances(request, result_files(ctx, study=study))
        return _search_response(request, _instance_entries(ctx, request, files), ("SOPClassUID", "SOPInstanceUID"))

    @api.get("/studies/{study}/series/{series}/instances")
    def search_series_instances(study: UidPath, series: UidPath, request: Request, ctx: Ctx,
                                _: Reader) -> JSONResponse:
        """QIDO-RS Search for Instances of a series (our result objects)."""
        files = _filter_instances(request, result_files(ctx, study=study, series=series))
        return _search_response(request, _instance_entries(ctx, request, files), ("SOPClassUID", "SOPInstanceUID"))

    @api.get("/studies/{study}")
    def retrieve_study(study: UidPath, ctx: Ctx, _: Reader) -> StreamingResponse:
        """WADO-RS Retrieve Study: our result objects of the study, ``multipart/related; type="application/dicom"``."""
        return _multipart([f.path for f in _one(result_files(ctx, study=study), "study")])

    @api.get("/studies/{study}/metadata")
    def study_metadata(study: UidPath, request: Request, ctx: Ctx, _: Reader) -> JSONResponse:
        """WADO-RS Retrieve Study Metadata (PS3.18 §10.4.1.1.2)."""
        return _metadata(ctx, request, _one(result_files(ctx, study=study), "study"))

    @api.get("/studies/{study}/series/{series}")
    def retrieve_series(study: UidPath, series: UidPath, ctx: Ctx, _: Reader) -> StreamingResponse:
        """WADO-RS Retrieve Series."""
        return _multipart([f.path for f in _one(result_files(ctx, study=study, series=series), "series")])

    @api.get("/studies/{study}/series/{series}/metadata")
    def series_metadata(study: UidPath, series: UidPath, request: Request, ctx: Ctx, _: Reader) -> JSONResponse:
        """WADO-RS Retrieve Series Metadata."""
        return _metadata(ctx, request, _one(result_files(ctx, study=study, series=series), "series"))

    @api.get("/studies/{study}/series/{series}/instances/{instance}")
    def retrieve_instance(study: UidPath, series: UidPath, instance: UidPath, ctx: Ctx,
                          _: Reader) -> StreamingResponse:
        """WADO-RS Retrieve Instance, as stored (no transcoding)."""
        files = _one(result_files(ctx, study=study, series=series, sop=instance), "instance")
        return _multipart([files[0].path])

    @api.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
    def instance_metadata(study: UidPath, series: UidPath, instance: UidPath, request: Request, ctx: Ctx,
                          _: Reader) -> JSONResponse:
        """WADO-RS Retrieve Instance Metadata."""
        return _metadata(ctx, request, _one(result_files(ctx, study=study, series=series, sop=instance), "instance"))

    @api.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}")
    def bulkdata(study: UidPath, series: UidPath, instance: UidPath, tag: str, ctx: Ctx, _: Reader) -> Response:
        """WADO-RS Retrieve Bulkdata (PS3.18 §10.4.1.1.5) named by a BulkDataURI of the metadata."""
        files = _one(result_files(ctx, study=study, series=series, sop=instance), "instance")
        try:
            number = int(tag, 16)
        except ValueError:
            raise HTTPException(404, f"no bulk data {tag!r}") from None
        full = pydicom.dcmread(files[0].path)
        if len(tag) != 8 or number not in full:
            raise HTTPException(404, f"instance has no bulk data {tag}")
        value = full[number].value
        if not isinstance(value, bytes):
            raise HTTPException(404, f"{keyword_for_tag(number) or tag} is not bulk data")
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + value
                + f"\r\n--{boundary}--\r\n".encode())
        return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')

    @api.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
    def retrieve_frames(study: UidPath, series: UidPath, instance: UidPath, frames: str, ctx: Ctx,
                        _: Reader) -> Response:
        """WADO-RS Retrieve Frames (PS3.18 §10.4.1.1.4): ``frames`` is a comma-separated list of 1-based frame
        numbers; native pixel data as ``application/octet-stream``, encapsulated frames in their own media type
        (no transcoding)."""
        files = _one(result_files(ctx, study=study, series=series, sop=instance), "instance")
        try:
            numbers = [int(n) for n in frames.split(",")]
        except ValueError:
            raise HTTPException(400, f"frame list {frames!r} is not comma-separated numbers") from None
        return _frames_response(pydicom.dcmread(files[0].path), numbers)

    return api


_FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def _frames_response(ds: Dataset, numbers: list[int]) -> Response:
    """The asked frames of ``ds`` as one multipart/related body (PS3.18 §8.7.3.3.2)."""
    if "PixelData" not in ds:
        raise HTTPException(404, "instance has no Pixel Data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not numbers or any(n < 1 or n > count for n in numbers):
        raise HTTPException(404, f"frames are numbered 1 to {count}")
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        from pydicom.encaps import generate_frames

        media = _FRAME_MEDIA_TYPES.get(syntax, "application/octet-stream")
        every = list(generate_frames(ds.PixelData, number_of_frames=count))
        chosen = [every[n - 1] for n in numbers]
    else:
        media = "application/octet-stream"
        bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated)
        if bits % 8:
            raise HTTPException(406, "frames of this bit-packed Pixel Data do not start on byte boundaries; "
                                     "retrieve the instance")
        size = bits // 8
        chosen = [ds.PixelData[(n - 1) * size : n * size] for n in numbers]
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {media}; transfer-syntax={syntax}\r\n\r\n".encode() + frame
                    + b"\r\n" for frame in chosen) + f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="{media}"; boundary={boundary}')
