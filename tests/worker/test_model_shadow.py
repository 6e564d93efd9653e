"""Shadow mode (issue 17 item 3) through the real node role and a real inference worker process.

Two registry versions of the bundled model: v1 active, v2 put in shadow with ``retinalgpt model shadow v2``.
A camera sends a photograph with dcmtk's storescu; the inference worker analyses it with v1 (the study's result,
with its outbox), then with v2 as a shadow analysis queued at the lowest priority. The shadow analysis is stored
and audited but creates nothing to deliver and is never the study's result: the SR that reaches the destination
(a dcmtk storescp) names v1 in its ContributingEquipmentSequence, the study API shows v1, and ``model compare``
reads the pair. ``model shadow --off`` stops it; the active version cannot be its own shadow.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from model.registry import ModelRegistry
from tests.dicom_node.dicom_fixtures import storescu
from tests.support.model_site import two_version_site
from tests.support.net import free_port
from tests.support.roles import Roles, wait_for
from worker.celery_app import shadow_priority
from worker.cli.app import app
from worker.db import Analysis, AuditEvent, Delivery, Study, StudyState
from worker.db.queries import current_analysis
from worker.pipeline.delivery import deliver_revision, latest_analysis
from worker.roles import start_node_role


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def test_shadow_priority_is_below_every_study() -> None:
    assert shadow_priority("redis://127.0.0.1:6379/0") == 9  # Redis pops 0 first; normal studies are 6
    assert shadow_priority("amqp://guest@127.0.0.1//") == 0  # AMQP: higher first; urgent 9, normal 0
    assert shadow_priority("sqla+sqlite:///x.db") is None


def test_candidate_runs_in_shadow_without_delivering(tmp_path: Path, op_file, monkeypatch: pytest.MonkeyPatch) -> None:
    port, pacs_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        f'[dicom]\nbind_address = "127.0.0.1"\nport = {port}\nstable_seconds = 0.5\n'
        'allowed_callers = [{ ae_title = "CAMERA1" }]\n'
        '[model]\ndevice = "cpu"\nmax_new_tokens = 8\n[analysis]\nvessel_method = "classical"\nworking_size = 256\n'
        '[pipeline]\nheartbeat_seconds = 1\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_port}\n'
    )
    settings = two_version_site(config, monkeypatch)
    code, out = run("model", "shadow", "v1")
    assert code != 0 and "is the active version" in out
    code, out = run("model", "shadow", "v2")
    assert code == 0 and "shadow model version: v2" in out, out
    code, out = run("model", "list", "--json")
    assert [(v["version"], v["active"], v["shadow"]) for v in json.loads(out)] == [("v1", True, False),
                                                                              ("v2", False, True)]

    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    roles = Roles(config, tmp_path / "logs")
    role = start_node_role(settings)
    db = role.running.db
    logs = lambda: roles.log("inference")  # noqa: E731
    try:
        roles.start("inference", "worker", "--queues", "inference")
        sent = storescu(role.port, [op_file("eye.dcm", patient_id="SHADOW1")])
        assert sent.returncode == 0, sent.stderr

        def analyses() -> list[Analysis]:
            with db.reading() as session:
                return list(session.scalars(select(Analysis).order_by(Analysis.id)))

        wait_for(lambda: len(analyses()) == 2, 240, "the active and the shadow analysis", diagnostics=logs)
        active, shadow = analyses()
        assert (active.model_version, active.shadow) == ("v1", False)
        assert (shadow.model_version, shadow.shadow, shadow.revision) == ("v2", True, active.revision)
        assert shadow.result["model"]["version"] == "v2" and shadow.result["images"]
        with db.reading() as session:
            study = session.scalars(select(Study)).one()
            assert study.state == StudyState.ANALYSED  # the shadow analysis changed nothing of the study
            deliveries = session.scalars(select(Delivery)).all()
            assert {(d.destination, d.revision) for d in deliveries} == {("pacs", 1)}
            assert current_analysis(session, study).model.version == "v1"  # what the API and UI show
            assert latest_analysis(session, study, 1).model_version == "v1"  # what delivery builds from
            events = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.shadow_analysed")).all()
            assert [e.detail["model"].split()[-1] for e in events] == ["v2"]

        state = deliver_revision(settings, db, study.study_instance_uid, 1)  # after the shadow analysis
        assert state == StudyState.DELIVERED
        files = [pydicom.dcmread(p) for p in received.iterdir()]
        assert files, "nothing reached the destination"
        versions = {item.SoftwareVersions for ds in files for item in ds.get("ContributingEquipmentSequence", [])
                    if "SoftwareVersions" in item}
        assert "v1" in versions and "v2" not in versions, versions

        code, out = run("model", "compare", "v2", "--json")
        assert code == 0, out
        assert json.loads(out)["studies_both_read"] == 1
        code, out = run("model", "shadow", "--off")
        assert code == 0 and "shadow mode off" in out and ModelRegistry(settings.model.registry).shadow() is None
        assert run("model", "shadow", "v2")[0] == 0
        code, out = run("model", "activate", "v2")  # no signed case: inconclusive, refused unless forced
        assert code != 0 and "cannot judge v2" in out and "inconclusive: 0 signed studies" in out, out
        code, out = run("model", "activate", "v2", "--force")
        assert code == 0 and "forced past the promotion gate" in out, out
        assert ModelRegistry(settings.model.registry).shadow() is None  # the promoted candidate is no shadow
    finally:
        roles.stop_all()
        role.stop()
        pacs.terminate()
        pacs.wait(10)
