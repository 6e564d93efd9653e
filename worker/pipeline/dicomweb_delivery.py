"""DICOMweb destination: result objects sent by STOW-RS (PS3.18 §10.5, Store Transaction) with dicomweb-client.

One request per delivery row (the SR, the key images, the PDF or the SEGs of a revision), posted to
``{url}/studies/{Study Instance UID}`` so that the origin server refuses any instance of another study
(PS3.18 §10.5.1: the instances must belong to the study of the target resource). dicomweb-client writes the
``multipart/related; type="application/dicom"`` body; its own retrying is switched off, because the delivery
queue (:mod:`worker.pipeline.delivery`) owns retries, backoff, dead-letter and idempotence exactly as for DIMSE:

* HTTP 200 (or 202 with Warning Reasons only) without a Failed SOP Sequence (0008,1198): delivered, warnings
  in the outcome's detail (the ``delivery.delivered`` audit event and log line). The instances keep the UIDs written once for the revision, so a repeat sends the same
  instances and the archive files them once;
* connection errors, timeouts, 408, 429 and 5xx: transient, retried with backoff;
* any other 4xx (401 bad credentials, 404 wrong base URL, 409 every instance refused…): permanent, dead at once;
* a 200 / 202 answer that lists failed instances (a partial failure, PS3.18 §10.5.3): each refused instance is
  recorded with its Failure Reason (0008,1197), and the stored ones by UID; the row is retried (the whole
  request again) when every reason is transient (0xA7xx out of resources, 0x0110 processing failure, 0x021x),
  dead when one is not (0x0122 SOP class not supported, 0xA9xx, 0xCxxx). The 409 answer's lists are recorded
  the same way. A 202 whose body cannot be read is a transient failure, never a delivery.

Forwarded originals (issue 16, routing rules' ``forward``): :func:`send_originals_stow` posts the stored files
of a study revision as they are (:func:`store_files`: the Part 10 bytes, so UIDs, transfer syntax and pixel data
are unchanged, never transcoded), classified the same way; the delivery queue's ``originals`` rows call it.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset

from dicom_node.status import is_transient_failure
from worker.config import Destination

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient

    from worker.pipeline.delivery import SendOutcome

TRANSIENT_HTTP = {408, 425, 429}
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced Transfer Syntax not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
"""Failure Reason (0008,1197) and Warning Reason (0008,1196) meanings (PS3.18 Table 10.5.3-1 / PS3.4 Annex
GG.4)."""


@dataclass(frozen=True)
class StowResult:
    """What one STOW-RS request did: HTTP status (None without an answer), stored and failed instances with
    their reasons, whether a failure is permanent, and whether the answer said what was stored (a 202 must)."""

    status: int | None
    stored: list[str]
    failed: list[tuple[str, int | None]]
    detail: str
    permanent: bool
    confirmed: bool = True

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 300 and not self.failed and self.confirmed


def reason_text(code: int | None) -> str:
    if code is None:
        return "no reason given"
    meaning = FAILURE_REASONS.get(code) or FAILURE_REASONS.get(code & 0xFF00, "failure")
    return f"0x{code:04X} {meaning}"


AUTH_NEEDS = {"bearer": ("token",), "basic": ("username",), "mtls": ("client_certificate",)}
"""The ``auth`` keys each kind cannot do without."""


class AuthError(ValueError):
    """The destination's ``auth`` lacks what its kind needs; nothing is sent (it would go out unauthenticated)."""


def session_for(destination: Destination) -> requests.Session:
    """A requests session with the destination's authentication: bearer token (RFC 6750), HTTP basic, or mutual
    TLS; :class:`AuthError` when the kind lacks its credentials. ``auth.ca_certificates`` verifies the server
    (default: the system store). requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` in the environment
    replace a session's own CA bundle, so with a configured bundle the session ignores the environment and
    takes only its proxy settings from it."""
    import requests
    from requests.utils import get_environ_proxies

    auth = destination.auth
    missing = [key for key in AUTH_NEEDS.get(auth.kind, ()) if getattr(auth, key) in (None, "")]
    if missing:
        raise AuthError(f"destination {destination.name!r}: auth kind {auth.kind!r} needs "
                        f"{', '.join(f'auth.{key}' for key in missing)}")
    session = requests.Session()
    if auth.kind == "bearer" and auth.token is not None:
        session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    elif auth.kind == "basic" and auth.username is not None:
        session.auth = (auth.username, auth.password.get_secret_value() if auth.password else "")
    elif auth.kind == "mtls" and auth.client_certificate is not None:
        session.cert = (str(auth.client_certificate), str(auth.client_key)) if auth.client_key else str(
            auth.client_certificate)
    if auth.ca_certificates is not None:
        session.verify = str(auth.ca_certificates)
        session.trust_env = False
        session.proxies.update(get_environ_proxies(destination.url or ""))
    return session


