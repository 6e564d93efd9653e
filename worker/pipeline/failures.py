"""Which failures are permanent, in one place.

A job or delivery goes straight to ``dead`` only for a failure that retrying cannot fix: the study has no
analysable image, the model is not available (a configuration to fix), the destination refused us
(association rejected, SOP class refused, HTTP 4xx), or the destination is no longer configured. Every other
error — a decoder or numpy error, an I/O error, a timeout, a bug — is retried with its attempts counted and ends
as ``dead`` with reason ``attempts_exhausted`` and the last error, so nothing fails silently and nothing loops.
"""

from __future__ import annotations

from worker.db import FailureReason
from worker.runtime import ModelUnavailable


class PermanentFailure(Exception):
    """A failure that retrying cannot fix; the work goes straight to ``dead`` with ``reason``."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def permanent_reason(exc: BaseException) -> FailureReason | None:
    """The dead-letter reason when ``exc`` is permanent, None when the work should be retried."""
    if isinstance(exc, PermanentFailure):
        return exc.reason
    if isinstance(exc, ModelUnavailable):
        return FailureReason.MODEL_UNAVAILABLE
    return None
