"""Clinician verification of a result revision (issue 17 item 1), as the result builders need it.

An AI result is preliminary until a clinician signs it off. A signed revision carries a :class:`Verification`
into :func:`reporting.build_report_objects`, which then marks every object accordingly:

* DICOM SR: Verification Flag ``VERIFIED`` and one Verifying Observer Sequence item (observer name, organisation,
  verification date/time; PS3.3 C.17.2 SR Document General Module, Table C.17-2); unsigned documents stay
  ``UNVERIFIED`` with no such sequence.
* FHIR R4 DiagnosticReport (and its Observations): ``preliminary`` while unsigned; ``final`` once signed, or
  ``amended`` when the clinician changed something; the clinician is the report's ``resultsInterpreter``.
* HL7 v2 ORU (OBR-25 / OBX-11, HL7 table 0085): ``F`` for a signed result, ``C`` when it corrects a result that
  was already signed (final) before; unsigned results keep the configured status (``P`` by default).
* Series Description (LO) of the SR, SEG, key image and Encapsulated PDF series, the SEG Content Description, the
  PDF's Document Title and its title, the statement burned into the key image and heading the PDF, and the FHIR
  ``presentedForm`` title: "AI result, not verified" while unsigned, "verified by <clinician>" once signed
  (:func:`series_description`, :func:`status_label`).

Pure data: no I/O, no worker imports.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field
from pydicom.valuerep import PersonName


class Verification(BaseModel):
    """Who verified a result revision, when, and whether they changed the AI's answers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    observer_name: str = Field(min_length=1, max_length=64, description="DICOM PN, e.g. 'Smith^Jane'")
    observer_id: str = Field(min_length=1, max_length=128, description="the signing identity (API token name)")
    organisation: str = Field(min_length=1, max_length=64)
    verified_at: dt.datetime
    changed: bool = Field(description="the clinician corrected at least one AI answer")
    corrects_signed: bool = Field(default=False, description="it replaces a result that was already signed")

    @property
    def fhir_status(self) -> str:
        return "amended" if self.changed or self.corrects_signed else "final"

    @property
    def display_name(self) -> str:
        """The clinician as people write the name (``Smith^Jane`` → ``Jane Smith``), else the signing identity."""
        name = str(PersonName(self.observer_name).formatted("%(given_name)s %(family_name)s")).strip()
        return name or self.observer_id


VERIFIED_PREFIX = "Verified by a clinician:"
"""Start of the note a signed analysis carries (:func:`verification_note`); every result object that lists the
notes then states the verification instead of "not verified" (:func:`reporting.summary.notes`)."""


def verification_note(verification: Verification) -> str:
    """The statement of a signed result, e.g. ``Verified by a clinician: Smith^Jane (Eye Clinic), 2026-12-03
    14:05 UTC; AI result corrected.``"""
    at = verification.verified_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    what = "AI result corrected" if verification.changed else "AI result confirmed"
    return f"{VERIFIED_PREFIX} {verification.observer_name} ({verification.organisation}), {at}; {what}."


def is_verified_note(note: str) -> bool:
    return note.startswith(VERIFIED_PREFIX)


NOT_VERIFIED_LABEL = "AI result, not verified"
LO_MAX = 64
"""Maximum length of a DICOM LO value (PS3.5 Table 6.2-1): Series Description, Content Description."""


def status_label(verification: Verification | None) -> str:
    """``AI result, not verified`` for an unsigned result, ``verified by Jane Smith`` for a signed one."""
    return NOT_VERIFIED_LABEL if verification is None else f"verified by {verification.display_name}"


def series_description(subject: str, verification: Verification | None) -> str:
    """``<subject> (AI result, not verified)`` or ``<subject> (verified by Jane Smith)``, within the 64 characters
    of an LO value; a name too long for it gives ``<subject> (verified by a clinician)``."""
    text = f"{subject} ({status_label(verification)})"
    return text if len(text) <= LO_MAX else f"{subject} (verified by a clinician)"


def fhir_status(verification: Verification | None) -> str:
    """DiagnosticReport / Observation status (FHIR R4 value sets report-status / observation-status)."""
    return "preliminary" if verification is None else verification.fhir_status
