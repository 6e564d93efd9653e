"""Path parameters shared by the API routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import AfterValidator

from dicom_node.uids import MAX_LENGTH, require_uid

UidPath = Annotated[str, Path(description=f"a DICOM UID (PS3.5 §9.1, at most {MAX_LENGTH} characters)"),
                    AfterValidator(require_uid)]
"""A UID in a URL path, validated whole by :func:`dicom_node.uids.require_uid` (a trailing newline is
refused)."""
