"""A small FHIR R4 server for tests: transaction Bundles with conditional create / update on identifier.

Implements what the delivery needs from FHIR R4 §3.1.0.11 (transaction) and §3.1.0.4.3 / §3.1.0.8
(conditional update / create): ``POST`` with ``ifNoneExist``, ``PUT Type?identifier=system|value``,
``PUT Type/id``, fullUrl → reference rewriting, and ``GET Type?identifier=…`` / ``GET Type`` searches.
Failures and stalls can be injected (``fail_next``, ``stall_next`` seconds), an ``Authorization`` header
can be required, and the server can run on TLS (``tls``, e.g. requiring a client certificate: mutual TLS).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

Resource = dict[str, Any]


class FhirStore:
    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Resource]] = {}
        self.created = 0
        self.updated = 0
        self.transactions = 0
        self.lock = threading.Lock()

    def search(self, rtype: str, identifier: str) -> list[str]:
        system, _, value = unquote(identifier).partition("|")
        return [
            rid
            for rid, r in self.resources.get(rtype, {}).items()
            if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))
        ]

    def _put(self, rtype: str, rid: str, resource: Resource) -> str:
        existing = self.resources.setdefault(rtype, {}).get(rid)
        version = int(existing["meta"]["versionId"]) + 1 if existing else 1
        resource = dict(resource, id=rid, meta={"versionId": str(version)})
        self.resources[rtype][rid] = resource
        if existing:
            self.updated += 1
            return "200 OK"
        self.created += 1
        return "201 Created"

    def transaction(self, bundle: Resource) -> tuple[int, Resource]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            return 400, outcome("not a transaction Bundle")
        with self.lock:
            self.transactions += 1
            resolved: dict[str, str] = {}
            plan: list[tuple[str, str, Resource, str]] = []
            for entry in bundle.get("entry", []):
                request, resource = entry["request"], entry["resource"]
                rtype = resource["resourceType"]
                if request["method"] == "POST":
                    query = parse_qs(request.get("ifNoneExist", ""))
                    found = self.search(rtype, query["identifier"][0]) if "identifier" in query else []
                    if len(found) > 1:
                        return 412, outcome("ifNoneExist matched more than one resource")
                    rid, action = (found[0], "exists") if found else (uuid.uuid4().hex, "create")
                elif request["method"] == "PUT":
                    path = urlsplit(request["url"])
                    if path.query:
                        found = self.search(rtype, parse_qs(path.query)["identifier"][0])
                        if len(found) > 1:
                            return 412, outcome("conditional update matched more than one resource")
                        rid = found[0] if found else uuid.uuid4().hex
                    else:
                        rid = path.path.split("/", 1)[1]
                    action = "put"
                else:
                    return 400, outcome(f"method {request['method']} not supported")
                resolved[entry["fullUrl"]] = f"{rtype}/{rid}"
                plan.append((rtype, rid, resource, action))
            responses = []
            for rtype, rid, resource, action in plan:
                if action == "exists":
                    responses.append({"response": {"status": "200 OK", "location": f"{rtype}/{rid}"}})
                    continue
                status = self._put(rtype, rid, rewrite(resource, resolved))
                responses.append({"response": {"status": status, "location": f"{rtype}/{rid}"}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}

    def count(self, rtype: str | None = None) -> int:
        return sum(len(v) for k, v in self.resources.items() if rtype in (None, k))


def rewrite(value: Any, resolved: dict[str, str]) -> Any:
    """Replace references to bundle fullUrls by the resolved ``Type/id``."""
    if isinstance(value, dict):
        return {
            k: (resolved.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v, resolved))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [rewrite(v, resolved) for v in value]
    return value


def outcome(text: str) -> Resource:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
    }


class FhirTestServer:
    """The server on a loopback port, in a thread; use as a context manager."""

    def __init__(self, require_authorization: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.store = FhirStore()
        self.fail_next: deque[int] = deque()
        self.stall_next: deque[float] = deque()
        self.require_authorization = require_authorization
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _send(self, status: int, body: Resource, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                server.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if (
                    server.require_authorization
                    and self.headers.get("Authorization") != server.require_authorization
                ):
                    return self._send(401, outcome("authorization required"))
                if server.stall_next:
                    time.sleep(server.stall_next.popleft())
                if server.fail_next:
                    status = server.fail_next.popleft()
                    return self._send(status, outcome(f"injected failure {status}"), {"Retry-After": "0"})
                try:
                    bundle = json.loads(body)
                except ValueError:
                    return self._send(400, outcome("body is not JSON"))
                self._send(*server.store.transaction(bundle))

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                rtype = url.path.rstrip("/").rsplit("/", 1)[-1]
                query = parse_qs(url.query)
                with server.store.lock:
                    rows = server.store.resources.get(rtype, {})
                    ids = (
                        server.store.search(rtype, query["identifier"][0])
                        if "identifier" in query
                        else list(rows)
                    )
                    entries = [{"resource": rows[i]} for i in ids]
                self._send(
                    200,
                    {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries},
                )

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FhirTestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
