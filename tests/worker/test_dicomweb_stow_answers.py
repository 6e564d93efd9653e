"""STOW-RS answers that store only part of a request (PS3.18 §10.5.3: 202 Accepted with a Failed SOP Sequence,
and servers that say so with 200), from a loopback origin server that parses each request's instances and
answers the Store Instances Response in DICOM JSON: every refused instance is recorded with its Failure Reason
(0008,1197), the row follows the retry / dead-letter policy, and an answer that cannot say what was stored is
never taken for a delivery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.reporting.reporting_fixtures import make_source
from tests.support.dicomweb_peers import StowServer
from tests.worker.delivery_world import World
from worker.config import Destination
from worker.db import DeliveryObject, DeliveryState, FailureReason, StudyState
from worker.pipeline.dicomweb_delivery import store

OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
COERCED = 0xB000


@pytest.fixture(scope="module")
def origin() -> Iterator[StowServer]:
    with StowServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _accept_all(origin: StowServer) -> None:
    origin.decide, origin.status, origin.content_type = (lambda datasets: {}), None, "application/dicom+json"
    origin.warn, origin.body = {}, None


def _pair(retina_rgb: np.ndarray) -> list[Dataset]:
    study = generate_uid()
    return [make_source("op8", retina_rgb[::16, ::16].copy(), study, generate_uid()) for _ in range(2)]


def _refuse_first(code: int):
    return lambda datasets: {str(datasets[0].SOPInstanceUID): code} if len(datasets) > 1 else {}


def _destination(origin: StowServer) -> Destination:
    return Destination(name="cloud", kind="dicomweb", url=origin.url, connect_timeout=2, timeout=10)


@pytest.mark.parametrize("content_type", ["application/dicom+json", "application/dicom+json; charset=utf-8",
                                          "application/json"])
@pytest.mark.parametrize("status", [202, 200])
def test_one_failed_and_one_stored_instance_are_recorded_apart(origin: StowServer, retina_rgb,
                                                               status: int, content_type: str) -> None:
    origin.decide, origin.status, origin.content_type = _refuse_first(OUT_OF_RESOURCES), status, content_type
    refused, stored = _pair(retina_rgb)
    result = store(_destination(origin), str(refused.StudyInstanceUID), [refused, stored])
    assert not result.ok and result.status == status and not result.permanent  # 0xA7xx: retried
    assert result.failed == [(str(refused.SOPInstanceUID), OUT_OF_RESOURCES)]
    assert result.stored == [str(stored.SOPInstanceUID)]
    assert f"{refused.SOPInstanceUID}: 0xA700 out of resources" in result.detail
    assert f"1 of 2 instance(s) stored ({stored.SOPInstanceUID})" in result.detail


def test_a_202_without_a_readable_response_is_not_a_delivery(origin: StowServer, retina_rgb) -> None:
    origin.status, origin.content_type, origin.body = 202, "text/plain", b"Accepted"
    instances = _pair(retina_rgb)
    result = store(_destination(origin), str(instances[0].StudyInstanceUID), instances)
    assert not result.ok and result.status == 202 and not result.permanent
    assert result.detail.startswith("HTTP 202 without a readable Store Instances Response")


def test_warnings_only_are_stored_and_said(origin: StowServer, retina_rgb) -> None:
    """202 with a Warning Reason (0008,1196) and no failure (PS3.18 Table 10.5.3-1): the instance is stored."""
    instances = _pair(retina_rgb)
    origin.status, origin.warn = 202, {str(instances[1].SOPInstanceUID): COERCED}
    result = store(_destination(origin), str(instances[0].StudyInstanceUID), instances)
    assert result.ok and result.stored == [str(ds.SOPInstanceUID) for ds in instances]
    assert result.detail == f"warnings: {instances[1].SOPInstanceUID}: 0xB000 coercion of data elements"


@pytest.mark.parametrize(("code", "state", "study_state"), [
    (OUT_OF_RESOURCES, DeliveryState.RETRYING, StudyState.DELIVERING),
    (SOP_CLASS_NOT_SUPPORTED, DeliveryState.DEAD, StudyState.FAILED),
])
def test_a_partial_failure_follows_the_retry_policy(origin: StowServer, tmp_path: Path, retina_rgb: np.ndarray,
                                                    code: int, state: DeliveryState,
                                                    study_state: StudyState) -> None:
    """The key images of a two-eye study go in one request; the origin refuses the first one. Transient reasons
    are retried (the whole request again: the same UIDs, filed once), a permanent one is dead-lettered."""
    origin.decide = _refuse_first(code)
    world = World(tmp_path, retina_rgb, f'name = "cloud"\nkind = "dicomweb"\nurl = "{origin.url}"\n'
                  "connect_timeout = 2\nbackoff_seconds = 10\nmax_attempts = 4\n", key_image=True)
    assert world.deliver() == study_state
    rows = {row.object_kind: row for row in world.rows()}
    assert rows[DeliveryObject.SR].state == rows[DeliveryObject.PDF].state == DeliveryState.DELIVERED
    keys = rows[DeliveryObject.KEY_IMAGE]
    assert keys.state == state and keys.attempts == 1
    pairs = [r for r in origin.requests if len(r) == 2 and r[0].StudyInstanceUID == world.study_uid]
    (refused, stored), = pairs
    assert f"{refused.SOPInstanceUID}: 0x{code:04X}" in keys.last_error
    assert f"1 of 2 instance(s) stored ({stored.SOPInstanceUID})" in keys.last_error
    if state == DeliveryState.DEAD:
        assert keys.failure == FailureReason.REFUSED
        return
    origin.decide = lambda datasets: {}
    world.make_due()
    assert world.deliver() == StudyState.DELIVERED
    assert world.rows()[[r.object_kind for r in world.rows()].index(DeliveryObject.KEY_IMAGE)].attempts == 2
    again = [r for r in origin.requests if len(r) == 2 and r[0].StudyInstanceUID == world.study_uid][-1]
    assert [str(ds.SOPInstanceUID) for ds in again] == [str(refused.SOPInstanceUID), str(stored.SOPInstanceUID)]
