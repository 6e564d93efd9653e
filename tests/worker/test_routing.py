"""Routing rules (issue 15 item 1) with the real node role (listener, ingest service, pipeline completion,
bookkeeper) and dcmtk's storescu as the cameras:

- a rule on calling AE (equals), peer host (glob) and Modality routes camera 1's photographs to analysis and
  records their forward destination; a rule on the calling AE of an OCT camera keeps its photographs out of
  analysis (``analyse = false``): that study ends ``not_applicable`` and gets no job, hence no SR;
- an Ophthalmic Tomography study matches no rule: the default analyses what it can, there is nothing, the study
  ends ``not_applicable``;
- a rule on any attribute (InstitutionName, regex) raises the priority of another camera's study;
- ``config check`` refuses wrong rules with one line; ``retinalgpt rules test`` shows which rule decides, why,
  and where each earlier rule failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from tests.dicom_node.dicom_fixtures import storescu
from tests.support.roles import retinalgpt, wait_for
from tests.support.services import redis_database
from worker.celery_app import make_celery
from worker.config import ConfigError, Rule, ValueMatch, load_settings
from worker.db import AuditEvent, Instance, Job, Study, StudyState
from worker.db.migrate import upgrade
from worker.roles import start_node_role
from worker.routing import RouteInput, passes, route

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"

RULES = """
[[destinations]]
name = "pacs"
kind = "dicom"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

[[destinations]]
name = "ehr"
kind = "fhir"
url = "http://127.0.0.1:1/fhir"

[[rules]]
name = "oct-camera"
calling_ae = "OCT*"
analyse = false
forward = ["pacs"]

[[rules]]
name = "emergency"
attributes = { InstitutionName = { regex = "(?i).*emergency.*" }, PatientID = { present = true } }
priority = "urgent"
forward = ["pacs"]

