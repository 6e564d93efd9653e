"""End to end through real processes: a camera stores a study by C-STORE (dcmtk storescu), `retinalgpt up` runs
node, inference and delivery on the embedded default, and an MLLP receiver (asyncio, ACKs built by hl7apy)
gets one ORU^R01 per revision: final first, a correction (C) after `studies rerun`; an AE answer is retried. The
inference pool process has loaded the model before the study arrives (it loads at start, not on the first study)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from reporting.hl7 import parse
from tests.conftest import free_port
from tests.e2e.test_pipeline import op_files
from tests.support.mllp import MllpReceiver
from tests.support.roles import Roles, retinalgpt, wait_for
from worker.config import load_settings
from worker.db import Database, Delivery, DeliveryState, Study, StudyState

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("e2e")]


def _config(home: Path, node_port: int, mllp_port: int) -> Path:
    config = home / "config.toml"
    config.write_text("\n".join([
        f'home = "{home}"',
        "[dicom]", 'ae_title = "RETINALGPT"', 'bind_address = "127.0.0.1"', f"port = {node_port}",
        'allowed_callers = [{ ae_title = "CAMERA", host = "127.0.0.1" }]', "stable_seconds = 2",
        "[pipeline]", "heartbeat_seconds = 1", "stale_after_seconds = 6", "requeue_after_seconds = 30",
        "failed_retry_seconds = 2", "sweep_seconds = 1",
        "[reporting]", "key_image = false",
        "[[destinations]]", 'name = "ehr"', 'kind = "hl7v2"', 'host = "127.0.0.1"', f"port = {mllp_port}",
        "timeout = 5", "backoff_seconds = 0.5",
        "[destinations.hl7]", 'sending_facility = "EYECLINIC"', 'receiving_application = "EHR"', "include_pdf = true",
    ]) + "\n")
    return config


def _study(config: Path, uid: str) -> Study | None:
    db = Database(load_settings(config).database.url)
    try:
        with db.session() as session:
            return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one_or_none()
    finally:
        db.dispose()


def _deliveries(config: Path) -> list[Delivery]:
    db = Database(load_settings(config).database.url)
    try:
        with db.session() as session:
            return list(session.scalars(select(Delivery).order_by(Delivery.id)))
    finally:
        db.dispose()


def test_camera_to_ehr_by_hl7_with_a_retry_and_a_corrected_revision(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    home = tmp_path / "home"
    home.mkdir()
    node_port = free_port()
    with MllpReceiver() as receiver:
        receiver.answers.append("AE")  # the engine fails the first attempt
        config = _config(home, node_port, receiver.port)
        retinalgpt("db", "upgrade", config=config)
        roles = Roles(config, tmp_path / "logs")
        diagnostics = lambda: "\n".join(f"--- {n}\n{roles.log(n)}" for n in sorted(roles.processes))  # noqa: E731
        try:
            roles.start("up", "up", "--no-api")
            wait_for(lambda: subprocess.run(["/usr/bin/echoscu", "-aet", "CAMERA", "-aec", "RETINALGPT", "127.0.0.1",
                                             str(node_port)], capture_output=True).returncode == 0, 90, "node echo",
                     diagnostics=diagnostics)
            wait_for(lambda: "RetinalGPT retinalgpt-tiny" in roles.log("up") and "loaded from" in roles.log("up"), 120,
                     "the inference process loading the model before any study arrives", diagnostics=diagnostics)
            study_uid, paths = op_files(tmp_path / "camera", retina_rgb)
            sent = subprocess.run(["/usr/bin/storescu", "-aet", "CAMERA", "-aec", "RETINALGPT", "127.0.0.1",
                                   str(node_port), *map(str, paths)], capture_output=True, text=True,
                                  env={**os.environ, "TCP_NODELAY": "1"})
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: (st := _study(config, study_uid)) and st.state == StudyState.DELIVERED, 600,
                     "the ORU acknowledged", interval=1, diagnostics=diagnostics)
            assert len(receiver.received) == 2 and receiver.received[0] == receiver.received[1]  # AE, then AA
            (row,) = _deliveries(config)
            assert row.state == DeliveryState.DELIVERED and row.attempts == 2

            first = parse(receiver.received[0])
            first.validate()
            assert first.oru_r01_patient_result.oru_r01_patient.pid.pid_3.to_er7().split("^")[0] == "E2E-1"
            order = first.oru_r01_patient_result.oru_r01_order_observation
            assert order.obr.obr_3.to_er7() == "ACC1" and order.obr.obr_25.to_er7() == "P"  # unsigned
            kinds = {g.obx.obx_2.to_er7() for g in order.oru_r01_observation}
            assert {"CWE", "NM", "TX", "ED"} <= kinds

            assert "revision 2" in retinalgpt("studies", "rerun", study_uid, config=config).stdout
            wait_for(lambda: (st := _study(config, study_uid)) and st.revision == 2
                     and st.state == StudyState.DELIVERED, 600, "revision 2 acknowledged", interval=1,
                     diagnostics=diagnostics)
            assert len(receiver.received) == 3
            corrected = parse(receiver.received[2]).oru_r01_patient_result.oru_r01_order_observation
            assert corrected.obr.obr_25.to_er7() == "P" and corrected.obr.obr_3.to_er7() == "ACC1"  # still unsigned
        finally:
            roles.stop_all()
