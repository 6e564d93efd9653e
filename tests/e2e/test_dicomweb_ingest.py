"""DICOMweb ingest and read (issue 16 item 2) on real processes: node, API and a worker (model disabled, so the
measurement pipeline analyses). A study made with dcmtk ``img2dcm -oph`` is sent by STOW-RS with
``dicomweb-client``, completes through the node's completion tracker, is analysed, and its SR reads back by
QIDO-RS / WADO-RS and parses with pydicom; Orthanc's DICOMweb plugin, an independent client, sends a study by
STOW-RS and pulls our results back by WADO-RS. Hostile requests — no or wrong token, a reader's token, a part that
is not DICOM, an instance of another study posted to ``/studies/{study}``, an instance over the size limit, a
body over the request limit (declared or streamed) — get a clear error, store nothing, lose nothing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from tests.api.conftest import READ_TOKEN, sha
from tests.dicom_node.dicom_fixtures import make_op, write_jpeg
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.roles import Roles, retinalgpt, wait_for
from worker.config import load_settings
from worker.db import AuditEvent, Database, Instance, ResultObject, Study, StudyState
from worker.pipeline.sources import ophthalmic_photograph

pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group("e2e")]

SENDER_TOKEN = "sender-token-Hq3Lw8ZkPe"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
MIB = 1 << 20


@dataclass
class Site:
    base: str
    db: Database
    storage: Path
    roles: Roles
    tmp: Path

    def client(self, token: str | None) -> DICOMwebClient:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return DICOMwebClient(f"{self.base}/dicomweb", headers=headers)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.roles.log(name)}" for name in ("node", "api", "worker"))

    def instances(self, sop_uids: list[str]) -> int:
        with self.db.reading() as session:
            return session.scalar(select(func.count()).select_from(Instance)
                                  .where(Instance.sop_instance_uid.in_(sop_uids))) or 0

    def leftovers(self) -> list[Path]:
        return [p for p in (self.storage / ".incoming").rglob("*") if p.is_file()]

    def study(self, uid: str) -> Study | None:
        with self.db.reading() as session:
            return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("dicomweb")
    node_port, api_port = free_port(), free_port()
    config = tmp / "retinalgpt.toml"
    config.write_text(
        f'home = "{tmp / "home"}"\n'
        "[dicom]\n"
        f'bind_address = "127.0.0.1"\nport = {node_port}\nstable_seconds = 1\nmax_instance_mb = 1\n'
        "[model]\nenabled = false\n"
        "[api]\n"
        f'port = {api_port}\nstow_max_request_mb = 3\nbase_url = "http://127.0.0.1:{api_port}"\n'  # dicomweb-client
        # sends Host without the port: absolute URLs in answers (RetrieveURL, BulkDataURI) come from base_url
        f'tokens = [{{ name = "viewer", sha256 = "{sha(READ_TOKEN)}", role = "read" }}, '
        f'{{ name = "router-7", sha256 = "{sha(SENDER_TOKEN)}", role = "sender" }}]\n')
    retinalgpt("db", "upgrade", config=config)
    settings = load_settings(config)
    roles = Roles(config, tmp / "logs")
    db = Database(settings.database.url)
    site = Site(f"http://127.0.0.1:{api_port}", db, settings.storage.path, roles, tmp)

    def api_up() -> bool:
        try:
            return httpx.get(f"{site.base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        roles.start("node", "node")
        roles.start("api", "api")
        roles.start("worker", "worker", "--queues", "inference,delivery")
        wait_for(api_up, 90, "the API", diagnostics=site.logs)
        yield site
    finally:
        roles.stop_all()
        db.dispose()


@pytest.fixture(scope="module")
def small_jpeg(tmp_path_factory: pytest.TempPathFactory, retina_rgb: np.ndarray) -> Path:
    rgb = np.asarray(Image.fromarray(retina_rgb).resize((512, 512), Image.Resampling.LANCZOS))
    return write_jpeg(rgb, tmp_path_factory.mktemp("jpeg") / "retina.jpg")


def op_study(folder: Path, jpeg: Path, patient_id: str) -> list[pydicom.Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    return [pydicom.dcmread(make_op(jpeg, folder / f"{eye}.dcm", study_uid=study_uid, series_uid=series_uid,
                                    laterality=eye, patient_id=patient_id)) for eye in ("R", "L")]


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: {media}\r\n\r\n".encode() + data + b"\r\n" for media, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def encoded(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    with BytesIO() as out:
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        return out.getvalue()


def failures(answer: dict) -> list[tuple[str | None, int]]:
    ds = pydicom.Dataset.from_json(answer)
    return [(item.get("ReferencedSOPInstanceUID") or None, int(item.FailureReason))
            for item in ds.get("FailedSOPSequence", [])]


def test_stow_study_completes_is_analysed_and_its_sr_reads_back(site: Site, small_jpeg: Path) -> None:
    datasets = op_study(site.tmp / "study", small_jpeg, "STOW-P1")
    study_uid = str(datasets[0].StudyInstanceUID)
    answer = site.client(SENDER_TOKEN).store_instances(datasets)
    assert sorted(item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence) == sorted(
        str(ds.SOPInstanceUID) for ds in datasets)
    assert "FailedSOPSequence" not in answer

    wait_for(lambda: (st := site.study(study_uid)) and st.state == StudyState.DELIVERED, 300,
             "the STOW-RS study to complete, be analysed and its results built", interval=1, diagnostics=site.logs)
    with site.db.reading() as session:
        rows = session.execute(select(Instance.calling_ae_title, Instance.path, Instance.analysable)
                               .join(Study).where(Study.study_instance_uid == study_uid)).all()
        completed = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "study.complete",
                                                                   AuditEvent.study_instance_uid == study_uid)).all()
        built = session.scalars(select(ResultObject.sop_instance_uid).join(Study)
                                .where(Study.study_instance_uid == study_uid)).all()
    assert len(rows) == 2 and all(r.calling_ae_title == "router-7" and r.analysable for r in rows)
    stored = pydicom.dcmread(rows[0].path)  # stored as received, behind our File Meta Information
    assert stored.file_meta.SourceApplicationEntityTitle == "router-7" and stored.PatientID == "STOW-P1"
    assert completed == ["dicom-node"] and built

    reader = site.client(READ_TOKEN)
    studies = reader.search_for_studies(search_filters={"PatientID": "STOW-P1"})
    assert len(studies) == 1
    found = pydicom.Dataset.from_json(studies[0])
    assert found.StudyInstanceUID == study_uid and "SR" in found.ModalitiesInStudy
    assert reader.search_for_studies(search_filters={"PatientID": "STOW-P1", "ModalitiesInStudy": "MR"}) == []
    series = [pydicom.Dataset.from_json(s) for s in reader.search_for_series(study_uid)]
    (sr_series,) = [s for s in series if s.Modality == "SR"]
    (sr_item,) = [pydicom.Dataset.from_json(i) for i in reader.search_for_instances(
        study_uid, sr_series.SeriesInstanceUID) if pydicom.Dataset.from_json(i).SOPClassUID == COMPREHENSIVE_3D_SR]
    sr = reader.retrieve_instance(study_uid, sr_series.SeriesInstanceUID, sr_item.SOPInstanceUID)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.PatientID == "STOW-P1" and sr.StudyInstanceUID == study_uid
    assert sr.ContentSequence and sr.SOPInstanceUID in built
    metadata = reader.retrieve_instance_metadata(study_uid, sr_series.SeriesInstanceUID, sr_item.SOPInstanceUID)
    assert pydicom.Dataset.from_json(metadata).ContentSequence == sr.ContentSequence
    originals = {str(ds.SOPInstanceUID) for ds in datasets}
    served = {pydicom.Dataset.from_json(i).SOPInstanceUID for i in reader.search_for_instances(study_uid)}
    assert served and not served & originals  # only our own objects are served
    with pytest.raises(requests.HTTPError) as refused:  # a sender's token cannot read
        site.client(SENDER_TOKEN).search_for_studies()
    assert refused.value.response.status_code == 403

    objects = [pydicom.Dataset.from_json(i) for i in reader.search_for_instances(study_uid)]
    key = next(o for o in objects if o.SOPClassUID == SECONDARY_CAPTURE)  # a key image: the frame a viewer draws
    frames = reader.retrieve_instance_frames(study_uid, key.SeriesInstanceUID, key.SOPInstanceUID, frame_numbers=[1])
    assert frames == [reader.retrieve_instance(study_uid, key.SeriesInstanceUID, key.SOPInstanceUID).PixelData]
    pdf = next(o for o in objects if o.SOPClassUID == ENCAPSULATED_PDF)  # the PDF by its metadata's BulkDataURI
    pdf_metadata = reader.retrieve_instance_metadata(study_uid, pdf.SeriesInstanceUID, pdf.SOPInstanceUID)
    (document,) = reader.retrieve_bulkdata(pdf_metadata["00420011"]["BulkDataURI"])
    assert document.startswith(b"%PDF")
    auth = {"Authorization": f"Bearer {READ_TOKEN}"}
    paged = httpx.get(f"{site.base}/dicomweb/studies", params={"PatientID": "STOW-P1", "limit": 0, "Foo": "1"},
                      headers=auth, timeout=10)
    assert paged.status_code == 200 and paged.json() == [] and "Foo" in paged.headers["warning"]
    assert httpx.get(f"{site.base}/dicomweb/studies/{generate_uid()}", headers=auth, timeout=10).status_code == 404


def test_orthanc_pushes_a_study_by_stow_and_pulls_our_results_back_by_wado(site: Site, small_jpeg: Path) -> None:
    """An independent DICOMweb client: Orthanc's DICOMweb plugin sends a study to us by STOW-RS (chunked, with
    the sender's bearer token), and once it is analysed retrieves our result objects of the study by WADO-RS."""
    datasets = op_study(site.tmp / "orthanc-study", small_jpeg, "ORTHANC-P1")
    study_uid = str(datasets[0].StudyInstanceUID)
    servers = {name: {"Url": f"{site.base}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {token}"}}
               for name, token in (("retina-in", SENDER_TOKEN), ("retina-out", READ_TOKEN))}
    with Orthanc(site.tmp / "orthanc", dicomweb_servers=servers) as pacs:
        for n, ds in enumerate(datasets):
            path = site.tmp / "orthanc-study" / f"{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            pacs.upload(path)
        pacs.post("/dicom-web/servers/retina-in/stow", {"Resources": [pacs.study_id(study_uid)]})
        wait_for(lambda: (st := site.study(study_uid)) and st.state == StudyState.DELIVERED, 300,
                 "the study Orthanc sent to be analysed", interval=1, diagnostics=site.logs)
        with site.db.reading() as session:
            senders = session.scalars(select(Instance.calling_ae_title).join(Study)
                                      .where(Study.study_instance_uid == study_uid)).all()
        assert senders == ["router-7", "router-7"]
        pacs.post("/dicom-web/servers/retina-out/retrieve", {"Resources": [{"Study": study_uid}]})
        classes = pacs.sop_classes_in_study(study_uid)
        assert classes.count(OP_8BIT) == 2 and COMPREHENSIVE_3D_SR in classes
        assert ENCAPSULATED_PDF in classes and SECONDARY_CAPTURE in classes


