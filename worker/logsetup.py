"""Process logging: one format, secrets masked, no patient identifiers, an access log of our own.

- Every line passes :class:`RedactingFormatter`, which masks the password of any URL (``scheme://user:pw@``)
  in the message and in tracebacks: database, broker and FHIR URLs carry them (issue 19).
- Patient names, IDs and birth dates are never written by our code unless ``logging.phi = true``
  (:func:`phi_enabled`); the listed third-party loggers that would echo request data or task results are kept
  at WARNING: Celery's task tracer logs every return value at INFO (a chat answer), uvicorn's access log whole
  URLs with their query strings (MRNs in FHIR and worklist searches, a token sent as ``?access_token=``).
- The API logs each request itself on ``retinalgpt.access`` (:func:`access_line`): method, route template,
  status and duration; never the path's values, the query string or a body.
"""

from __future__ import annotations

import logging
import re
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


class RedactingFormatter(logging.Formatter):
    """A formatter whose whole output, traceback included, has URL passwords masked."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_url(super().format(record))


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
