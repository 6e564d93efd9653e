"""SR content tree of the fundus result: TID 1500 with TID 1501 image groups and TID 1410 regions.

Per analysed image one TID 1501 Measurement and Qualitative Evaluation Group holds quality, findings
(condition as concept name, grade or presence as coded value), each condition the model was not trained to
assess (condition as concept name, coded value (373121007, SCT, "Not Evaluated")), probabilities (Derivation
``Estimated``) and the measured vascular / disc measurements (TID 300, with UCUM unit, Derivation ``Measured``
and finding sites for vessel type and zone, or the optic disc). Model-emitted numbers are not reported as
values; a disagreement between one and the measurement is a coded flag. Each lesion and each outlined landmark
becomes a TID 1410 Planar ROI group with a closed POLYLINE SCOORD on its source image. Every group carries a
TID 4019 Algorithm Identification (PS3.16 TID 1500, 1501, 1410, 300, 4019) — except a lesion the clinician drew
at sign-off (``Source.CLINICIAN``): its group names no algorithm, has the qualitative evaluation Observer Type =
Person (DCM 121005 / 121006) and a tracking identifier ending "drawn by clinician". Likewise the grades the
clinician set or corrected at sign-off are not in the AI's group: they form a second TID 1501 group of the image
without an algorithm, with Observer Type = Person, tracked as "graded by clinician".
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from model.schema import ImageAnalysis, Landmark, LandmarkType, Lesion, ModelIdentity, Source, StudyAnalysis
from reporting import codes, summary
from reporting.sources import OP_8BIT, WIDE_FIELD_OP, algorithms, laterality, metadata, uid

ImagingGroup = (
    hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def algorithm_id(identity: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of one model or pipeline version."""
    return hd.sr.AlgorithmIdentification(
        name=identity.name,
        version=identity.version,
        manufacturer=identity.manufacturer,
        family=codes.ALGORITHM_FAMILY,
    )


def observation_context(analysis: StudyAnalysis) -> hd.sr.ObservationContext:
    """TID 1001 with the primary algorithm as device observer (TID 1004), UID = the model's Device UID."""
    main = algorithms(analysis)[0]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=main.device_uid, name=main.name, manufacturer_name=main.manufacturer, model_name=main.version
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=device,
        )
    )


def _finding_site(img: ImageAnalysis, ds: Dataset) -> hd.sr.FindingSite:
    side = laterality(img, ds)
    lat = {"R": codes.RIGHT, "L": codes.LEFT}.get(side) if side else None
    return hd.sr.FindingSite(anatomic_location=codes.RETINA, laterality=lat)