def test_stow_without_the_sender_role_is_refused_and_stores_nothing(site: Site, small_jpeg: Path) -> None:
    datasets = op_study(site.tmp / "auth", small_jpeg, "AUTH-P1")
    sops = [str(ds.SOPInstanceUID) for ds in datasets]
    for token, status in ((None, 401), ("not-a-token", 401), (READ_TOKEN, 403)):
        with pytest.raises(requests.HTTPError) as refused:
            site.client(token).store_instances(datasets)
        assert refused.value.response.status_code == status, token
    assert site.instances(sops) == 0 and site.study(str(datasets[0].StudyInstanceUID)) is None


def test_hostile_parts_are_refused_one_by_one_and_the_good_one_is_stored(site: Site, small_jpeg: Path) -> None:
    good, _ = op_study(site.tmp / "mixed", small_jpeg, "MIXED-P1")
    body, content_type = multipart([
        ("text/plain", b"hello, not a DICOM file"),
        ("application/dicom", b"\x00" * 128 + b"DICX" + b"junk" * 100),
        ("application/dicom", encoded(good)),
    ])
    response = httpx.post(f"{site.base}/dicomweb/studies", content=body, timeout=30,
                          headers={"Content-Type": content_type, "Authorization": f"Bearer {SENDER_TOKEN}"})
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert failures(response.json()) == [(None, 0xC000), (None, 0xC000)]
    warning = response.headers["warning"]
    assert "not application/dicom" in warning and "no 'DICM' prefix" in warning
    stored = pydicom.Dataset.from_json(response.json()).ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in stored] == [good.SOPInstanceUID]
    assert site.instances([str(good.SOPInstanceUID)]) == 1
    assert site.leftovers() == []


