"""Signed cases as a training dataset (issue 17 item 2, ``retinalgpt data export-feedback``).

Every study with a clinician sign-off (:mod:`worker.signoff`) signed on or after ``since`` is written to a
folder in the generic folder + CSV format that :mod:`training.adapters.generic` reads (``kind = "generic"`` in a
training recipe, docs/training.md): ``images/<key>.png`` (the stored original's first frame, RGB) and
``labels.csv``, one row per image of the signed result.

Labels are the clinician's: the signed revision's analysis holds the values the clinician confirmed or set.
Partial-label rules as for public sets: a condition without a graded finding in the signed result (not assessed,
ungradable, probability only) has an empty cell — *unknown*, never absent. Lesion types with a box in the signed
result are present (``1``); the boxes are the signed ones (the AI boxes the clinician kept plus the ones they drew);
no lesion type is ever written as absent, because a clinician confirms the boxes shown, not that nothing else is
there. ``referable_diabetic_retinopathy`` is not written as a label (the adapters derive it from the DR grade).

Every box (JSON ``{"label", "box", "source"}``) says who drew it: ``model`` (the AI) or ``clinician`` (drawn at a
sign-off, ``model.schema.Source.CLINICIAN``); the generic adapter reads ``label`` and ``box``. Extra columns the
adapter ignores keep the rest: ``sop_instance_uid``, ``referral`` (the clinician's), ``decision``, ``changed``,
``lesions_right`` (the AI's boxes the latest sign-off confirmed), ``lesions_wrong`` (the boxes it removed),
``lesions_missed`` (every box of the signed result a clinician drew — at this sign-off or an earlier one of the
chain — the clinician labels the AI missed) and the AI's original answers (``ai_<condition>``, ``ai_boxes``,
``ai_referral``) — for a re-signed study, the AI's answers of the first sign-off in the chain.

No patient identifier leaves the database: file names are keyed hashes of the SOP Instance UID; ``patient`` is a
keyed hash (HMAC-SHA256) of the Patient ID (of the Study Instance UID where the study has none) under a random
site key kept in ``<home>/feedback-export.key`` (created on first export, never exported), so the same patient has
the same key in every export and the key cannot be reversed by hashing candidate IDs. The ``split`` (``train`` /
``test``) follows the patient key, so one patient's images never straddle the split.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from model.schema import Condition, Lesion, LesionType, Source, StudyAnalysis
from worker.config import Settings
from worker.db import Analysis, Instance, SignOff, Study

LABELS_FILE = "labels.csv"
KEY_FILE = "feedback-export.key"
LABEL_CONDITIONS = tuple(c for c in Condition if c is not Condition.REFERABLE_DIABETIC_RETINOPATHY)
COLUMNS = (["image", "split", "eye", "patient", "sop_instance_uid"] + [c.value for c in LABEL_CONDITIONS]
           + [t.value for t in LesionType] + ["boxes", "referral", "decision", "changed", "lesions_right",
                                              "lesions_wrong", "lesions_missed"]
           + [f"ai_{c.value}" for c in Condition] + ["ai_boxes", "ai_referral"])


class ExportError(Exception):
    """The export cannot be written (bad output folder)."""


@dataclass
class ExportSummary:
    studies: int = 0
    images: int = 0
    skipped: list[str] = field(default_factory=list)
    """One line per image not exported and why (purged, not decodable); never names the patient."""

    def as_dict(self) -> dict[str, Any]:
        return {"studies": self.studies, "images": self.images, "skipped": self.skipped}


def site_key(settings: Settings) -> bytes:
    """The site's random key for hashing identifiers (created on first use, mode 0600)."""
    path = settings.home / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return bytes.fromhex(path.read_text().strip())


def keyed_hash(key: bytes, kind: str, value: str, length: int = 20) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]


def split_of(patient_key: str, test_fraction: float) -> str:
    """``test`` for a stable ``test_fraction`` share of patient keys, else ``train``."""
    return "test" if int(patient_key[:8], 16) / 0x1_0000_0000 < test_fraction else "train"


def _latest_signoffs(session: Session, since: dt.datetime) -> list[SignOff]:
    rows = session.scalars(select(SignOff).where(SignOff.signed_at >= since).order_by(SignOff.study_id,
                                                                                     SignOff.revision)).all()
    latest: dict[int, SignOff] = {}
    for row in rows:
        latest[row.study_id] = row
    return list(latest.values())


def ai_original(session: Session, signoff: SignOff) -> dict[str, Any]:
    """The AI's analysis behind ``signoff``: for a sign-off correcting a signed result, the first in the chain."""
    row = signoff
    seen = {row.id}
    while row.corrects_signed:
        previous = session.scalars(select(SignOff).where(SignOff.study_id == row.study_id,
                                                         SignOff.revision == row.signed_revision)).first()
        if previous is None or previous.id in seen:
            break
        row, seen = previous, seen | {previous.id}
    return row.original


def _graded(image: Any) -> dict[Condition, int]:
    return {f.condition: f.grade for f in image.findings if f.grade is not None}


def _boxes(lesions: list[Any]) -> list[dict[str, Any]]:
    return [{"label": lesion.type.value, "box": [round(v, 6) for v in lesion.box], "source": lesion.source.value}
            for lesion in lesions]


def _signed_lesions(image: Any, changes: list[dict[str, Any]]) -> list[Lesion]:
    """The lesions of a signed image, the ones this sign-off drew marked ``clinician`` also where the analysis was
    stored before that source existed (schema 1.1: a drawn box was stored with the default source ``model``)."""
    drawn = {(c["type"], tuple(c["box"])) for c in changes
             if c.get("kind") == "lesion_missed" and c.get("sop_instance_uid") == image.sop_instance_uid}
    return [lesion.model_copy(update={"source": Source.CLINICIAN})
            if lesion.source == Source.MODEL and (lesion.type.value, tuple(lesion.box)) in drawn else lesion
            for lesion in image.lesions]


