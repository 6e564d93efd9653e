"""Process logging: one format, secrets masked, no patient identifiers, an access log of our own.

- Every line passes :class:`RedactingFormatter`, which masks the password of any URL (``scheme://user:pw@``)
  in the message and in tracebacks: database, broker and FHIR URLs carry them (issue 19).
- Patient names, IDs and birth dates are never written by our code unless ``logging.phi = true``
  (:func:`phi_enabled`); the listed third-party loggers that would echo request data or task results are kept
  at WARNING: Celery's task tracer logs every return value at INFO (a chat answer), uvicorn's access log whole
  URLs with their query strings (MRNs in FHIR and worklist searches, a token sent as ``?access_token=``).
  As a second line of defence for text we do not write ourselves (a FHIR server's OperationOutcome echoing the
  Patient, a library's warning about a value), the identifiers of the patients whose files this process has
  read (:func:`remember_patient`) are replaced by ``[PHI]`` in every line while ``logging.phi`` is off.
- The API logs each request itself on ``retinalgpt.access`` (:func:`access_line`): method, route template,
  status and duration; never the path's values, the query string or a body.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "retinalgpt.access"

_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<password>[^@/\s]+)@")
_QUIET = {
    "highdicom": logging.WARNING, "pynetdicom": logging.WARNING, "alembic": logging.WARNING,
    "httpx": logging.WARNING, "PIL": logging.WARNING,
    "uvicorn.access": logging.WARNING,   # replaced by retinalgpt.access
    "celery.app.trace": logging.WARNING,  # "Task … succeeded in …: <return value>" at INFO
}
_phi = {"enabled": False}
REDACTED = "[PHI]"
_KNOWN_MAX = 4096
_known: OrderedDict[str, None] = OrderedDict()
_known_lock = threading.Lock()
_known_pattern: list[re.Pattern[str] | None] = [None]


def mask_url(text: str) -> str:
    """``text`` with the password of every URL replaced by ``***`` (user name and host kept)."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def mask_urls(data: Any) -> Any:
    """``data`` (JSON-like) with :func:`mask_url` applied to every string in it."""
    if isinstance(data, str):
        return mask_url(data)
    if isinstance(data, dict):
        return {key: mask_urls(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [mask_urls(value) for value in data]
    return data


def remember_patient(patient_id: object = None, patient_name: object = None, birth_date: object = None) -> None:
    """Note the identifiers of a patient whose data this process handles, so that :class:`RedactingFormatter`
    removes them from log lines (the most recent :data:`_KNOWN_MAX` values are kept). A DICOM Person Name is
    noted whole and by its components; a birth date (DA, ``YYYYMMDD``) also in ISO form."""
    values = {str(patient_id or "").strip()}
    name = str(patient_name or "").strip()
    values |= {name, name.replace("^", " ").strip()} | {part.strip() for part in re.split(r"[\^=]", name)}
    date = str(birth_date or "").strip()
    if re.fullmatch(r"\d{8}", date):
        values |= {date, f"{date[:4]}-{date[4:6]}-{date[6:]}"}
    values = {v for v in values if len(v) >= 3}  # never a one- or two-letter fragment of every line
    if not values:
        return
    with _known_lock:
        changed = False
        for value in values:
            changed |= value not in _known
            _known[value] = None
            _known.move_to_end(value)
        while len(_known) > _KNOWN_MAX:
            _known.popitem(last=False)
        if changed:
            ordered = sorted(_known, key=len, reverse=True)  # longest first: a name before its parts
            _known_pattern[0] = re.compile("|".join(_whole(v) for v in ordered))


def _whole(value: str) -> str:
    """A pattern for ``value`` as a whole word (not inside another word or number); a numeric ID also not as
    a component of a dotted UID, which would otherwise be mangled."""
    if value.isdigit():
        return rf"(?<![A-Za-z0-9.]){re.escape(value)}(?![A-Za-z0-9]|\.\d)"
    return rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])"


def remember_dataset(dataset: Any) -> None:
    """:func:`remember_patient` with a DICOM data set's Patient ID, Patient's Name and Birth Date."""
    remember_patient(dataset.get("PatientID"), dataset.get("PatientName"), dataset.get("PatientBirthDate"))


def redact_phi(text: str) -> str:
    """``text`` with every remembered patient identifier replaced by ``[PHI]`` (unless ``logging.phi``)."""
    pattern = _known_pattern[0]
    if pattern is None or _phi["enabled"]:
        return text
    return pattern.sub(REDACTED, text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output, traceback included, has URL passwords masked and remembered patient
    identifiers redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_phi(mask_url(super().format(record)))


def configure(level: str | int = logging.INFO) -> None:
    """Give the process (a ``retinalgpt`` command) its root handler on stderr with :class:`RedactingFormatter`
    and quiet the chatty loggers; idempotent."""
    root = logging.getLogger()
    if not any(getattr(h, "retinalgpt", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.retinalgpt = True  # type: ignore[attr-defined]
        handler.setFormatter(RedactingFormatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(quiet)


def apply(level: str, *, phi: bool) -> None:
    """Apply the configuration's ``log_level`` (to a process set up by :func:`configure`) and
    ``logging.phi``."""
    _phi["enabled"] = phi
    if any(getattr(h, "retinalgpt", False) for h in logging.getLogger().handlers):
        logging.getLogger().setLevel(level)


def phi_enabled() -> bool:
    """Whether log lines may name the patient (``logging.phi``; default false)."""
    return _phi["enabled"]


def access_line(method: str, route: str, status: int, seconds: float) -> str:
    """The access-log line of one request: ``GET /api/studies/{study_instance_uid} 200 12.3 ms``."""
    return f"{method} {route} {status} {seconds * 1000:.1f} ms"