def test_instance_of_another_study_posted_to_a_study_is_refused(site: Site, small_jpeg: Path) -> None:
    datasets = op_study(site.tmp / "other", small_jpeg, "OTHER-P1")
    target = generate_uid()
    with pytest.raises(requests.HTTPError) as refused:
        site.client(SENDER_TOKEN).store_instances(datasets, study_instance_uid=target)
    response = refused.value.response
    assert response.status_code == 409
    assert failures(response.json()) == [(str(ds.SOPInstanceUID), 0xA900) for ds in datasets]
    assert f"posted to study {target}" in response.headers["warning"]
    assert site.instances([str(ds.SOPInstanceUID) for ds in datasets]) == 0
    assert not (site.storage / str(datasets[0].StudyInstanceUID)).exists() and site.leftovers() == []
    answer = site.client(SENDER_TOKEN).store_instances(datasets, study_instance_uid=str(datasets[0].StudyInstanceUID))
    assert len(answer.ReferencedSOPSequence) == 2  # posted to its own study it is stored: nothing lost


def test_oversized_instance_and_oversized_bodies_store_nothing(site: Site, small_jpeg: Path) -> None:
    rgb = np.random.default_rng(7).integers(0, 255, (700, 700, 3), dtype=np.uint8)  # 1.4 MiB > max_instance_mb
    study_uid = generate_uid()
    big = ophthalmic_photograph(rgb, study_instance_uid=study_uid, series_instance_uid=generate_uid(),
                                patient_id="BIG-P1", patient_name="Big^Body")
    headers = {"Authorization": f"Bearer {SENDER_TOKEN}"}
    body, content_type = multipart([("application/dicom", encoded(big))])
    response = httpx.post(f"{site.base}/dicomweb/studies", content=body, timeout=30,
                          headers={**headers, "Content-Type": content_type})
    assert response.status_code == 409 and failures(response.json()) == [(str(big.SOPInstanceUID), 0xA700)]
    assert "exceeds the 1 MiB instance limit" in response.headers["warning"]

    small = op_study(site.tmp / "big", small_jpeg, "BIG-P2")
    parts = [("application/dicom", encoded(ds)) for ds in small] + [("application/dicom", b"\x00" * (4 * MIB))]
    body, content_type = multipart(parts)
    declared = httpx.post(f"{site.base}/dicomweb/studies", content=body, timeout=30,
                          headers={**headers, "Content-Type": content_type})
    assert declared.status_code == 413 and "nothing of it was stored" in declared.json()["detail"]

    def streamed() -> Iterator[bytes]:  # no Content-Length: cut off at the limit while it streams
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    chunked = httpx.post(f"{site.base}/dicomweb/studies", content=streamed(), timeout=30,
                         headers={**headers, "Content-Type": content_type})
    assert chunked.status_code == 413
    sops = [str(big.SOPInstanceUID), *(str(ds.SOPInstanceUID) for ds in small)]
    assert site.instances(sops) == 0 and site.study(str(small[0].StudyInstanceUID)) is None
    wait_for(lambda: site.leftovers() == [], 10, "the spooled parts of the cut-off request to be removed")
    answer = site.client(SENDER_TOKEN).store_instances(small)  # the same study, sent whole: stored
    assert len(answer.ReferencedSOPSequence) == 2 and site.instances(sops) == 2