def _row(image: Any, ai_image: Any | None, read_image: Any | None, ai: StudyAnalysis, signed: StudyAnalysis,
         signoff: SignOff, file_name: str, patient: str, split: str) -> dict[str, str]:
    """One CSV row; ``read_image`` is the image as the clinician read it (their verdicts index its lesions)."""
    uid = image.sop_instance_uid
    grades = _graded(image)
    ai_grades = _graded(ai_image) if ai_image is not None else {}
    changes = signoff.corrections.get("changes", [])
    right = [v for v in signoff.corrections.get("lesions_right", []) if v.get("sop_instance_uid") == uid]
    ai_lesions = ai_image.lesions if ai_image is not None else []
    read_lesions = read_image.lesions if read_image is not None else []
    lesions = _signed_lesions(image, changes)
    row = {
        "image": f"images/{file_name}", "split": split, "eye": image.laterality.value
        if image.laterality.value != "unknown" else "", "patient": patient, "sop_instance_uid": uid or "",
        "boxes": json.dumps(_boxes(lesions)), "referral": signed.referral.value,
        "decision": signoff.corrections.get("decision", ""), "changed": str(int(signoff.changed)),
        "lesions_right": json.dumps(_boxes([read_lesions[v["index"]] for v in right
                                            if v["index"] < len(read_lesions)
                                            and read_lesions[v["index"]].source != Source.CLINICIAN])),
        "lesions_wrong": json.dumps(_boxes([read_lesions[c["index"]] for c in changes
                                            if c.get("kind") == "lesion_wrong" and c.get("sop_instance_uid") == uid
                                            and c["index"] < len(read_lesions)])),
        "lesions_missed": json.dumps(_boxes([lesion for lesion in lesions if lesion.source == Source.CLINICIAN])),
        "ai_boxes": json.dumps(_boxes(ai_lesions)), "ai_referral": ai.referral.value,
    }
    for condition in LABEL_CONDITIONS:
        row[condition.value] = str(grades[condition]) if condition in grades else ""
    present = {lesion.type for lesion in image.lesions}
    for lesion_type in LesionType:
        row[lesion_type.value] = "1" if lesion_type in present else ""
    for condition in Condition:
        row[f"ai_{condition.value}"] = str(ai_grades[condition]) if condition in ai_grades else ""
    return row


def _write_image(path: Path, target: Path, settings: Settings, max_side: int) -> None:
    from worker.pipeline.sources import check_size, decode_first_frame

    dataset = pydicom.dcmread(path, defer_size="256 KB")
    check_size(dataset, settings.analysis.max_image_pixels)
    Image.fromarray(decode_first_frame(path, dataset, max_side)).save(target, format="PNG")


def export_feedback(session: Session, settings: Settings, since: dt.datetime, out: Path, *,
                    test_fraction: float = 0.2, max_side: int = 2048) -> ExportSummary:
    """Write the signed cases signed at or after ``since`` to ``out`` (see the module docstring)."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new folder")
    if not 0.0 <= test_fraction <= 1.0:
        raise ExportError(f"test fraction {test_fraction} is outside 0..1")
    key = site_key(settings)
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary = ExportSummary()
    rows: list[dict[str, str]] = []
    for signoff in _latest_signoffs(session, since):
        study = session.get(Study, signoff.study_id)
        analysis = session.scalars(select(Analysis).where(Analysis.study_id == signoff.study_id,
                                                          Analysis.revision == signoff.revision,
                                                          Analysis.shadow.is_(False))
                                   .order_by(Analysis.id.desc())).first()
        if study is None or analysis is None:
            continue
        signed = StudyAnalysis.model_validate(analysis.result)
        ai = StudyAnalysis.model_validate(ai_original(session, signoff))
        ai_by_uid = {img.sop_instance_uid: img for img in ai.images if img.sop_instance_uid}
        read = StudyAnalysis.model_validate(signoff.original)
        read_by_uid = {img.sop_instance_uid: img for img in read.images if img.sop_instance_uid}
        patient = keyed_hash(key, "patient", study.patient_id or f"study:{study.study_instance_uid}")
        split = split_of(patient, test_fraction)
        exported = 0
        for image in signed.images:
            if not image.sop_instance_uid:
                continue
            file_key = keyed_hash(key, "image", image.sop_instance_uid)
            instance = session.scalars(select(Instance).where(
                Instance.sop_instance_uid == image.sop_instance_uid)).first()
            if instance is None or instance.purged_at is not None or not Path(instance.path).is_file():
                summary.skipped.append(f"image {file_key}: the stored original is gone (purged)")
                continue
            file_name = f"{file_key}.png"
            try:
                _write_image(Path(instance.path), out / "images" / file_name, settings, max_side)
            except Exception as exc:  # pydicom and the decoders raise many types for undecodable data
                summary.skipped.append(f"image {file_key}: {exc}")
                continue
            rows.append(_row(image, ai_by_uid.get(image.sop_instance_uid), read_by_uid.get(image.sop_instance_uid),
                             ai, signed, signoff, file_name, patient, split))
            exported += 1
        summary.images += exported
        summary.studies += bool(exported)
    with (out / LABELS_FILE).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "export.json").write_text(json.dumps({"since": since.isoformat(), "test_fraction": test_fraction,
                                                 **summary.as_dict()}, indent=2) + "\n")
    return summary