def _transport_detail(exc: requests.RequestException) -> str:
    """A one-line reason for a request that got no HTTP answer; a TLS handshake failure (server certificate not
    trusted, client certificate refused) says so with OpenSSL's reason rather than urllib3's wrapping."""
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen or current is None:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            if isinstance(current, ssl.SSLCertVerificationError):
                return f"TLS failure: certificate verify failed: {current.verify_message}"
            refused = isinstance(current, ssl.SSLEOFError) or "ALERT" in str(current.reason or "")
            return f"TLS failure: {current}" + (" (the server ended the handshake: does it accept our client "
                                                "certificate?)" if refused else "")
        if isinstance(current, BaseException):
            pending += [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
    return f"{type(exc).__name__}: {exc}"


def _failures(response: Dataset) -> list[tuple[str, int | None]]:
    return [(str(item.get("ReferencedSOPInstanceUID", "?")),
             int(item.FailureReason) if item.get("FailureReason") is not None else None)
            for item in response.get("FailedSOPSequence", [])]


def _stored(response: Dataset) -> list[str]:
    return [str(item.get("ReferencedSOPInstanceUID", "")) for item in response.get("ReferencedSOPSequence", [])]


def _warnings(response: Dataset) -> list[tuple[str, int | None]]:
    """Stored instances that carry a Warning Reason (0008,1196)."""
    return [(str(item.get("ReferencedSOPInstanceUID", "?")), int(item.WarningReason))
            for item in response.get("ReferencedSOPSequence", []) if item.get("WarningReason") is not None]


def _body(response: requests.Response) -> Dataset | None:
    """The Store Instances Response data set of an answer in DICOM JSON (whatever its Content-Type parameters),
    when the server sent one."""
    try:
        data = json.loads(response.content or b"null")
    except ValueError:
        return None
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return None
    try:
        return Dataset.from_json(data)
    except Exception:  # noqa: BLE001 -- an unreadable body only loses the per-instance detail
        return None


def _list(instances: list[tuple[str, int | None]]) -> str:
    return "; ".join(f"{uid}: {reason_text(code)}" for uid, code in instances)


def _describe(failed: list[tuple[str, int | None]], stored: list[str], count: int) -> str:
    """Each refused instance with its Failure Reason, then what was stored of the ``count`` sent."""
    text = f"{len(failed)} of {count} instance(s) refused: {_list(failed)}"
    return text + (f"; {len(stored)} of {count} instance(s) stored ({', '.join(stored)})" if stored else "")


def store(destination: Destination, study_instance_uid: str, datasets: Sequence[Dataset]) -> StowResult:
    """POST ``datasets`` to ``{url}/studies/{study_instance_uid}`` once and classify the answer (dicomweb-client
    encodes each data set with pydicom)."""
    return _post(destination, study_instance_uid, len(datasets),
                 lambda client: client.store_instances(list(datasets), study_instance_uid=study_instance_uid))


def store_files(destination: Destination, study_instance_uid: str, paths: Sequence[Path]) -> StowResult:
    """POST the stored Part 10 files themselves, byte for byte (preamble, File Meta Information, data set: UIDs
    and transfer syntax as received), to ``{url}/studies/{study_instance_uid}``, in requests of at most
    :data:`STOW_BATCH_BYTES` (one file more when a single file is larger). dicomweb-client writes the multipart
    body; its public ``store_instances`` would re-encode each data set with pydicom, so its multipart POST of
    encoded instances is used directly. Stops at the first request that does not succeed."""
    stored: list[str] = []
    notes: list[str] = []
    for batch in _batches(paths):
        result = _post(destination, study_instance_uid, len(batch), lambda client, batch=batch: _post_encoded(
            client, study_instance_uid, [path.read_bytes() for path in batch]))
        stored += result.stored
        if not result.ok:
            return StowResult(result.status, stored, result.failed, result.detail, result.permanent)
        notes += [result.detail] if result.detail else []
    return StowResult(200, stored, [], "; ".join(notes), False)


STOW_BATCH_BYTES = 64 * 1024 * 1024
"""The most file bytes one STOW-RS request of originals carries (the body is built in memory)."""


def _batches(paths: Sequence[Path]) -> list[list[Path]]:
    batches: list[list[Path]] = [[]]
    size = 0
    for path in paths:
        length = path.stat().st_size
        if batches[-1] and size + length > STOW_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += length
    return [batch for batch in batches if batch]


def _post_encoded(client: DICOMwebClient, study_instance_uid: str, parts: list[bytes]) -> Dataset:
    from dicomweb_client.web import _Transaction

    url = client._get_studies_url(_Transaction.STORE, study_instance_uid)  # noqa: SLF001
    return client._http_post_multipart_application_dicom(url, parts)  # noqa: SLF001


def _post(destination: Destination, study_instance_uid: str, count: int,
          send: Callable[[DICOMwebClient], Dataset]) -> StowResult:
    """One STOW-RS request of ``count`` instances made by ``send`` with a client for the destination; its answer
    classified. The answer is read from the HTTP response itself (a session hook keeps it): dicomweb-client
    parses a success body only when its Content-Type is exactly ``application/dicom+json`` (a ``charset``
    parameter made a 202 listing refused instances look like a plain success) and does not say whether the
    status was 200 or 202."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    assert destination.url is not None
    try:
        session = session_for(destination)
    except AuthError as exc:
        return StowResult(None, [], [], str(exc), True)
    answers: list[requests.Response] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: answers.append(response))
    client = DICOMwebClient(destination.url.rstrip("/"), session=session,
                            timeout=(destination.connect_timeout, destination.timeout))
    client.set_http_retry_params(retry=False)
    try:
        parsed = send(client)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        body = _body(exc.response) if exc.response is not None else None
        failed = _failures(body) if body is not None else []
        stored = _stored(body) if body is not None else []
        text = f"HTTP {status}" + (f": {_describe(failed, stored, count)}" if failed else _reason(exc.response))
        permanent = status is not None and 400 <= status < 500 and status not in TRANSIENT_HTTP
        return StowResult(status, stored, failed, text, permanent)
    except requests.RequestException as exc:
        return StowResult(None, [], [], _transport_detail(exc), False)
    response = answers[-1]
    body = _body(response)
    if body is None and len(parsed):  # an XML answer, which dicomweb-client reads
        body = parsed
    if body is None:
        if response.status_code == 202:
            return StowResult(202, [], [], "HTTP 202 without a readable Store Instances Response: some instances "
                              "were not stored and which is unknown", False, confirmed=False)
        return StowResult(response.status_code, [], [], "", False)
    failed, stored = _failures(body), _stored(body)
    if not failed:
        warned = _warnings(body)
        return StowResult(response.status_code, stored, [], f"warnings: {_list(warned)}" if warned else "", False)
    permanent = any(code is None or not is_transient_failure(code) for _, code in failed)
    return StowResult(response.status_code, stored, failed,
                      f"HTTP {response.status_code}: {_describe(failed, stored, count)}", permanent)


def _reason(response: requests.Response | None) -> str:
    if response is None:
        return ""
    text = (response.text or "").strip().replace("\n", " ")
    return f": {text[:200]}" if text and text not in {"{}", "{ }"} else (f" {response.reason}" if response.reason
                                                                       else "")


def send_stow(destination: Destination, paths: list[Path]) -> SendOutcome:
    """One delivery attempt of the files of one object kind; the outcome for the delivery queue."""
    from worker.pipeline.delivery import SendOutcome

    datasets = [pydicom.dcmread(path) for path in paths]
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(studies) != 1:
        return SendOutcome(ok=False, permanent=True, detail=f"result objects of {len(studies)} studies in one send")
    study = studies.pop()
    result = store(destination, study, datasets)
    if result.ok:
        return SendOutcome(ok=True, detail=f"{len(result.stored)} instance(s) stored by STOW-RS"
                           + (f"; {result.detail}" if result.detail else ""),
                           remote_id=f"{destination.url}/studies/{study}"[:255])
    return SendOutcome(ok=False, permanent=result.permanent, detail=result.detail[:2000])


def send_originals_stow(destination: Destination, study_instance_uid: str, paths: list[Path]) -> SendOutcome:
    """One forwarding attempt of a revision's originals (issue 16): the stored files by STOW-RS, unchanged."""
    from worker.pipeline.delivery import SendOutcome

    result = store_files(destination, study_instance_uid, paths)
    if result.ok:
        return SendOutcome(ok=True, detail=f"{len(paths)} original(s) stored by STOW-RS"
                           + (f"; {result.detail}" if result.detail else ""),
                           remote_id=f"{destination.url}/studies/{study_instance_uid}"[:255])
    return SendOutcome(ok=False, permanent=result.permanent, detail=result.detail[:2000])
