"""Conversation: the stored results as context, history, and ``retinalgpt chat`` over a study stored in the DB."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from model.chat import ChatSession, study_context
from model.schema import (
    Condition,
    Finding,
    ImageAnalysis,
    Laterality,
    Lesion,
    LesionType,
    Measurement,
    Quality,
    QualityGrade,
    Referral,
    Source,
    StudyAnalysis,
)


def _analysis(sop_uid: str = "1.2.3.4.5", study_uid: str = "1.2.3.4") -> StudyAnalysis:
    image = ImageAnalysis(
        sop_instance_uid=sop_uid,
        laterality=Laterality.RIGHT,
        quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
        findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=3, probability=0.91)],
        lesions=[Lesion(type=LesionType.HAEMORRHAGE, box=(0.1, 0.1, 0.2, 0.2))] * 2,
        measurements=[Measurement(key="CDR_vertical", value=0.42, unit="1", source=Source.MEASURED)],
    )
    return StudyAnalysis(
        study_instance_uid=study_uid,
        images=[image],
        impression="Severe NPDR right eye.",
        referral=Referral.URGENT,
    )


def test_study_context_states_the_stored_results() -> None:
    text = study_context(_analysis())
    assert "right eye" in text and "quality gradable" in text
    assert "diabetic retinopathy grade 3 (p=0.91)" in text
    assert "2 haemorrhage" in text and "CDR_vertical 0.420" in text
    assert "Severe NPDR right eye." in text and "Referral: urgent." in text


def test_chat_session_keeps_the_history(tiny: tuple[Any, Any, Any], retina_rgb: np.ndarray) -> None:
    from model.engine import EngineOptions, RetinalGPTEngine

    model, tokenizer, metadata = tiny
    engine = RetinalGPTEngine.from_model(model, tokenizer, metadata, EngineOptions(max_new_tokens=6))
    session = ChatSession(engine, retina_rgb, context=study_context(_analysis()))
    first = session.ask("Is it urgent?")
    second = session.ask("Which eye?")
    assert session.history == [("Is it urgent?", first), ("Which eye?", second)]
    assert second == engine.ask(
        retina_rgb, "Which eye?", history=[("Is it urgent?", first)], context=session.context
    )


def test_chat_command_answers_about_a_stored_study(
    tmp_path: Path, tiny_dir: Path, retina_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom

    from model.registry import ModelRegistry
    from tests.dicom_node.dicom_fixtures import make_op, write_jpeg
    from worker.cli.app import app
    from worker.config import load_settings
    from worker.db import Analysis, Database, Instance, Series, Study

    config = tmp_path / "retinalgpt.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n[model]\ndevice = "cpu"\nmax_new_tokens = 6\n'
        '[analysis]\nvessel_method = "classical"\n'
    )
    monkeypatch.setenv("RETINALGPT_CONFIG", str(config))
    settings = load_settings(config)
    ModelRegistry(settings.model.registry).register(tiny_dir, activate=True)
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0

    study_uid = "1.2.826.0.1.3680043.8.498.1"
    jpeg = write_jpeg(np.ascontiguousarray(retina_rgb[::4, ::4]), tmp_path / "retina.jpg")
    dcm = make_op(jpeg, tmp_path / "op.dcm", study_uid=study_uid)
    ds = pydicom.dcmread(dcm, stop_before_pixels=True)
    db = Database(settings.database.url)
    try:
        with db.session() as session:
            study = Study(study_instance_uid=study_uid, patient_id="PAT001")
            series = Series(study=study, series_instance_uid=ds.SeriesInstanceUID, modality="OP")
            session.add_all([study, series])
            session.flush()
            session.add(
                Instance(
                    study=study,
                    series=series,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    path=str(dcm),
                    size_bytes=dcm.stat().st_size,
                    sha256=hashlib.sha256(dcm.read_bytes()).hexdigest(),
                    calling_ae_title="CAMERA1",
                    peer_host="127.0.0.1",
                    revision=1,
                    analysable=True,
                )
            )
            analysis = _analysis(ds.SOPInstanceUID, study_uid)
            session.add(
                Analysis(
                    study=study,
                    revision=1,
                    model_name="retinalgpt",
                    model_version="v1",
                    result=analysis.model_dump(mode="json"),
                )
            )
    finally:
        db.dispose()

    result = runner.invoke(app, ["chat", study_uid, "-q", "Is it urgent?", "-q", "Which eye?"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("RetinalGPT:") == 2
    interactive = runner.invoke(app, ["chat", study_uid], input="Is it urgent?\n\n")
    assert interactive.exit_code == 0, interactive.output
    assert interactive.stdout.count("RetinalGPT:") == 1