class ImageGroups:
    """Builds the imaging measurement groups of one analysis (one instance per SR document)."""

    def __init__(self, analysis: StudyAnalysis) -> None:
        self.analysis = analysis
        self.model = analysis.model
        self.pipeline = analysis.pipeline or algorithms(analysis)[-1]
        self.main = algorithms(analysis)[0]

    def _identity(self, source: Source) -> ModelIdentity:
        if source == Source.MODEL and self.model is not None:
            return self.model
        return self.pipeline

    def _tracking(self, *parts: object) -> hd.sr.TrackingIdentifier:
        label = " ".join(str(p) for p in parts[1:])
        return hd.sr.TrackingIdentifier(
            uid=uid(self.analysis.study_instance_uid, *parts), identifier=label[:64]
        )

    def for_image(self, img: ImageAnalysis, ds: Dataset) -> list[ImagingGroup]:
        """The TID 1501 group of ``img`` (and one of the clinician's grades, if any), then one TID 1410 group per
        region."""
        groups: list[ImagingGroup] = [self._image_group(img, ds)]
        if any(f.source == Source.CLINICIAN for f in img.findings):
            groups.append(self._clinician_group(img, ds))
        groups += [self._lesion_group(img, ds, n, lesion) for n, lesion in enumerate(img.lesions, 1)]
        groups += [
            self._landmark_group(img, ds, landmark)
            for landmark in img.landmarks
            if landmark.contour or landmark.box is not None
        ]
        return groups

    def _image_group(self, img: ImageAnalysis, ds: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        evaluations: list[hd.sr.QualitativeEvaluation] = []
        measurements: list[hd.sr.Measurement] = []
        if img.quality is not None:
            evaluations.append(
                hd.sr.QualitativeEvaluation(codes.QUALITY_ASSESSMENT, codes.QUALITY_VALUES[img.quality.grade])
            )
            measurements.append(self._number(codes.QUALITY_RATING, img.quality.score, "1", Source.MEASURED))
        for finding in (f for f in img.findings if f.source != Source.CLINICIAN):
            condition = codes.CONDITIONS[finding.condition]
            if finding.grade is not None or finding.probability is not None:
                grade = finding.grade if finding.grade is not None else int(finding.present)
                evaluations.append(
                    hd.sr.QualitativeEvaluation(condition, codes.grade_code(finding.condition, grade))
                )
            if finding.probability is not None:
                name = codes.probability_code(finding.condition)
                measurements.append(self._number(name, finding.probability, "1", finding.source))
        evaluations += [
            hd.sr.QualitativeEvaluation(codes.CONDITIONS[condition], codes.NOT_ASSESSED)
            for condition in summary.not_assessed(img)
        ]
        for m in summary.reported_measurements(img):
            feature = codes.feature(m.key)
            if feature.vascular:
                sites = [
                    hd.sr.FindingSite(codes.VESSELS[m.vessel]),
                    hd.sr.FindingSite(codes.ZONES[m.zone]),
                ]
            else:
                sites = [hd.sr.FindingSite(codes.LANDMARKS[LandmarkType.OPTIC_DISC])]
            measurements.append(self._number(feature.code, m.value, m.unit, m.source, sites))
        evaluations += [
            hd.sr.QualitativeEvaluation(codes.DISAGREEMENT, codes.feature(d.key).code)
            for d in img.disagreements
        ]
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(img.sop_instance_uid, "image", ds.SOPInstanceUID),
            finding_type=codes.IMAGE_FINDINGS,
            finding_category=codes.FINDING_CATEGORY_ANATOMY,
            algorithm_id=algorithm_id(self.main),
            finding_sites=[_finding_site(img, ds)],
            measurements=measurements or None,
            qualitative_evaluations=evaluations or None,
            source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)],
        )

    def _clinician_group(self, img: ImageAnalysis, ds: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        """TID 1501 group of the grades the signing clinician set: no TID 4019 algorithm, Observer Type = Person."""
        evaluations = [hd.sr.QualitativeEvaluation(codes.OBSERVER_TYPE, codes.OBSERVER_PERSON)]
        evaluations += [
            hd.sr.QualitativeEvaluation(codes.CONDITIONS[f.condition], codes.grade_code(f.condition, f.grade))
            for f in img.findings
            if f.source == Source.CLINICIAN and f.grade is not None
        ]
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(img.sop_instance_uid, "graded by clinician", ds.SOPInstanceUID),
            finding_type=codes.IMAGE_FINDINGS,
            finding_category=codes.FINDING_CATEGORY_ANATOMY,
            finding_sites=[_finding_site(img, ds)],
            qualitative_evaluations=evaluations,
            source_images=[hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)],
        )

    def _number(
        self,
        name: Code,
        value: float,
        ucum: str,
        source: Source,
        sites: Sequence[hd.sr.FindingSite] | None = None,
    ) -> hd.sr.Measurement:
        return hd.sr.Measurement(
            name=name,
            value=float(value),
            unit=codes.unit(ucum),
            derivation=codes.DERIVATION[source],
            algorithm_id=algorithm_id(self._identity(source)),
            finding_sites=sites,
        )

    def _region(self, ds: Dataset, points: Sequence[tuple[float, float]]) -> hd.sr.ImageRegion:
        cols, rows = int(ds.Columns), int(ds.Rows)
        xy = np.array(
            [(min(x * cols, cols - 1.0), min(y * rows, rows - 1.0)) for x, y in points], dtype=np.float64
        )
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=xy,
            source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID),
        )

    def _roi_group(
        self,
        img: ImageAnalysis,
        ds: Dataset,
        label: tuple[object, ...],
        finding: Code,
        category: Code,
        points: Sequence[tuple[float, float]],
        score: float | None,
        source: Source,
    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        clinician = source == Source.CLINICIAN
        measurements = (
            [self._number(codes.DETECTION_SCORE, score, "1", source)] if score is not None else None
        )
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=self._tracking(img.sop_instance_uid, *label, *(["drawn by clinician"] if clinician
                                                                               else [])),
            referenced_region=self._region(ds, points),
            finding_type=finding,
            finding_category=category,
            algorithm_id=None if clinician else algorithm_id(self._identity(source)),
            finding_sites=[_finding_site(img, ds)],
            measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.OBSERVER_TYPE, codes.OBSERVER_PERSON)]
            if clinician else None,
        )

    def _lesion_group(
        self, img: ImageAnalysis, ds: Dataset, n: int, lesion: Lesion
    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        x0, y0, x1, y1 = lesion.box
        return self._roi_group(
            img,
            ds,
            (lesion.type.value, n),
            codes.LESIONS[lesion.type],
            codes.FINDING_CATEGORY_MORPHOLOGY,
            [(x0, y0), (x1, y0), (x1, y1), (x0, y1)],
            lesion.score,
            lesion.source,
        )

    def _landmark_group(
        self, img: ImageAnalysis, ds: Dataset, landmark: Landmark
    ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
        if landmark.contour:
            points = list(landmark.contour)
        else:
            x0, y0, x1, y1 = landmark.box  # type: ignore[misc]
            points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        return self._roi_group(
            img,
            ds,
            (landmark.type.value,),
            codes.LANDMARKS[landmark.type],
            codes.FINDING_CATEGORY_ANATOMY,
            points,
            landmark.score,
            landmark.source,
        )


def library_images(sources: Sequence[Dataset]) -> tuple[list[Dataset], dict[str, str]]:
    """Metadata copies for the TID 1600 Image Library and the true SOP classes to restore afterwards.

    highdicom maps SOP classes to modality codes from a table that lacks Wide Field OP (77.1.5.5/6); the
    library entry of such an image is built from a copy announced as OP 8-bit (same modality code, OP) and
    :func:`restore_sop_classes` writes the real SOP Class UID back into the built content items.
    """
    copies: list[Dataset] = []
    restore: dict[str, str] = {}
    for ds in sources:
        copy = metadata(ds)
        if copy.SOPClassUID in WIDE_FIELD_OP:
            restore[str(copy.SOPInstanceUID)] = str(copy.SOPClassUID)
            copy.SOPClassUID = OP_8BIT
        copies.append(copy)
    return copies, restore


def restore_sop_classes(items: Sequence[Dataset], restore: dict[str, str]) -> None:
    """Put the real SOP Class UIDs of :func:`library_images` back into the IMAGE references in ``items``."""
    for item in items:
        for ref in item.get("ReferencedSOPSequence", []):
            if str(ref.ReferencedSOPInstanceUID) in restore:
                ref.ReferencedSOPClassUID = restore[str(ref.ReferencedSOPInstanceUID)]
        restore_sop_classes(item.get("ContentSequence", []), restore)


def qualitative_evaluations(analysis: StudyAnalysis, notes: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 document-level Qualitative Evaluations: referral, impression and notes as text; a referral
    the signing clinician set is said so in a comment (the document's observer context is the algorithm)."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            codes.REFERRAL, codes.REFERRAL_VALUES[analysis.referral], hd.sr.RelationshipTypeValues.CONTAINS
        )
    ]
    if analysis.impression:
        items.append(
            hd.sr.TextContentItem(
                codes.IMPRESSION, analysis.impression, hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    if analysis.referral_source == Source.CLINICIAN:
        notes = [summary.referral_text(analysis), *notes]
    items += [
        hd.sr.TextContentItem(codes.COMMENT, note, hd.sr.RelationshipTypeValues.CONTAINS) for note in notes
    ]
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container
