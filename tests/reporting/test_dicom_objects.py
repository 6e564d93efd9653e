"""SR, SEG, key image and PDF checked by dicom3tools (dciodvfy, dcentvfy), dcmtk (dsrdump) and highdicom."""

from __future__ import annotations

import os
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from model.schema import Quality, QualityGrade, Source
from reporting import ReportOptions, build_report_objects, summary
from reporting.codes import (
    CONDITIONS,
    DERIVATION,
    NOT_ASSESSED,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_VERSION,
    feature,
    unit,
)
from reporting.key_image import summary_lines
from tests.reporting.reporting_fixtures import MODEL, OPTIONS, PIPELINE, make_analysis, vessel_mask, write_all

DCIODVFY, DCENTVFY, DSRDUMP = "/usr/bin/dciodvfy", "/usr/bin/dcentvfy", "/usr/bin/dsrdump"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"}
    )


def test_dciodvfy_finds_no_errors(built):
    kind, _, _, objects, files = built
    assert (
        len(files["sr"]) == 1 and len(files["seg"]) == 2 and len(files["key"]) == 2 and len(files["pdf"]) == 1
    )
    for name in ("sr", "seg", "key", "pdf"):
        for path in files[name]:
            run = _run(DCIODVFY, str(path))
            errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], f"{kind} {name}: {errors}"


def test_dcentvfy_patient_and_study_consistent(built):
    _, _, _, _, files = built
    run = _run(DCENTVFY, *(str(p) for paths in files.values() for p in paths))
    assert run.returncode == 0
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_results_are_in_the_source_study(built):
    _, sources, _, objects, _ = built
    for ds in objects.datasets:
        for keyword in (
            "StudyInstanceUID",
            "PatientID",
            "PatientName",
            "PatientBirthDate",
            "AccessionNumber",
        ):
            assert str(ds.get(keyword, "")) == str(sources[0].get(keyword, "")), keyword
    assert objects.sr.VerificationFlag == "UNVERIFIED"
    assert objects.pdf.Modality == "DOC" and objects.pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert objects.pdf.EncapsulatedDocument.startswith(b"%PDF") and objects.pdf_bytes.startswith(b"%PDF")
    assert all(k.BurnedInAnnotation == "YES" for k in objects.key_images)


def test_sr_references_every_source_with_its_true_sop_class(built):
    _, sources, _, objects, _ = built
    evidence = {
        ref.ReferencedSOPInstanceUID: ref.ReferencedSOPClassUID
        for study in objects.sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID: ds.SOPClassUID for ds in sources}
    (library,) = [
        item
        for item in objects.sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
    ]
    refs = [
        item.ReferencedSOPSequence[0]
        for group in library.ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "IMAGE"
    ]
    assert {r.ReferencedSOPInstanceUID: r.ReferencedSOPClassUID for r in refs} == evidence


def test_contributing_equipment_and_private_scheme(built):
    _, _, _, objects, _ = built
    equipment = {
        item.DeviceUID: item for item in objects.sr.ContributingEquipmentSequence if "DeviceUID" in item
    }
    assert set(equipment) == {MODEL.device_uid, PIPELINE.device_uid}
    model = equipment[MODEL.device_uid]
    assert (model.ManufacturerModelName, model.SoftwareVersions) == (MODEL.name, MODEL.version)
    assert model.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert model.ContributionDescription == "Processing Algorithm"
    schemes = {s.CodingSchemeDesignator: s for s in objects.sr.CodingSchemeIdentificationSequence}
    assert schemes[PRIVATE_SCHEME].CodingSchemeVersion == PRIVATE_SCHEME_VERSION


