"""Orthanc as a real PACS peer: every result object is accepted by C-STORE and filed in the source study."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

from tests.conftest import free_port
from tests.support.services import service_missing

ORTHANC = Path("/usr/sbin/Orthanc")
pytestmark = pytest.mark.xdist_group(name="reporting-orthanc")  # one Orthanc per test session


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """One Orthanc on loopback for the session: (AE title, DICOM port, REST base URL)."""
    if not ORTHANC.exists():
        service_missing("Orthanc is not installed (scripts/bootstrap.sh installs it)")
    home = tmp_path_factory.mktemp("orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "reporting-test",
        "StorageDirectory": str(home / "db"),
        "IndexDirectory": str(home / "db"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "UnknownSopClassAccepted": True,
        "Plugins": [],
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "StableAge": 1,
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    log = (home / "orthanc.log").open("w")
    process = subprocess.Popen(
        [str(ORTHANC), str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/system", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.terminate()
        pytest.fail(f"Orthanc did not start: {(home / 'orthanc.log').read_text()[-2000:]}")
    yield "ORTHANC", dicom_port, base
    process.terminate()
    process.wait(timeout=30)
    log.close()


def c_store(port: int, datasets: list) -> list[int]:
    """Send ``datasets`` in one association; the DIMSE status of each."""
    ae = AE(ae_title="RGPT-TEST")
    contexts = {str(ds.SOPClassUID) for ds in datasets}
    ae.requested_contexts = [build_context(uid, [ExplicitVRLittleEndian]) for uid in sorted(contexts)]
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    assert assoc.is_established, "association with Orthanc rejected"
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def test_orthanc_files_every_object_in_the_source_study(orthanc, built):
    _, port, base = orthanc
    _, sources, _, objects, _ = built
    results = objects.datasets
    assert len(results) == 1 + 2 + 2 + 1 and len(objects.segmentations) == 2
    assert c_store(port, [*sources, *results]) == [0x0000] * (len(sources) + len(results))
    found = httpx.post(
        f"{base}/tools/find",
        json={"Level": "Study", "Query": {"StudyInstanceUID": sources[0].StudyInstanceUID}},
    ).json()
    assert len(found) == 1
    instances = httpx.get(f"{base}/studies/{found[0]}/instances").json()
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
    assert stored == {str(ds.SOPInstanceUID) for ds in [*sources, *results]}
    series = httpx.get(f"{base}/studies/{found[0]}/series").json()
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert modalities == sorted(
        [str(sources[0].Modality), "SR", "SEG", str(objects.key_images[0].Modality), "DOC"]
    )
    patient = httpx.get(f"{base}/studies/{found[0]}/patient").json()
    assert patient["MainDicomTags"]["PatientID"] == sources[0].PatientID
