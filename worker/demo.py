"""``retinalgpt demo``: the main job end to end on the embedded default, then a readable summary.

In a temporary home it configures a node that accepts the camera ``DEMO-CAMERA`` and delivers to a folder,
starts every role as in ``retinalgpt up`` (node, inference worker, delivery worker), builds an Ophthalmic
Photography study of two eyes from ``skimage.data.retina()`` (the right eye, and its mirror image as the left
eye), sends it by C-STORE like a fundus camera, waits until the results are delivered and prints the findings
(with the conditions the model was not trained on as "not assessed"), the key measured values, the
model-vs-measured disagreement flags and where the SR, key images, PDF and FHIR bundle are.
"""

from __future__ import annotations

import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from model.schema import Laterality, StudyAnalysis
from reporting import summary
from worker.config import Settings, load_settings
from worker.pipeline.results import read_results

CAMERA_AE = "DEMO-CAMERA"
FOLDER_DESTINATION = "results-folder"
KEY_MEASUREMENTS = (
    "CDR_vertical", "Fractal_dimension", "Vessel_density", "Average_width",
    "CRAE_Knudtson_zone_b", "CRVE_Knudtson_zone_b", "AVR_Knudtson_zone_b",
)


class DemoError(RuntimeError):
    """The demo could not finish; the message says which step failed."""


