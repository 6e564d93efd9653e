"""Posts transaction Bundles to a FHIR server (FHIR R4 RESTful API §3.1.0.11, ``POST [base]``).

Transient failures (connection errors, timeouts, HTTP 408 / 429 / 5xx) are retried with exponential backoff
(``backoff_seconds · 2^(attempt-1)``, honouring ``Retry-After`` on 429/503); any other 4xx is permanent and
returned at once so the delivery pipeline dead-letters it instead of looping.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
TRANSIENT_STATUS = {408, 429}


@dataclass(frozen=True)
class FhirAuthOptions:
    """How to authenticate to the FHIR server: none, bearer token, HTTP basic, or mutual TLS."""

    kind: Literal["none", "bearer", "basic", "mtls"] = "none"
    token: str | None = None
    username: str | None = None
    password: str | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    ca_certificates: Path | None = None

    def __post_init__(self) -> None:
        needs = {
            "bearer": ("token",),
            "basic": ("username", "password"),
            "mtls": ("client_certificate", "client_key"),
        }.get(self.kind, ())
        missing = [name for name in needs if getattr(self, name) in (None, "")]
        if missing:
            raise ValueError(f"FHIR auth kind {self.kind!r} needs {', '.join(missing)}")


NO_AUTH = FhirAuthOptions()


@dataclass(frozen=True)
class FhirDeliveryResult:
    """Outcome of one delivery: ``ok``; else ``permanent`` tells whether a retry later can help."""

    ok: bool
    permanent: bool
    status: int | None
    detail: str
    attempts: int


def _tls_context(auth: FhirAuthOptions) -> ssl.SSLContext | bool:
    if auth.kind != "mtls" and auth.ca_certificates is None:
        return True
    context = ssl.create_default_context(cafile=str(auth.ca_certificates) if auth.ca_certificates else None)
    if auth.kind == "mtls":
        context.load_cert_chain(str(auth.client_certificate), str(auth.client_key))
    return context


def _outcome_text(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome body, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return "; ".join(
            str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
            for i in body.get("issue", [])
        )[:300]
    return response.text[:300]


class FhirDeliveryClient:
    """A FHIR endpoint with its credentials and retry policy."""

    def __init__(
        self,
        url: str,
        auth: FhirAuthOptions = NO_AUTH,
        timeout: float = 30.0,
        max_attempts: int = 8,
        backoff_seconds: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.url = url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self._sleep = sleep
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if auth.kind == "bearer":
            headers["Authorization"] = f"Bearer {auth.token}"
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout,
            auth=httpx.BasicAuth(auth.username or "", auth.password or "") if auth.kind == "basic" else None,
            verify=_tls_context(auth),
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FhirDeliveryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        delay = self.backoff_seconds * 2 ** (attempt - 1)
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        return delay

    def post_transaction(self, bundle: dict) -> FhirDeliveryResult:
        """POST ``bundle`` to the base URL until it succeeds, fails permanently, or attempts run out."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in {"transaction", "batch"}:
            return FhirDeliveryResult(False, True, None, "not a transaction or batch Bundle", 0)
        detail, status = "", None
        for attempt in range(1, self.max_attempts + 1):
            response: httpx.Response | None = None
            try:
                response = self._client.post(self.url, json=bundle)
            except httpx.TransportError as exc:
                detail, status = f"{type(exc).__name__}: {exc}", None
            else:
                status = response.status_code
                if response.is_success:
                    return FhirDeliveryResult(True, False, status, f"HTTP {status}", attempt)
                detail = f"HTTP {status}: {_outcome_text(response)}"
                if status < 500 and status not in TRANSIENT_STATUS:
                    log.warning("FHIR delivery to %s failed permanently: %s", self.url, detail)
                    return FhirDeliveryResult(False, True, status, detail, attempt)
            if attempt < self.max_attempts:
                delay = self._delay(attempt, response)
                log.info(
                    "FHIR delivery to %s failed (%s), retry %d in %.1fs", self.url, detail, attempt, delay
                )
                self._sleep(delay)
        return FhirDeliveryResult(False, False, status, detail, self.max_attempts)
