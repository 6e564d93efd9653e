"""Key image: a Secondary Capture of the fundus with the result burned in (PS3.3 A.8.1 SC Image IOD).

Lesion boxes (the AI's in yellow, those the clinician drew at sign-off in red), optic disc and cup outlines, the
fovea and a short text summary (present findings, conditions not assessed, measured vertical CDR, referral,
verification) are drawn onto the photograph, lines wrapped to the image
width, so that any PACS viewer shows a person the result without SR support. Burned In Annotation is YES and
the source photograph is named in the Source Image Sequence.
"""

from __future__ import annotations

import textwrap

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from model.schema import ImageAnalysis, LandmarkType, Source, StudyAnalysis
from reporting import codes, summary
from reporting.options import ReportOptions
from reporting.sources import laterality, metadata, result_key, rgb_pixels, uid
from reporting.verification import Verification, series_description

LESION_COLOUR = (255, 215, 0)
CLINICIAN_COLOUR = (255, 64, 64)
"""Boxes the clinician drew at sign-off (``Source.CLINICIAN``), told apart from the AI's."""
DISC_COLOUR = (0, 200, 255)
CUP_COLOUR = (255, 80, 255)
FOVEA_COLOUR = (120, 255, 120)
TEXT_COLOUR = (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def summary_lines(analysis: StudyAnalysis, img: ImageAnalysis,
                  verification: Verification | None = None) -> list[str]:
    """The text burned into the key image of ``img``, ending with the verification statement."""
    lines = [summary.image_title(img), *summary.image_summary(analysis, img)]
    cdr = next((m for m in summary.reported_measurements(img) if m.key == "CDR_vertical"), None)
    if cdr is not None:
        lines.append(f"Vertical CDR {cdr.value:.2f} (measured)")
    drawn = summary.clinician_lesions(img)
    if drawn:
        names = sorted({codes.LESIONS[lesion.type].meaning.lower() for lesion in drawn})
        lines.append(f"Red boxes: drawn by the clinician ({', '.join(names)})")
    lines.append(summary.referral_text(analysis).rstrip("."))
    lines.append(summary.verification_statement(verification))
    return lines


def annotate(pixels: np.ndarray, analysis: StudyAnalysis, img: ImageAnalysis,
             verification: Verification | None = None) -> np.ndarray:
    """``pixels`` (RGB uint8) with the summary in a box at the top left, and the boxes and contours drawn over
    it, so that a long summary on a small image never hides a marked lesion."""
    canvas = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    font = _font(max(10, h // 40))
    columns = max(24, int(w * 0.9 / max(1.0, font.getlength("n"))))
    text = "\n".join(part for entry in summary_lines(analysis, img, verification)
                     for part in textwrap.wrap(entry, columns))
    box = draw.multiline_textbbox((0, 0), text, font=font)
    pad = max(4, h // 100)
    draw.rectangle([0, 0, box[2] + 2 * pad, box[3] + 2 * pad], fill=(0, 0, 0))
    draw.multiline_text((pad, pad), text, fill=TEXT_COLOUR, font=font)
    line = max(1, round(min(w, h) / 300))
    for lesion in img.lesions:
        x0, y0, x1, y1 = lesion.box
        colour = CLINICIAN_COLOUR if lesion.source == Source.CLINICIAN else LESION_COLOUR
        draw.rectangle([x0 * w, y0 * h, x1 * w, y1 * h], outline=colour, width=line)
    for landmark in img.landmarks:
        colour = {LandmarkType.OPTIC_DISC: DISC_COLOUR, LandmarkType.OPTIC_CUP: CUP_COLOUR}.get(
            landmark.type, FOVEA_COLOUR
        )
        if landmark.contour:
            draw.polygon([(x * w, y * h) for x, y in landmark.contour], outline=colour, width=line)
        elif landmark.box is not None:
            x0, y0, x1, y1 = landmark.box
            draw.ellipse([x0 * w, y0 * h, x1 * w, y1 * h], outline=colour, width=line)
        else:
            cx, cy, r = landmark.center[0] * w, landmark.center[1] * h, 4 * line
            draw.line([cx - r, cy, cx + r, cy], fill=colour, width=line)
            draw.line([cx, cy - r, cx, cy + r], fill=colour, width=line)
    return np.asarray(canvas)


def build_key_image(
    analysis: StudyAnalysis, img: ImageAnalysis, source: Dataset, options: ReportOptions, instance_number: int,
    verification: Verification | None = None,
) -> hd.sc.SCImage:
    """The key image of one analysed source image, in the source's study; its burned-in statement and Series
    Description say whether a clinician verified the result (:mod:`reporting.verification`)."""
    pixels = annotate(rgb_pixels(source), analysis, img, verification)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=metadata(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uid(result_key(analysis), "key-series"),
        series_number=options.key_image_series_number,
        sop_instance_uid=uid(result_key(analysis), "key", source.SOPInstanceUID),
        instance_number=instance_number,
        manufacturer=options.manufacturer,
        patient_orientation=("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=series_description("RetinalGPT key images", verification),
    )
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    if options.institution_name:
        sc.InstitutionName = options.institution_name
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    side = laterality(img, source)
    if side is not None:
        sc.ImageLaterality = side
    else:
        sc.Laterality = None  # Type 2C, required for a paired body part: present and empty when unknown
    return sc