[[rules]]
name = "camera1"
calling_ae = { equals = "CAMERA1" }
peer_host = "127.0.0.*"
modality = "OP"
forward = ["pacs"]
"""


def write_config(tmp_path: Path, port: int, rules: str = RULES) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n'
        "[dicom]\n"
        'bind_address = "127.0.0.1"\n'
        f"port = {port}\n"
        "stable_seconds = 0.5\n"
        'allowed_callers = [{ ae_title = "CAMERA1" }, { ae_title = "CAMERA2" }, { ae_title = "OCT1" }]\n'
        + rules
    )
    return config


def oct_instance(path: Path, patient_id: str) -> Path:
    """A small Ophthalmic Tomography image (one frame): not a photograph, stored but never analysed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = OPHTHALMIC_TOMOGRAPHY
    ds.SOPClassUID = OPHTHALMIC_TOMOGRAPHY
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, "Doe^Oct", "OPT"
    ds.Rows = ds.Columns = 16
    ds.NumberOfFrames = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(256, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def with_attributes(source: Path, target: Path, **attributes: str) -> Path:
    ds = dcmread(source)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def test_rules_decide_analysis_forwarding_and_priority_per_camera(tmp_path, free_tcp_port, op_file):
    settings = load_settings(write_config(tmp_path, free_tcp_port))
    upgrade(settings.database.url)
    role = start_node_role(settings)
    try:
        camera1 = op_file("camera1.dcm", patient_id="CAM1")
        oct_photo = op_file("oct_photo.dcm", patient_id="OCTCAM")
        tomography = oct_instance(tmp_path / "oct.dcm", "OCTONLY")
        urgent = with_attributes(op_file("er.dcm", patient_id="ER"), tmp_path / "er_named.dcm",
                                 InstitutionName="City EMERGENCY Eye Unit")
        for calling, path in (("CAMERA1", camera1), ("OCT1", oct_photo), ("CAMERA2", tomography),
                              ("CAMERA2", urgent)):
            sent = storescu(role.port, [path], calling=calling)
            assert sent.returncode == 0, sent.stderr

        db = role.running.db

        def studies() -> dict[str, Study]:
            with db.reading() as session:
                return {s.patient_id: s for s in session.scalars(select(Study))}

        def settled() -> bool:
            found = studies()
            return len(found) == 4 and all(s.state not in (StudyState.RECEIVING, StudyState.COMPLETE)
                                           for s in found.values())

        wait_for(settled, 30, "four studies complete and routed", diagnostics=lambda: str(
            {k: s.state for k, s in studies().items()}))
        found = studies()
        assert {k: s.state for k, s in found.items()} == {
            "CAM1": StudyState.QUEUED, "OCTCAM": StudyState.NOT_APPLICABLE,
            "OCTONLY": StudyState.NOT_APPLICABLE, "ER": StudyState.QUEUED}
        assert found["CAM1"].route == {"rules": ["camera1"], "forward": ["pacs"], "priority": "normal"}
        assert found["OCTCAM"].route == {"rules": ["oct-camera"], "forward": ["pacs"], "priority": "normal"}
        assert found["OCTONLY"].route == {"rules": ["default"], "forward": [], "priority": "normal"}
        assert found["ER"].route == {"rules": ["emergency"], "forward": ["pacs"], "priority": "urgent"}
        with db.reading() as session:
            instances = {i.study.patient_id: i for i in session.scalars(select(Instance))}
            jobs = {j.study.patient_id for j in session.scalars(select(Job))}
            routed = session.scalars(select(AuditEvent).where(AuditEvent.action == "study.routed")).all()
            not_analysed = {e.study_instance_uid: e.detail for e in session.scalars(
                select(AuditEvent).where(AuditEvent.action == "study.not_analysed"))}
        assert (instances["OCTCAM"].analysable, instances["OCTCAM"].not_analysed_reason) == (
            False, "rule oct-camera: analyse = false")
        assert instances["OCTONLY"].analysable is False
        assert instances["OCTONLY"].route == {"rule": "default", "analyse": True, "forward": [], "priority": "normal"}
        assert instances["CAM1"].analysable and instances["ER"].analysable
        assert jobs == {"CAM1", "ER"}  # not_applicable studies are never analysed, so no SR is ever built
        assert len(routed) == 4
        assert not_analysed[found["OCTCAM"].study_instance_uid]["instances_not_analysed"] == [
            "rule oct-camera: analyse = false"]
        assert not_analysed[found["OCTONLY"].study_instance_uid]["state"] == "not_applicable"
    finally:
        role.stop()


def test_without_rules_every_photograph_is_analysed_as_before(tmp_path, free_tcp_port, op_file):
    settings = load_settings(write_config(tmp_path, free_tcp_port, rules=""))
    upgrade(settings.database.url)
    role = start_node_role(settings)
    try:
        assert storescu(role.port, [op_file("a.dcm")], calling="OCT1").returncode == 0
        db = role.running.db

        def state():
            with db.reading() as session:
                return session.scalars(select(Study)).first()

        study = wait_for(lambda: (s := state()) is not None and s.state == StudyState.QUEUED and s, 30, "queued")
        assert study.route == {"rules": ["default"], "forward": [], "priority": "normal"}
        with db.reading() as session:
            assert not session.scalars(select(AuditEvent).where(AuditEvent.action == "study.routed")).all()
    finally:
        role.stop()


@pytest.mark.parametrize(("rules", "message"), [
    ('[[rules]]\nname = "a"\nforward = ["nowhere"]\n', "rule 'a' forwards to 'nowhere', which is not a configured"),
    ('[[rules]]\nname = "a"\nforward = ["ehr"]\n', "forwards originals to 'ehr', a fhir destination"),
    ('[[rules]]\nname = "a"\ncalling_ae = { regex = "CAM[" }\n', "regex 'CAM[' does not compile"),
    ('[[rules]]\nname = "a"\nattributes = { Manufactuer = "x" }\n', "not DICOM keywords: Manufactuer"),
    ('[[rules]]\nname = "a"\nmodality = { equals = "OP", glob = "O*" }\n',
     "exactly one of equals, glob, regex, present"),
    ('[[rules]]\nname = "a"\n[[rules]]\nname = "a"\n', "rule names must be unique: a"),
    ('[[rules]]\nname = "a"\npriority = "asap"\n', "rules.0.priority"),
    ('[[rules]]\nname = "a"\nanalyze = false\n', "rules.0.analyze: Extra inputs are not permitted"),
])
def test_config_rejects_wrong_rules_with_one_line(tmp_path, rules, message):
    config = write_config(tmp_path, 11112, RULES.split("[[rules]]")[0] + rules)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as caught:
        load_settings(config)
    assert "\n" not in str(caught.value)


def test_config_check_and_rules_test_commands(tmp_path, op_file):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rules]]\nname = "x"\nforward = ["pacs"]\n')
    checked = retinalgpt("config", "check", config=bad, check=False)
    assert checked.returncode == 1
    assert "rule 'x' forwards to 'pacs', which is not a configured destination" in checked.stderr
    assert len(checked.stderr.strip().splitlines()) == 1

    config = write_config(tmp_path, 11112)
    photo = op_file("photo.dcm")
    tomography = oct_instance(tmp_path / "oct.dcm", "P1")
    result = retinalgpt("rules", "test", str(photo), str(tomography), "--calling-ae", "CAMERA1",
                        "--host", "127.0.0.5", "--json", config=config)
    routed = json.loads(result.stdout)
    assert [(r["rule"], r["analysed"], r["forward"]) for r in routed] == [("camera1", True, ["pacs"]),
                                                                          ("default", False, [])]
    assert routed[0]["why"] == ["calling AE title 'CAMERA1' matches equals 'CAMERA1'",
                                "peer host '127.0.0.5' matches glob '127.0.0.*'",
                                "Modality 'OP' matches glob 'OP'"]
    assert [t["checks"][-1] for t in routed[0]["tried"][:2]] == [
        "calling AE title 'CAMERA1' does not match glob 'OCT*'",
        "InstitutionName absent does not match regex '(?i).*emergency.*'"]
    assert routed[1]["tried"][2]["checks"][-1] == "Modality 'OPT' does not match glob 'OP'"

    text = retinalgpt("rules", "test", str(photo), "--calling-ae", "OCT7", config=config).stdout
    assert "rule oct-camera decides:" in text
    assert "analysed: no (rule oct-camera: analyse = false); forward: pacs; priority: normal" in text