def test_too_many_parts_is_413_and_stores_nothing(site: Site, small_jpeg: Path) -> None:
    good, _ = op_study(site.tmp / "many", small_jpeg, "MANY-P1")
    body, content_type = multipart([("application/dicom", encoded(good))] + [("text/plain", b"")] * 10_000)
    response = httpx.post(f"{site.base}/dicomweb/studies", content=body, timeout=60,
                          headers={"Content-Type": content_type, "Authorization": f"Bearer {SENDER_TOKEN}"})
    assert response.status_code == 413 and "more than 10000 parts" in response.json()["detail"]
    assert site.instances([str(good.SOPInstanceUID)]) == 0 and site.leftovers() == []


def test_a_sender_token_cannot_sign_in_to_the_review_page(site: Site) -> None:
    refused = httpx.post(f"{site.base}/ui/login", data={"token": SENDER_TOKEN, "next": "/ui/"}, timeout=10)
    assert refused.status_code == 403 and "may only send studies" in refused.text
    assert "set-cookie" not in refused.headers


def test_not_multipart_is_415(site: Site) -> None:
    response = httpx.post(f"{site.base}/dicomweb/studies", content=b"{}", timeout=10,
                          headers={"Content-Type": "application/json", "Authorization": f"Bearer {SENDER_TOKEN}"})
    assert response.status_code == 415 and "multipart/related" in response.json()["detail"]