def test_highdicom_reads_the_sr_back(built):
    _, sources, analysis, objects, files = built
    sr = hd.sr.srread(files["sr"][0])
    report = sr.content
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(sources)
    right = next(
        g for g in groups if g.source_images[0].referenced_sop_instance_uid == sources[0].SOPInstanceUID
    )
    evaluations = {e.name.meaning: e.value.meaning for e in right.get_qualitative_evaluations()}
    assert evaluations["Diabetic retinopathy"] == "Moderate nonproliferative diabetic retinopathy"
    assert evaluations["Glaucoma"] == "Absent"
    assert evaluations["Quality Assessment"] == "Usable - Meets the quality control standard"
    assert evaluations["Model estimate disagrees with measurement"] == "Vessel fractal dimension"
    numbers = [(m.name.meaning, m.value, m.unit.value) for m in right.get_measurements()]
    for group, image in zip(groups, analysis.images, strict=True):  # every measured number comes back
        read = {(m.name.value, m.value, m.unit.value, m.derivation.meaning) for m in group.get_measurements()}
        written = {
            (feature(m.key).code.value, m.value, unit(m.unit).value, DERIVATION[m.source].meaning)
            for m in image.measurements
            if m.source == Source.MEASURED
        }
        assert written <= read and len(read - written) == 1 + len(image.findings)  # + quality, probabilities
    expected = [(n, v, u) for n, v, u in numbers if n == "Central retinal artery equivalent (Knudtson)"]
    assert expected == [("Central retinal artery equivalent (Knudtson)", 141.2, "um")]
    fd = [
        m
        for m in right.get_measurements(
            name=hd.sr.CodedConcept("FD", PRIVATE_SCHEME, "Vessel fractal dimension")
        )
    ]
    assert [(m.value, m.derivation.meaning) for m in fd] == [(1.47, "Measured")]
    assert ("Probability of diabetic retinopathy", 0.91, "1") in numbers
    regions = report.get_planar_roi_measurement_groups()
    kinds = sorted(g.finding_type.meaning for g in regions)
    assert kinds == sorted(
        ["Retinal microaneurysm", "Hemorrhage"] + ["Optic disc structure", "Optic cup"] * 2
    )
    disc = next(g for g in regions if g.finding_type.meaning == "Optic disc structure")
    region = disc.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    points = region.value
    assert np.allclose(points[0], points[-1]) and len(points) == 17
    cols = int(sources[0].Columns)
    assert abs(points[:, 0].mean() - 0.25 * cols) < 3
    algorithm = [
        i.TextValue for i in disc[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001"
    ]
    assert algorithm == [PIPELINE.name]


def test_dsrdump_prints_the_content(built):
    *_, files = built
    run = _run(DSRDUMP, "+Pc", "+Pl", str(files["sr"][0]))
    assert run.returncode == 0, run.stderr
    text = run.stdout
    for expected in [
        '"Imaging Measurement Report"',
        '"Image Library"',
        '"Measurement Group"',
        '(4855003,SCT,"Diabetic retinopathy")=(312904009,SCT,"Moderate nonproliferative diabetic '
        'retinopathy")',
        '"Probability of diabetic retinopathy")="0.91"',
        '"Central retinal artery equivalent (Knudtson)")="141.2" (um,UCUM,"micrometer")',
        '(258104002,SCT,"Measured")',
        '(414135002,SCT,"Estimated")',
        '(ZONE-C,99RGPT[1.0],"Zone C, 0.5 to 2 disc diameters from the disc margin")',
        '(51114001,SCT,"Artery")',
        '"Algorithm Name")="RetinalGPT"',
        '"Algorithm Version")="7b-v1.2"',
        '(111030,DCM,"Image Region")=(POLYLINE,',
        '"Referral recommendation")=(REFER-URGENT,99RGPT[1.0],"Urgent referral")',
        "AI result, not verified by a clinician.",
        "Verification Flag   : UNVERIFIED",
        '(267718000,SCT,"Age-related macular degeneration")=(373121007,SCT,"Not Evaluated")',
        '(193570009,SCT,"Cataract")=(373121007,SCT,"Not Evaluated")',
        '"Model estimate disagrees with measurement")=(FD,99RGPT[1.0],"Vessel fractal dimension")',
    ]:
        assert expected in text, expected


def test_segmentation_content(built):
    _, sources, _, objects, _ = built
    seg = objects.segmentations[0]  # highdicom's reader insists on a Slice Thickness, which a photograph lacks
    labels = [d.SegmentLabel for d in seg.SegmentSequence]
    assert labels == [
        "Retinal vessels",
        "Retinal microaneurysm",
        "Hemorrhage",
        "Optic disc structure",
        "Optic cup",
    ]
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    frames = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encoded(seg))).pixel_array
    vessel_frame = next(n for n, item in enumerate(seg.PerFrameFunctionalGroupsSequence)
                        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1)
    vessels = frames[vessel_frame] if frames.ndim == 3 else frames
    assert np.array_equal(vessels.astype(bool), vessel_mask(sources[0]))


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _pixel_measures(seg: pydicom.Dataset) -> pydicom.Dataset | None:
    shared = seg.get("SharedFunctionalGroupsSequence")
    return shared[0].PixelMeasuresSequence[0] if shared and "PixelMeasuresSequence" in shared[0] else None


