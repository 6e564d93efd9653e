"""A real Orthanc PACS on loopback for tests: started with a temporary configuration and storage."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.net import free_port
from tests.support.services import service_missing

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """``with Orthanc(tmp, modalities={...}) as pacs:`` — DICOM on ``pacs.dicom_port``, REST on ``pacs.url``.
    ``dicomweb_servers``: remote DICOMweb servers Orthanc can STOW to and QIDO/WADO from (DicomWeb.Servers)."""

    def __init__(self, folder: Path, *, ae_title: str = "ORTHANC", modalities: dict[str, list[Any]] | None = None,
                 check_called_aet: bool = True, dicom_port: int | None = None,
                 known_callers_only: bool = False, dicomweb: bool = False,
                 users: dict[str, str] | None = None, dicomweb_servers: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = modalities or {}
        self.check_called_aet = check_called_aet
        self.known_callers_only = known_callers_only
        self.dicomweb = dicomweb or bool(dicomweb_servers)
        self.dicomweb_servers = dicomweb_servers or {}
        self.users = users or {}
        self.auth = next(iter(self.users.items())) if self.users else None
        self.process: subprocess.Popen | None = None

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb plugin (STOW-RS, QIDO-RS, WADO-RS)."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        config = {
            "Name": f"test-{self.ae_title}",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowStore": not self.known_callers_only,
            "DicomAlwaysAllowEcho": not self.known_callers_only,
            "DicomCheckModalityHost": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpServerEnabled": True,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "StableAge": 1,
            "HttpTimeout": 30,
            "DicomScuTimeout": 30,
        }
        if self.dicomweb:
            if not Path(DICOMWEB_PLUGIN).exists():
                service_missing("Orthanc's DICOMweb plugin is not installed (scripts/bootstrap.sh installs "
                                "orthanc-dicomweb)")
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                                  "StudiesMetadata": "Full", "SeriesMetadata": "Full",
                                  "Servers": self.dicomweb_servers}
        return config

    def start(self) -> Orthanc:
        if not Path(ORTHANC).exists():
            service_missing("Orthanc is not installed (scripts/bootstrap.sh installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self.config()))
        log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1, auth=self.auth).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30, auth=self.auth)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{self.url}{path}", content=content, timeout=120, auth=self.auth)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> str:
        """Store a DICOM file through REST; returns Orthanc's instance ID."""
        return self.post("/instances", path.read_bytes())["ID"]

    def study_id(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        return next((item["ID"] for item in found if item["Type"] == "Study"), None)

    def stored_files(self, study_instance_uid: str) -> dict[str, bytes]:
        """SOP Instance UID → the file Orthanc stored, for every instance of the study (empty when unknown)."""
        study = self.study_id(study_instance_uid)
        if study is None:
            return {}
        return {item["MainDicomTags"]["SOPInstanceUID"]:
                httpx.get(f"{self.url}/instances/{item['ID']}/file", timeout=30, auth=self.auth).content
                for item in self.get(f"/studies/{study}/instances")}

    def sop_classes_in_study(self, study_instance_uid: str) -> list[str]:
        study = self.study_id(study_instance_uid)
        if study is None:
            return []
        return [self.get(f"/instances/{item['ID']}/tags?simplify")["SOPClassUID"]
                for item in self.get(f"/studies/{study}/instances")]
