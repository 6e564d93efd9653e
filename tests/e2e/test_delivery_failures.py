"""Delivery when the PACS is down or refuses us: retries with backoff, dead-letter, resend once fixed."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from tests.e2e.test_pipeline import COMPREHENSIVE_3D_SR, Stack, op_files, results_in_pacs, stack
from tests.support.roles import retinalgpt, wait_for
from worker.db import Delivery, DeliveryState, Study, StudyState

pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("e2e")]


def pacs_deliveries(s: Stack) -> list[Delivery]:
    db = s.db
    try:
        with db.session() as session:
            return list(session.scalars(select(Delivery).where(Delivery.destination == "pacs")))
    finally:
        db.dispose()


def set_pacs_ae(s: Stack, ae_title: str) -> None:
    text = s.config.read_text()
    current = text.split('kind = "dicom"\nae_title = "')[1].split('"')[0]
    s.config.write_text(text.replace(f'kind = "dicom"\nae_title = "{current}"', f'kind = "dicom"\nae_title = "{ae_title}"'))


def test_pacs_down_then_back_and_pacs_rejecting_us(tmp_path: Path, retina_rgb: np.ndarray) -> None:
    with stack(tmp_path, start_pacs=False) as s:
        s.roles.start("node", "node")
        s.roles.start("inference", "worker", "--queues", "inference")
        s.roles.start("delivery", "worker", "--queues", "delivery")
        study_uid, paths = op_files(tmp_path / "camera", retina_rgb)
        wait_for(lambda: subprocess.run(["/usr/bin/echoscu", "-aet", "ORTHANC", "-aec", "RETINALGPT", "127.0.0.1",
                                         str(s.node_port)], capture_output=True).returncode == 0, 60, "node echo")
        sent = subprocess.run(["/usr/bin/storescu", "-aet", "ORTHANC", "-aec", "RETINALGPT", "127.0.0.1",
                               str(s.node_port), *map(str, paths)], capture_output=True, text=True,
                              env={**os.environ, "TCP_NODELAY": "1"})
        assert sent.returncode == 0, sent.stderr

        # PACS down: deliveries to it are retried with backoff, the others are delivered.
        wait_for(lambda: (rows := pacs_deliveries(s)) and all(r.state == DeliveryState.RETRYING and r.attempts >= 2
                                                                  for r in rows),
                 420, "retrying PACS deliveries", interval=1, diagnostics=s.diagnostics)
        assert (s.study(study_uid).state) == StudyState.DELIVERING
        s.pacs.start()
        results_in_pacs(s, study_uid)
        wait_for(lambda: s.study(study_uid).state == StudyState.DELIVERED, 120, "delivered after PACS came back",
                 diagnostics=s.diagnostics)

        # The PACS refuses our called AE title: dead-letter at once, no loop.
        set_pacs_ae(s, "WRONG-AE")
        s.roles.stop("delivery")
        s.roles.start("delivery", "worker", "--queues", "delivery")
        retinalgpt("studies", "resend", study_uid, config=s.config)
        dead = wait_for(lambda: (rows := pacs_deliveries(s)) and all(r.state == DeliveryState.DEAD for r in rows)
                        and {r.id: r.attempts for r in rows}, 120, "dead PACS deliveries", diagnostics=s.diagnostics)
        time.sleep(5)
        rows = pacs_deliveries(s)
        seen = [(r.object_kind.value, r.state.value, r.attempts, r.last_error) for r in rows]
        assert all(r.state == DeliveryState.DEAD and r.attempts == dead[r.id] for r in rows), f"dead work looped: {seen}"
        assert all(r.attempts <= 2 and "rejected" in (r.last_error or "") for r in rows), seen
        assert s.study(study_uid).state == StudyState.FAILED
        listing = retinalgpt("jobs", "list", "--state", "dead", "--json", config=s.config).stdout
        assert "delivery:sr" in listing and "pacs" in listing

        # Fixed: resend succeeds, and the PACS still holds a single SR (the same instance, not a copy).
        set_pacs_ae(s, "ORTHANC")
        s.roles.stop("delivery")
        s.roles.start("delivery", "worker", "--queues", "delivery")
        retinalgpt("studies", "resend", study_uid, config=s.config)
        wait_for(lambda: s.study(study_uid).state == StudyState.DELIVERED, 120, "delivered after resend",
                 diagnostics=s.diagnostics)
        assert s.pacs.sop_classes_in_study(study_uid).count(COMPREHENSIVE_3D_SR) == 1
        db = s.db
        with db.session() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
            assert study.revision == 1
        db.dispose()
