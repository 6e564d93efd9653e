"""The operator commands: db upgrade, node (as a real process), studies list/show (with the current result),
send, echo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from model.schema import (
    Condition,
    Disagreement,
    Finding,
    ImageAnalysis,
    Laterality,
    Measurement,
    ModelIdentity,
    Quality,
    QualityGrade,
    Referral,
    Source,
    StudyAnalysis,
)
from tests.dicom_node.dicom_fixtures import storescu
from worker.cli.app import app
from worker.config import load_settings
from worker.db import Analysis, Database, Study, StudyState

RETINALGPT = str(Path(sys.executable).parent / "retinalgpt")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"node did not listen on {port}")


@pytest.fixture
def node_process(config_file, free_tcp_port):
    destination = (
        '[[destinations]]\nname = "self"\nkind = "dicom"\nae_title = "RETINALGPT"\nhost = "127.0.0.1"\n'
        f"port = {free_tcp_port}\ntimeout = 10\n"
    )
    config = config_file(port=free_tcp_port, stable_seconds=1.0, extra=destination)
    process = subprocess.Popen([RETINALGPT, "node", "--config", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "TCP_NODELAY": "1"})
    try:
        _wait_for_port(free_tcp_port, process)
        yield config, free_tcp_port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def test_db_upgrade_and_schema_check(config_file):
    config = str(config_file())
    listed = _invoke("studies", "list", "--config", config)
    assert listed.exit_code == 1 and "retinalgpt db upgrade" in listed.output
    upgraded = _invoke("db", "upgrade", "--config", config)
    assert upgraded.exit_code == 0, upgraded.output
    assert "database at revision" in upgraded.output
    empty = _invoke("studies", "list", "--json", "--config", config)
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []


def test_node_receives_and_studies_commands_show_it(node_process, op_file):
    config, port, process = node_process
    config = str(config)
    study_uid = generate_uid()
    sent = op_file(study_uid=study_uid)
    assert storescu(port, [sent]).returncode == 0

    deadline = time.monotonic() + 30
    while True:
        listed = _invoke("studies", "list", "--json", "--config", config)
        assert listed.exit_code == 0, listed.output
        rows = json.loads(listed.stdout)
        if rows and rows[0]["state"] != "receiving" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert [(r["study_instance_uid"], r["instances"], r["revision"]) for r in rows] == [(study_uid, 1, 1)]
    assert rows[0]["state"] != "receiving"

    shown = _invoke("studies", "show", study_uid, "--json", "--config", config)
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.stdout)
    instance = detail["series"][0]["instances"][0]
    assert instance["sop_instance_uid"] == dcmread(sent).SOPInstanceUID
    assert instance["calling_ae_title"] == "CAMERA1" and Path(instance["path"]).is_file()
    human = _invoke("studies", "show", study_uid, "--config", config)
    assert human.exit_code == 0 and study_uid in human.output

    missing = _invoke("studies", "show", "1.2.3.4", "--config", config)
    assert missing.exit_code == 1 and "no study 1.2.3.4" in missing.output

    echoed = _invoke("echo", "self", "--config", config)
    assert echoed.exit_code == 0 and "success" in echoed.output
    other = op_file("other.dcm", study_uid=study_uid)
    sent_again = _invoke("send", str(other), "--to", "self", "--json", "--config", config)
    assert sent_again.exit_code == 0, sent_again.output
    assert json.loads(sent_again.stdout)["instances"][0]["status"] == 0

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "DICOM node stopped" in output


def test_studies_show_prints_the_current_result(config_file):
    """``studies show`` prints the current result per eye: present findings, the conditions the model was not
    trained on as "not assessed", an ungradable eye as not gradable, the disagreement flag without the model's
    number; ``--json`` carries the analysis."""
    config = config_file()
    assert _invoke("db", "upgrade", "--config", str(config)).exit_code == 0
    uid = generate_uid()
    gradable, reject = Quality(grade=QualityGrade.GRADABLE, score=0.9), Quality(grade=QualityGrade.REJECT, score=0.1)
    analysis = StudyAnalysis(
        study_instance_uid=uid,
        model=ModelIdentity(name="RetinalGPT", version="t1", device_uid="2.25.1"),
        images=[
            ImageAnalysis(
                sop_instance_uid=generate_uid(), laterality=Laterality.RIGHT, quality=gradable,
                findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=2, probability=0.9)],
                not_assessed=[Condition.GLAUCOMA],
                measurements=[Measurement(key="Fractal_dimension", value=1.47, unit="1"),
                              Measurement(key="Fractal_dimension", value=1.39, unit="1", source=Source.MODEL)],
                disagreements=[Disagreement(key="Fractal_dimension", model_value=1.39, measured_value=1.47,
                                            tolerance=0.05)],
            ),
            ImageAnalysis(sop_instance_uid=generate_uid(), laterality=Laterality.LEFT, quality=reject,
                          not_assessed=[Condition.GLAUCOMA]),
        ],
        impression="Right eye: moderate non-proliferative diabetic retinopathy; not assessed: glaucoma.",
        referral=Referral.ROUTINE,
    )
    db = Database(load_settings(config).database.url)
    with db.session() as session:
        study = Study(study_instance_uid=uid, state=StudyState.DELIVERED, revision=1)
        session.add(study)
        session.flush()
        session.add(Analysis(study_id=study.id, revision=1, model_name="RetinalGPT", model_version="t1",
                             result=analysis.model_dump(mode="json")))
    db.dispose()
    human = _invoke("studies", "show", uid, "--config", str(config))
    assert human.exit_code == 0, human.output
    assert "result: revision 1, RetinalGPT t1, referral routine" in human.output
    assert ("Right eye, quality gradable (0.90): Diabetic retinopathy: grade 2 (moderate NPDR), p=0.90; "
            "Not assessed (model not trained on it): glaucoma.") in human.output
    assert "Left eye, quality reject (0.10): Not gradable: no condition assessed." in human.output
    assert "disagrees with the measured value 1.47" in human.output and "1.39" not in human.output
    shown = json.loads(_invoke("studies", "show", uid, "--json", "--config", str(config)).stdout)
    assert shown["analysis"]["images"][0]["not_assessed"] == ["glaucoma"]


def test_send_and_echo_errors_are_one_line(config_file, op_file, free_tcp_port):
    config = str(config_file(extra=(
        '[[destinations]]\nname = "down"\nkind = "dicom"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {free_tcp_port}\ntimeout = 5\n"
    )))
    unknown = _invoke("send", str(op_file()), "--to", "nowhere", "--config", config)
    assert unknown.exit_code == 1 and "unknown destination 'nowhere'" in unknown.output
    down = _invoke("echo", "down", "--config", config)
    assert down.exit_code == 1
    assert "transient" in down.output and len(down.output.strip().splitlines()) == 1


@pytest.mark.parametrize("hostile", ["../../escaped", "1.2.3/../../../escaped"])
def test_analyze_refuses_hostile_uids_and_writes_nothing(tmp_path: Path, retina_rgb, hostile: str) -> None:
    """``retinalgpt analyze`` names its result folders after Study Instance UIDs read from the input files: a
    hostile UID is refused with one line before anything is written (issue 19), never followed out of --out."""
    from pydicom import config

    from model.schema import Laterality
    from worker.pipeline.sources import ophthalmic_photograph

    inputs = tmp_path / "in"
    inputs.mkdir()
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for n, study_uid in enumerate((hostile, generate_uid()), 1):  # two studies: one folder per study
            ds = ophthalmic_photograph(retina_rgb[::8, ::8].copy(), study_instance_uid=study_uid,
                                       series_instance_uid=generate_uid(), patient_id="P", patient_name="A^B",
                                       laterality=Laterality.RIGHT)
            ds.save_as(inputs / f"{n}.dcm", enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    result = subprocess.run([sys.executable, "-c", "from worker.cli.app import main; main()", "analyze",
                             str(inputs), "--out", str(work / "out")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "RETINALGPT_HOME": str(tmp_path / "home"),
                                 "RETINALGPT_MODEL__ENABLED": "false",
                                 "RETINALGPT_ANALYSIS__VESSEL_METHOD": "classical"})
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "StudyInstanceUID" in last and "not a valid DICOM UID" in last
    assert "Traceback" not in result.stderr
    assert not (work / "out").exists()
    assert not list(tmp_path.rglob("escaped*")) and not list(tmp_path.rglob("sr.dcm"))