FORWARD_TARGETS = """
[[destinations]]
name = "cloud"
kind = "dicomweb"
url = "https://archive.example.org/dicom-web"

[[destinations]]
name = "ris"
kind = "hl7v2"
host = "127.0.0.1"
port = 2575
"""


@pytest.mark.parametrize(("forward", "error"), [
    ('["pacs", "cloud"]', None),
    ('["cloud", "ris"]', "rule 'a' forwards originals to 'ris', a hl7v2 destination: originals go only to "
                         "destinations of kind dicom or dicomweb (DIMSE C-STORE or DICOMweb STOW-RS)"),
    ('["ehr"]', "rule 'a' forwards originals to 'ehr', a fhir destination: originals go only to destinations of "
                "kind dicom or dicomweb"),
])
def test_config_check_takes_dicomweb_as_a_forward_target_and_refuses_kinds_without_originals(tmp_path, forward,
                                                                                              error):
    config = write_config(tmp_path, 11112, RULES.split("[[rules]]")[0] + FORWARD_TARGETS
                          + f'[[rules]]\nname = "a"\nforward = {forward}\n')
    checked = retinalgpt("config", "check", config=config, check=False)
    if error is None:
        assert checked.returncode == 0, checked.stderr
    else:
        assert checked.returncode == 1
        assert error in checked.stderr
        assert len(checked.stderr.strip().splitlines()) == 1


def test_match_operators():
    assert passes("CAM*", "CAMERA1") and not passes("CAM*", "cam1") and passes("CAMERA1", "CAMERA1")
    assert passes(ValueMatch(equals="OP"), "OP") and not passes(ValueMatch(equals="OP"), "OPT")
    assert passes(ValueMatch(regex="OPT?"), "OPT") and not passes(ValueMatch(regex="OP"), "OPT")  # full match
    assert passes(ValueMatch(present=True), "x") and not passes(ValueMatch(present=True), None)
    assert passes(ValueMatch(present=False), None) and passes(ValueMatch(present=False), "  ")
    first = Rule(name="first", modality="OP", analyse=False)
    catch_all = Rule(name="all", priority="urgent")
    given = RouteInput(calling_ae="C", called_ae="N", peer_host=None, modality="OP", sop_class_uid="1.2")
    assert route([first, catch_all], given)[0].rule == "first"  # first match wins
    decision, tried = route([first, catch_all], RouteInput("C", "N", None, "XC", "1.2"))
    assert (decision.rule, decision.priority.value, [t.matched for t in tried]) == ("all", "urgent", [False, True])


def test_urgent_study_overtakes_normal_ones_in_the_inference_queue_on_redis(tmp_path, free_tcp_port, op_file):
    """Real Redis broker, no inference worker: two normal studies are queued, then an urgent one; the first
    message an inference worker would take is the urgent study's."""
    with redis_database() as broker:
        config = write_config(tmp_path, free_tcp_port, f'[broker]\nurl = "{broker}"\n' + RULES)
        settings = load_settings(config)
        upgrade(settings.database.url)
        role = start_node_role(settings)
        try:
            for name in ("first", "second"):
                assert storescu(role.port, [op_file(f"{name}.dcm", patient_id=name.upper())]).returncode == 0
            urgent = with_attributes(op_file("er.dcm", patient_id="ER"), tmp_path / "er_named.dcm",
                                     InstitutionName="Emergency Eye Clinic")
            db = role.running.db

            def queued() -> int:
                with db.reading() as session:
                    return len(session.scalars(select(Study).where(Study.state == StudyState.QUEUED)).all())

            wait_for(lambda: queued() == 2, 30, "the two normal studies queued")
            assert storescu(role.port, [urgent], calling="CAMERA2").returncode == 0
            wait_for(lambda: queued() == 3, 30, "the urgent study queued")
            with db.reading() as session:
                patient_of_job = {j.id: j.study.patient_id for j in session.scalars(select(Job))}
            app = make_celery(settings)
            order = []
            with app.connection_for_read() as connection:
                queue = connection.SimpleQueue("inference")
                for _ in range(3):
                    message = queue.get(timeout=10)
                    order.append(patient_of_job[message.payload[1]["job_id"]])
                    message.ack()
                queue.close()
            assert order == ["ER", "FIRST", "SECOND"]
        finally:
            role.stop()


def test_study_route_skips_instances_without_a_decision():
    from worker.routing import study_route

    decisions = [None, {"rule": "a", "forward": ["pacs"], "priority": "normal"},
                 {"rule": "b", "forward": ["pacs", "vna"], "priority": "urgent"}]
    assert study_route(decisions) == {"rules": ["a", "b"], "forward": ["pacs", "vna"], "priority": "urgent"}
