"""DIMSE status codes the node answers and how a sender should treat each (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses used by our SCP (documented in ``docs/conformance.md``)."""

    SUCCESS = 0x0000
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES_STORAGE = 0xA700
    OUT_OF_RESOURCES_DATABASE = 0xA701
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    MISSING_IDENTIFIER = 0xC001
    INVALID_IDENTIFIER = 0xC002
    PIXEL_DATA_TRUNCATED = 0xC003
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    """STOW-RS only (PS3.18 Table 10.5.3-3 "Referenced Transfer Syntax not supported"): a DIMSE sender can only
    use a transfer syntax we accepted at association."""
    UID_CONFLICT = 0xC004
    """The SOP Instance UID (or the Series Instance UID) is already stored under another study, series or
    patient, or the study is recorded for another Patient ID: nothing is moved between studies or patients."""


def is_success(status: int) -> bool:
    return status == 0x0000


def is_warning(status: int) -> bool:
    """Warning statuses (PS3.4 Table B.2-1): the instance was stored, with coercion or elements discarded."""
    return status in (0x0001, 0xB000, 0xB006, 0xB007) or 0xB000 <= status <= 0xBFFF


def is_transient_failure(status: int) -> bool:
    """Failures worth retrying later: out of resources (0xA7xx) and the generic processing failure (0x0110)
    and its duplicate-invocation/resource-limit siblings (0x0210–0x0213)."""
    return 0xA700 <= status <= 0xA7FF or status in (0x0110, 0x0210, 0x0211, 0x0212, 0x0213)