def test_segmentation_carries_the_source_spacing_or_none(built):
    """The SEG's Pixel Measures are the source's Pixel Spacing, never an invented 1 mm / 1 mm slice (issue 19)."""
    _, sources, _, objects, _ = built
    for seg, source in zip(objects.segmentations, sources, strict=True):
        measures = _pixel_measures(seg)
        if "PixelSpacing" in source and "FrameOfReferenceUID" not in seg:
            assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in source.PixelSpacing]
        else:  # no spacing, or a Frame of Reference that would need the Slice Thickness the source lacks
            assert measures is None
        assert measures is None or "SliceThickness" not in measures  # no source here has one


@pytest.mark.parametrize("kind", ["op8", "op16", "widefield"])
def test_segmentation_of_an_op_without_spacing_is_in_pixels_and_valid(source_factory, tmp_path, kind):
    """OP sources may lack Pixel Spacing (PS3.3 C.8.17.2, type 1C): the SEG then has no pixel measures at all
    and dciodvfy still finds no error."""
    sources = source_factory(kind)
    for ds in sources:
        del ds.PixelSpacing
    masks = {str(ds.SOPInstanceUID): vessel_mask(ds) for ds in sources}
    objects = build_report_objects(make_analysis(sources), sources, OPTIONS, vessel_masks=masks)
    files = write_all(objects, sources, tmp_path)
    assert len(files["seg"]) == 2
    for seg, path in zip(objects.segmentations, files["seg"], strict=True):
        assert _pixel_measures(seg) is None
        assert "PixelSpacing" not in pydicom.dcmread(path)
        run = _run(DCIODVFY, str(path))
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors


def test_revision_supersedes_previous_sr(source_factory):
    sources = source_factory("op8")
    first = build_report_objects(make_analysis(sources), sources, ReportOptions(key_image=False, pdf=False))
    again = build_report_objects(make_analysis(sources), sources, ReportOptions(key_image=False, pdf=False))
    assert again.sr.SOPInstanceUID == first.sr.SOPInstanceUID  # a re-send is recognised as the same object
    second = build_report_objects(
        make_analysis(sources, revision=2),
        sources,
        ReportOptions(key_image=False, pdf=False),
        previous_sr=first.sr,
    )
    assert second.sr.SOPInstanceUID != first.sr.SOPInstanceUID
    predecessor = (
        second.sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    )
    assert predecessor.ReferencedSOPInstanceUID == first.sr.SOPInstanceUID
    report = next(
        e["resource"]
        for e in second.fhir_bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert report["status"] == "preliminary"  # a re-analysis nobody signed


def test_without_model_the_objects_say_so(source_factory, tmp_path):
    sources = source_factory("op8")
    analysis = make_analysis(sources, with_model=False)
    objects = build_report_objects(analysis, sources, ReportOptions(segmentation=True))
    files = write_all(objects, sources, tmp_path)
    text = _run(DSRDUMP, "+Pl", str(files["sr"][0])).stdout
    assert "RetinalGPT was not run for this study" in text and "RetinalGPT not configured" in text
    assert '"Vertical cup-to-disc ratio")="0.42"' in text
    assert "Probability of" not in text
    for path in files["sr"] + files["pdf"] + files["key"] + files["seg"]:
        run = _run(DCIODVFY, str(path))
        assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    equipment = objects.sr.ContributingEquipmentSequence
    assert [item.DeviceUID for item in equipment if "DeviceUID" in item] == [PIPELINE.device_uid]


def test_sources_from_another_study_are_refused(source_factory):
    sources = source_factory("op8")
    other = source_factory("op8")
    with pytest.raises(ValueError, match="not the analysed study"):
        build_report_objects(make_analysis(sources), [*sources, other[0]], ReportOptions())


def test_jpeg_op_from_img2dcm(tmp_path, retina_rgb):
    """An OP made by dcmtk's img2dcm from a JPEG (JPEG Baseline, YBR_FULL_422) gives valid objects and an
    undistorted key image."""
    from PIL import Image

    Image.fromarray(retina_rgb).resize((384, 384)).save(tmp_path / "fundus.jpg", quality=90)
    run = _run(
        "/usr/bin/img2dcm",
        "-oph",
        "--no-checks",
        "-k",
        "ImageLaterality=R",
        "-k",
        "Modality=OP",
        "-k",
        "PatientID=JPEG1",
        "-k",
        "PatientName=Jpeg^Source",
        str(tmp_path / "fundus.jpg"),
        str(tmp_path / "op.dcm"),
    )
    assert run.returncode == 0, run.stderr
    source = pydicom.dcmread(tmp_path / "op.dcm")
    assert source.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    objects = build_report_objects(
        make_analysis([source]),
        [source],
        OPTIONS,
        vessel_masks={str(source.SOPInstanceUID): vessel_mask(source)},
    )
    files = write_all(objects, [source], tmp_path / "out")
    for path in files["sr"] + files["seg"] + files["key"] + files["pdf"]:
        run = _run(DCIODVFY, str(path))
        assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")], (
            path.name
        )
    key = objects.key_images[0].pixel_array.astype(float)
    corner = (slice(300, 380), slice(300, 380))  # nothing is drawn there
    assert np.abs(key[corner] - source.pixel_array[corner].astype(float)).mean() < 1.0


def test_awkward_results_still_give_valid_objects(source_factory, tmp_path):
    """A NaN measurement, an eye of unknown laterality, an image analysed from a plain file and a zero-area
    lesion box: skipped or noted, never an invalid object."""
    from fhir.resources.R4B.bundle import Bundle

    from model.schema import ImageAnalysis, Laterality, Lesion, LesionType, Measurement

    sources = source_factory("op8")
    analysis = make_analysis(sources)
    del sources[1].ImageLaterality
    analysis.images[1].laterality = Laterality.UNKNOWN
    analysis.images[0].measurements.append(
        Measurement(key="Tortuosity_density", value=float("nan"), unit="1")
    )
    analysis.images[0].lesions.append(Lesion(type=LesionType.DRUSEN, box=(0.5, 0.5, 0.5, 0.5), score=0.2))
    analysis.images.append(ImageAnalysis(file_path="/import/plain.jpg"))
    objects = build_report_objects(analysis, sources, OPTIONS, vessel_masks={})
    files = write_all(objects, sources, tmp_path)
    for path in files["sr"] + files["seg"] + files["key"] + files["pdf"]:
        run = _run(DCIODVFY, str(path))
        assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")], (
            path.name
        )
    run = _run(DCENTVFY, *(str(p) for paths in files.values() for p in paths))
    assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    text = _run(DSRDUMP, "+Pl", str(files["sr"][0])).stdout
    assert "Image /import/plain.jpg has no source instance; not referenced." in text
    assert "Tortuosity density" not in text and '"Finding")=(DRUSEN,99RGPT[1.0],"Drusen")' in text
    Bundle.model_validate(objects.fhir_bundle)
    findings = [
        e["resource"]
        for e in objects.fhir_bundle["entry"]
        if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "EYE-FINDINGS"
    ]
    assert len(findings) == 2 and sum("bodySite" in f for f in findings) == 1


