"""Loopback DICOMweb peers for destination tests (PS3.18 §10.5, STOW-RS), each a stdlib HTTP server in a thread:

* :class:`StowServer`: an origin server whose STOW-RS answer the test scripts (status, media type, which
  instances it refuses with which Failure Reason), for partial failures that Orthanc's plugin never answers
  (it refuses a whole request with 409);
* :class:`Gateway`: an HTTPS reverse proxy in front of Orthanc's DICOMweb, as a cloud API gateway is, that asks
  for a client certificate (mutual TLS) or forwards only requests carrying ``Authorization: Bearer <token>``.
  (Debian's Orthanc 1.10 crashes on its own HTTPS, civetweb against OpenSSL 3, so TLS ends in the gateway.)
"""

from __future__ import annotations

import email.message
import io
import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pydicom
from pydicom.dataset import Dataset


def parse_stow_body(content_type: str, body: bytes) -> list[Dataset]:
    """The instances of a ``multipart/related; type="application/dicom"`` request body (RFC 2046 §5.1.1: parts
    between ``CRLF--boundary`` delimiters, each a header block, a blank line and the Part 10 bytes)."""
    header = email.message.Message()
    header["Content-Type"] = content_type
    delimiter = b"\r\n--" + str(header.get_param("boundary")).encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)
    parts = [chunk.split(b"\r\n\r\n", 1)[1] for chunk in chunks[1:] if not chunk.startswith(b"--")]
    return [pydicom.dcmread(io.BytesIO(part), force=True) for part in parts]


def stow_response(stored: list[Dataset], failed: dict[str, int], retrieve_url: str,
                  warnings: dict[str, int] | None = None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) in DICOM JSON: Referenced SOP Sequence for the
    stored instances (with a Warning Reason (0008,1196) where ``warnings`` gives one), Failed SOP Sequence with a
    Failure Reason (0008,1197) for the others."""
    response = Dataset()
    response.RetrieveURL = retrieve_url
    response.ReferencedSOPSequence = []
    response.FailedSOPSequence = []
    for ds in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        if str(ds.SOPInstanceUID) in failed:
            item.FailureReason = failed[str(ds.SOPInstanceUID)]
            response.FailedSOPSequence.append(item)
        else:
            item.RetrieveURL = f"{retrieve_url}/instances/{ds.SOPInstanceUID}"
            if str(ds.SOPInstanceUID) in (warnings or {}):
                item.WarningReason = (warnings or {})[str(ds.SOPInstanceUID)]
            response.ReferencedSOPSequence.append(item)
    if not response.FailedSOPSequence:
        del response.FailedSOPSequence
    if not response.ReferencedSOPSequence:
        del response.ReferencedSOPSequence
    return response.to_json_dict()


Decide = Callable[[list[Dataset]], dict[str, int]]
"""The instances of one request → the SOP Instance UIDs refused, with their Failure Reason."""


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 run in a daemon thread; ``url`` is its base URL."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.peer = self  # type: ignore[attr-defined]
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- quiet: pytest shows failures
        return

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        chunks = []
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
        return b"".join(chunks)

    def answer(self, status: int, content: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


class StowServer(_Server):
    """``with StowServer() as origin:``: STOW-RS at ``{origin.url}/studies/{uid}``. Each request's instances are
    kept in ``origin.requests``; ``decide`` names the refused ones and ``warn`` (SOP Instance UID → Warning
    Reason) the ones stored with a warning; the answer is ``status`` (default: 200 when none is refused, else
    202, PS3.18 §10.5.3) with the response in DICOM JSON as ``content_type``, or ``body`` when that is set."""

    def __init__(self, decide: Decide | None = None, *, status: int | None = None,
                 content_type: str = "application/dicom+json") -> None:
        self.decide: Decide = decide or (lambda datasets: {})
        self.status = status
        self.content_type = content_type
        self.warn: dict[str, int] = {}
        self.body: bytes | None = None
        self.requests: list[list[Dataset]] = []
        super().__init__(_StowHandler, None)


class _StowHandler(_Handler):
    def do_POST(self) -> None:  # noqa: N802 -- http.server's naming
        origin: StowServer = self.server.peer  # type: ignore[attr-defined]
        datasets = parse_stow_body(self.headers["Content-Type"], self.body())
        origin.requests.append(datasets)
        failed = origin.decide(datasets)
        status = origin.status or (202 if failed else 200)
        content = origin.body if origin.body is not None else json.dumps(
            stow_response(datasets, failed, f"{origin.url}{self.path}", origin.warn)).encode()
        self.answer(status, content, origin.content_type)


class Gateway(_Server):
    """``with Gateway(upstream, tls=context, token=...) as gateway:``: a TLS-terminating reverse proxy, as cloud
    archives and hospital API gateways put in front of their DICOMweb service, forwarding each request to
    ``upstream`` (same path below it) and relaying the answer. ``tls`` decides what the client must present (a
    server context requiring client certificates makes it a mutual TLS endpoint); with ``token`` only requests
    whose Authorization header is ``Bearer <token>`` pass, others get 401 with a ``WWW-Authenticate: Bearer``
    challenge (RFC 6750 §3). ``seen`` holds the Authorization headers received."""

    def __init__(self, upstream: str, *, tls: ssl.SSLContext, token: str | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.token = token
        self.seen: list[str | None] = []
        self.client = httpx.Client(timeout=60)
        super().__init__(_GatewayHandler, tls)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.client.close()


class _GatewayHandler(_Handler):
    def _relay(self, method: str) -> None:
        gateway: Gateway = self.server.peer  # type: ignore[attr-defined]
        authorization = self.headers.get("Authorization")
        gateway.seen.append(authorization)
        body = self.body() if method == "POST" else None
        if gateway.token is not None and authorization != f"Bearer {gateway.token}":
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer error="invalid_token"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {name: value for name, value in self.headers.items()
                   if name.lower() in {"content-type", "accept"}}
        upstream = gateway.client.request(method, f"{gateway.upstream}{self.path}", content=body, headers=headers)
        self.answer(upstream.status_code, upstream.content, upstream.headers.get("Content-Type"))

    def do_GET(self) -> None:  # noqa: N802
        self._relay("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._relay("POST")
