"""A real SQLite database with one analysed study and its source files, for delivery tests against real peers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from model.schema import (
    Condition,
    Finding,
    ImageAnalysis,
    Laterality,
    Measurement,
    ModelIdentity,
    Quality,
    QualityGrade,
    Referral,
    StudyAnalysis,
)
from worker.config import load_settings
from worker.db import Analysis, Database, Delivery, Instance, Series, Study, StudyState, utcnow
from worker.db.migrate import upgrade
from worker.pipeline.delivery import deliver_revision
from worker.pipeline.sources import ophthalmic_photograph


def _analysis(study_uid: str, uids: list[str], series_uid: str, revision: int) -> StudyAnalysis:
    images = [
        ImageAnalysis(sop_instance_uid=uid, series_instance_uid=series_uid, laterality=eye,
                      quality=Quality(grade=QualityGrade.GRADABLE, score=0.9),
                      findings=[Finding(condition=Condition.DIABETIC_RETINOPATHY, grade=revision + 1,
                                        probability=0.8)],
                      measurements=[Measurement(key="CDR_vertical", value=0.4, unit="1")])
        for uid, eye in zip(uids, (Laterality.RIGHT, Laterality.LEFT), strict=True)
    ]
    return StudyAnalysis(study_instance_uid=study_uid, revision=revision, patient_id="P1", images=images,
                         referral=Referral.ROUTINE, impression=f"revision {revision}",
                         pipeline=ModelIdentity(name="pipeline", version="1", device_uid="2.25.1"))


class World:
    """A study with two stored OP images and an analysis of revision 1, and a configuration whose only
    destination is ``destination`` (TOML lines of one ``[[destinations]]`` table)."""

    def __init__(self, tmp_path: Path, retina_rgb: np.ndarray, destination: str, key_image: bool = False) -> None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        config = tmp_path / "config.toml"
        config.write_text(f'home = "{tmp_path}"\n[reporting]\nkey_image = {str(key_image).lower()}\n'
                          f"[[destinations]]\n{destination}")
        self.settings = load_settings(config)
        upgrade(self.settings.database.url)
        self.db = Database(self.settings.database.url)
        self.study_uid, self.series_uid = generate_uid(), generate_uid()
        small = np.asarray(Image.fromarray(retina_rgb).resize((128, 128)))
        self.uids = []
        with self.db.session() as session:
            study = Study(study_instance_uid=self.study_uid, state=StudyState.COMPLETE, patient_id="P1")
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=self.series_uid, modality="OP")
            session.add(series)
            session.flush()
            for number, eye in enumerate((Laterality.RIGHT, Laterality.LEFT), 1):
                ds = ophthalmic_photograph(small, study_instance_uid=self.study_uid,
                                           series_instance_uid=self.series_uid, patient_id="P1",
                                           patient_name="Test^Patient", laterality=eye, instance_number=number,
                                           accession_number="ACC-7")
                path = tmp_path / f"{number}.dcm"
                ds.save_as(path, enforce_file_format=True)
                self.uids.append(str(ds.SOPInstanceUID))
                session.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                                     sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                                     instance_number=number, path=str(path), size_bytes=path.stat().st_size,
                                     sha256="0" * 64, calling_ae_title="CAM", peer_host="127.0.0.1", revision=1,
                                     analysable=True))
            self._add_analysis(session, study, 1)

    def _add_analysis(self, session, study: Study, revision: int) -> None:
        analysis = _analysis(self.study_uid, self.uids, self.series_uid, revision)
        session.add(Analysis(study_id=study.id, revision=revision, model_name="measurement-only", model_version="",
                             result=analysis.model_dump(mode="json")))
        study.revision = revision
        study.state = StudyState.ANALYSED

    def new_revision(self) -> None:
        with self.db.session() as session:
            self._add_analysis(session, session.scalars(select(Study)).one(), 2)

    @property
    def results(self) -> Path:
        """The result folder of revision 1."""
        return self.settings.home / "results" / self.study_uid / "r1"

    def deliver(self, revision: int = 1) -> StudyState:
        return deliver_revision(self.settings, self.db, self.study_uid, revision)

    def rows(self) -> list[Delivery]:
        with self.db.session() as session:
            return list(session.scalars(select(Delivery).order_by(Delivery.id)))

    def make_due(self) -> None:
        with self.db.session() as session:
            session.execute(update(Delivery).values(next_attempt_at=utcnow()))