@dataclass
class DemoResult:
    home: Path
    study_instance_uid: str
    analysis: StudyAnalysis
    results: Path
    delivered: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_demo_config(home: Path) -> Path:
    """A configuration for the embedded default in ``home`` (SQLite, SQLAlchemy broker, folder delivery)."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(
        f'home = "{home}"\n'
        "[dicom]\n"
        'ae_title = "RETINALGPT"\n'
        'bind_address = "127.0.0.1"\n'
        f"port = {_free_port()}\n"
        f'allowed_callers = [{{ ae_title = "{CAMERA_AE}", host = "127.0.0.1" }}]\n'
        "stable_seconds = 2\n"
        "[[destinations]]\n"
        f'name = "{FOLDER_DESTINATION}"\n'
        'kind = "folder"\n'
        'path = "delivered"\n'
    )
    return config


def demo_study(size: int = 1024) -> list[Dataset]:
    """Two OP instances (right eye, mirrored left eye) of one study from ``skimage.data.retina()``."""
    from PIL import Image
    from skimage import data

    from worker.pipeline.sources import ophthalmic_photograph

    right = np.asarray(Image.fromarray(data.retina()).resize((size, size), Image.Resampling.LANCZOS))
    study_uid, series_uid = generate_uid(), generate_uid()
    return [
        ophthalmic_photograph(pixels, study_instance_uid=study_uid, series_instance_uid=series_uid,
                              patient_id="DEMO-0001", patient_name="Demo^Patient", laterality=eye,
                              instance_number=number, accession_number="DEMO1",
                              study_description="Diabetic eye screening (demo)")
        for number, (eye, pixels) in enumerate(((Laterality.RIGHT, right), (Laterality.LEFT, right[:, ::-1])), 1)
    ]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_for_node(settings: Settings, timeout: float) -> None:
    from dicom_node.params import PeerParams
    from dicom_node.sender import echo

    peer = PeerParams(ae_title=settings.dicom.ae_title, host="127.0.0.1", port=settings.dicom.port,
                      calling_ae_title=CAMERA_AE, timeout=5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _port_open(peer.port) and echo(peer).ok:  # echo only once something listens: no connect errors logged
            return
        time.sleep(0.5)
    raise DemoError(f"the DICOM node did not answer C-ECHO on port {settings.dicom.port} within {timeout:.0f} s")


def _wait_for_study(settings: Settings, study_uid: str, timeout: float, console: Console) -> str:
    from worker.db import Database, Study, StudyState

    db = Database(settings.database.url)
    deadline = time.monotonic() + timeout
    state = "not yet received"
    try:
        with console.status("waiting for the study") as status:
            while time.monotonic() < deadline:
                with db.session() as session:
                    found = session.scalars(select(Study.state).where(Study.study_instance_uid == study_uid)).first()
                state = found.value if found is not None else state
                status.update(f"study state: [bold]{state}[/]")
                if found in (StudyState.DELIVERED, StudyState.FAILED):
                    return state
                time.sleep(0.5)
    finally:
        db.dispose()
    raise DemoError(f"the study did not finish within {timeout:.0f} s (last state: {state})")


def run_demo(home: Path | None = None, *, console: Console, timeout: float = 900.0) -> DemoResult:
    """Run the demo; raise :class:`DemoError` naming the failed step."""
    from dicom_node.params import PeerParams
    from dicom_node.sender import send_datasets
    from worker.db.migrate import upgrade
    from worker.pipeline.delivery import results_folder
    from worker.roles import Supervisor, up_roles

    home = (home or Path(tempfile.mkdtemp(prefix="retinalgpt-demo-"))).absolute()
    config = write_demo_config(home)
    settings = load_settings(config)
    upgrade(settings.database.url)
    console.print(f"home: {home}", highlight=False)
    supervisor = Supervisor(config, up_roles(with_api=False))
    supervisor.start()
    try:
        _wait_for_node(settings, timeout=120)
        study = demo_study()
        study_uid = str(study[0].StudyInstanceUID)
        peer = PeerParams(ae_title=settings.dicom.ae_title, host="127.0.0.1", port=settings.dicom.port,
                          calling_ae_title=CAMERA_AE)
        sent = send_datasets(peer, study)
        if not sent.ok:
            raise DemoError(f"C-STORE of the demo study failed: {sent.association_error or sent.instances}")
        console.print(f"sent study {study_uid} ({len(study)} OP images) by C-STORE as {CAMERA_AE}", highlight=False)
        state = _wait_for_study(settings, study_uid, timeout, console)
        if state != "delivered":
            raise DemoError(f"the study ended in state {state}: see `retinalgpt jobs list --config {config}`")
    finally:
        supervisor.stop()
    results = results_folder(settings, study_uid, 1)
    analysis = StudyAnalysis.model_validate_json((results / "analysis.json").read_text())
    delivered = settings.destination(FOLDER_DESTINATION).path / study_uid / "r1"
    return DemoResult(home, study_uid, analysis, results, delivered)


def print_summary(result: DemoResult, console: Console) -> None:
    analysis = result.analysis
    model = f"{analysis.model.name} {analysis.model.version}" if analysis.model else "not run"
    console.rule("RetinalGPT demo result")
    console.print(f"study {analysis.study_instance_uid}  referral: [bold]{analysis.referral.value}[/]  "
                  f"model: {model}", highlight=False)
    console.print(f"impression: {analysis.impression}", highlight=False, markup=False)
    for note in analysis.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    findings = Table("Eye", "Quality", "Condition", "Grade", "Probability")
    measures = Table("Eye", "Measurement (measured)", "Value", "Unit")
    flags: list[str] = []
    for image in analysis.images:
        eye = image.laterality.value
        quality = f"{image.quality.grade.value} ({image.quality.score:.2f})" if image.quality else "-"
        for finding in image.findings:
            prob = f"{finding.probability:.2f}" if finding.probability is not None else "-"
            findings.add_row(eye, quality, finding.condition.value,
                             "-" if finding.grade is None else str(finding.grade), prob)
        for condition in summary.not_assessed(image):
            findings.add_row(eye, quality, condition.value, summary.NOT_ASSESSED, "-")
        if not image.findings and not summary.not_assessed(image):
            findings.add_row(eye, quality, f"({'; '.join(summary.image_summary(analysis, image))})", "", "")
        for m in summary.reported_measurements(image):
            if m.key in KEY_MEASUREMENTS:
                measures.add_row(eye, m.key, f"{m.value:.3f}", m.unit)
        flags += [f"{eye}: {summary.disagreement_text(d)}" for d in image.disagreements]
    console.print(findings)
    console.print(measures)
    for flag in flags:
        console.print(flag, highlight=False, markup=False)
    files = Table("Object", "Path")
    files.columns[1].overflow = "fold"
    written = read_results(result.results)
    for path in written.all_files() if written else []:
        files.add_row(path.name, str(path))
    files.add_row("delivered to folder destination", str(result.delivered))
    console.print(files)