def test_not_assessed_conditions_are_named_in_every_image_group(built):
    """Each condition the model was not trained on is a TID 1501 qualitative evaluation of the image with the
    value (373121007, SCT, "Not Evaluated"): read back by highdicom, never coded absent, never left out."""
    _, _, analysis, _, files = built
    groups = hd.sr.srread(files["sr"][0]).content.get_image_measurement_groups()
    for group, image in zip(groups, analysis.images, strict=True):
        assert image.not_assessed
        evaluations = [(e.name, e.value) for e in group.get_qualitative_evaluations()]
        not_evaluated = {name.value for name, value in evaluations if value == NOT_ASSESSED}
        assert not_evaluated == {CONDITIONS[c].value for c in image.not_assessed}
        assert NOT_ASSESSED.scheme_designator == "SCT" and NOT_ASSESSED.value == "373121007"


def test_model_emitted_numbers_are_not_sr_values(built):
    """Model-emitted vascular / CDR numbers are not in the SR; the measured ones are, and the disagreement
    between them is still flagged. The only numbers derived "Estimated" are the model's probabilities."""
    _, _, analysis, _, files = built
    groups = hd.sr.srread(files["sr"][0]).content.get_image_measurement_groups()
    for group, image in zip(groups, analysis.images, strict=True):
        numbers = {(m.name.value, m.value) for m in group.get_measurements()}
        by_source = {
            source: {(feature(m.key).code.value, m.value) for m in image.measurements if m.source == source}
            for source in Source
        }
        model, measured = by_source[Source.MODEL], by_source[Source.MEASURED]
        assert model and not numbers & model
        assert measured <= numbers
        estimated = [m.name.value for m in group.get_measurements() if m.derivation.meaning == "Estimated"]
        assert estimated and all(code.startswith("P-") for code in estimated)
        flags = [
            e.value.value for e in group.get_qualitative_evaluations() if e.name.value == "MODEL-DISAGREES"
        ]
        assert flags == [feature(d.key).code.value for d in image.disagreements] != []


def test_ungradable_image_is_never_presented_as_assessed(source_factory, tmp_path):
    """An ungradable image keeps abstaining: no condition in its SR group (not even "Not Evaluated" ones the
    engine may have listed), and the key image, PDF and FHIR conclusion say it was not gradable instead of
    "no finding present"."""
    from tests.reporting.test_pdf_key_image import pdf_text

    sources = source_factory("op8")
    analysis = make_analysis(sources)
    left = analysis.images[1]
    left.quality = Quality(grade=QualityGrade.REJECT, score=0.1, reasons=["out of focus"])
    left.findings, left.lesions = [], []
    objects = build_report_objects(analysis, sources, OPTIONS, vessel_masks={})
    files = write_all(objects, sources, tmp_path)
    run = _run(DCIODVFY, str(files["sr"][0]))
    assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    groups = hd.sr.srread(files["sr"][0]).content.get_image_measurement_groups()
    named = {e.name.value for e in groups[1].get_qualitative_evaluations()}
    assert not named & {code.value for code in CONDITIONS.values()}
    assert summary.UNGRADABLE == "Not gradable: no condition assessed"
    lines = summary_lines(analysis, left)
    assert summary.UNGRADABLE in lines and not any("finding present" in line for line in lines)
    assert not any("Not assessed" in line for line in lines)
    conclusion = summary.conclusion(analysis)
    assert "Left eye, quality reject (0.10): Not gradable: no condition assessed." in conclusion
    assert summary.UNGRADABLE in pdf_text(objects.pdf_bytes)
    findings = [
        e["resource"]
        for e in objects.fhir_bundle["entry"]
        if e["resource"].get("code", {}).get("coding", [{}])[0].get("code") == "EYE-FINDINGS"
    ]
    left_findings = next(f for f in findings if f["bodySite"]["coding"][0]["code"] == "8966001")
    assert not [c for c in left_findings["component"] if "dataAbsentReason" in c]
    condition_codes = {code.value for code in CONDITIONS.values()}
    assert not [c for c in left_findings["component"] if c["code"]["coding"][0]["code"] in condition_codes]
