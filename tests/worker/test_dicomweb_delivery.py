"""DICOMweb destination against a real Orthanc with its DICOMweb plugin: STOW-RS delivery lands in the source
study and reads back with dicomweb-client (QIDO-RS, WADO-RS); a repeat files nothing twice; Orthanc down is
retried then delivered; a 4xx (wrong credentials) is dead-lettered with the reason; a STOW answer's Failed SOP
Sequence is recorded per instance with its Failure Reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import update

from tests.reporting.reporting_fixtures import make_source
from tests.support.orthanc import Orthanc
from tests.worker.delivery_world import World
from worker.config import Destination
from worker.db import Delivery, DeliveryObject, DeliveryState, FailureReason, StudyState
from worker.pipeline.dicomweb_delivery import store

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
USERS = {"retinalgpt": "s3cret"}


def _destination(url: str, password: str = "s3cret") -> str:
    return (f'name = "cloud"\nkind = "dicomweb"\nurl = "{url}"\ntimeout = 20\nconnect_timeout = 2\n'
            "backoff_seconds = 10\nmax_attempts = 4\n"
            f'auth = {{ kind = "basic", username = "retinalgpt", password = "{password}" }}\n')


def _reader(pacs: Orthanc) -> DICOMwebClient:
    session = requests.Session()
    session.auth = pacs.auth
    return DICOMwebClient(pacs.dicomweb_url, session=session)


def test_stow_lands_in_the_source_study_reads_back_and_a_repeat_files_nothing_twice(
        tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as pacs:
        world = World(tmp_path / "home", retina_rgb, _destination(pacs.dicomweb_url), key_image=True)
        assert world.deliver() == StudyState.DELIVERED
        rows = world.rows()
        assert {r.object_kind for r in rows} == {DeliveryObject.SR, DeliveryObject.KEY_IMAGE, DeliveryObject.PDF}
        assert all(r.state == DeliveryState.DELIVERED and r.attempts == 1 for r in rows)

        reader = _reader(pacs)
        found = reader.search_for_instances(study_instance_uid=world.study_uid)
        classes = sorted(pydicom.Dataset.from_json(item).SOPClassUID for item in found)
        assert classes == sorted([COMPREHENSIVE_3D_SR, ENCAPSULATED_PDF, SECONDARY_CAPTURE, SECONDARY_CAPTURE])
        written = pydicom.dcmread(world.results / "sr.dcm")
        sr = reader.retrieve_instance(world.study_uid, written.SeriesInstanceUID, written.SOPInstanceUID)
        assert sr.SOPInstanceUID == written.SOPInstanceUID and sr.PatientID == "P1"
        assert sr.ContentSequence == written.ContentSequence

        with world.db.session() as session:  # an operator resends: the same instances, filed once
            session.execute(update(Delivery).values(state=DeliveryState.PENDING))
        assert world.deliver() == StudyState.DELIVERED
        assert all(r.attempts == 2 for r in world.rows())
        assert len(reader.search_for_instances(study_instance_uid=world.study_uid)) == 4


def test_orthanc_down_is_retried_then_delivered(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    pacs = Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS)
    world = World(tmp_path / "home", retina_rgb, _destination(pacs.dicomweb_url))
    assert world.deliver() == StudyState.DELIVERING
    rows = world.rows()
    assert rows and all(r.state == DeliveryState.RETRYING and r.attempts == 1 for r in rows)
    assert all("ConnectionError" in r.last_error for r in rows)
    with pacs:
        world.make_due()
        assert world.deliver() == StudyState.DELIVERED
        found = _reader(pacs).search_for_instances(study_instance_uid=world.study_uid)
        assert COMPREHENSIVE_3D_SR in {pydicom.Dataset.from_json(item).SOPClassUID for item in found}


def test_wrong_credentials_are_dead_lettered_with_the_reason(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as pacs:
        world = World(tmp_path / "home", retina_rgb, _destination(pacs.dicomweb_url, password="wrong"))
        assert world.deliver() == StudyState.FAILED
        rows = world.rows()
        assert rows and all(r.state == DeliveryState.DEAD and r.failure == FailureReason.REFUSED for r in rows)
        assert all(r.attempts == 1 and r.last_error.startswith("HTTP 401") for r in rows)
        world.make_due()
        world.deliver()
        assert all(r.attempts == 1 for r in world.rows())  # dead stays dead: no loop
        assert _reader(pacs).search_for_studies() == []


def test_failed_sop_sequence_is_recorded_per_instance(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    """Orthanc refuses an instance posted to another study's URL (PS3.18 §10.5.1) with 409 and a Failed SOP
    Sequence; each refused instance is named with its Failure Reason, and the failure is permanent."""
    ds = make_source("op8", retina_rgb, generate_uid(), generate_uid())
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users=USERS) as pacs:
        destination = Destination(name="cloud", kind="dicomweb", url=pacs.dicomweb_url,
                                  auth={"kind": "basic", "username": "retinalgpt", "password": "s3cret"})
        result = store(destination, "1.2.3.4.5", [ds])
        assert result.status == 409 and result.permanent and not result.ok
        assert result.failed == [(str(ds.SOPInstanceUID), 0x0110)]
        assert f"{ds.SOPInstanceUID}: 0x0110 processing failure" in result.detail
        assert store(destination, str(ds.StudyInstanceUID), [ds]).ok

