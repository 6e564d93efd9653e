"""The one UID check of the product, used wherever a UID is read: the network (C-STORE data sets), files
(``retinalgpt analyze`` / ``report`` sources, stored instances) and API paths.

A UID as PS3.5 §9.1 defines it: 1–64 characters, dot-separated numeric components, no leading zero in a
component of more than one digit. The whole value must match (``re.fullmatch``): ``re.match`` with ``$``
accepts a trailing newline, which then reached database keys and folder names while the SR carried the UID
without it (issue 19). Trailing NUL or space padding (PS3.5 §6.2) is removed by the DICOM readers, never here.
"""

from __future__ import annotations

import re

UID_PATTERN = r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*"
_UID = re.compile(UID_PATTERN)
MAX_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a string holding exactly one valid UID."""
    return isinstance(value, str) and 0 < len(value) <= MAX_LENGTH and _UID.fullmatch(value) is not None


def require_uid(value: object, what: str = "UID") -> str:
    """``value`` if it is a valid UID, else :class:`ValueError` naming ``what`` and showing the value."""
    if not is_valid_uid(value):
        raise ValueError(f"{what} {value!r} is not a valid DICOM UID (PS3.5 §9.1)")
    return str(value)
