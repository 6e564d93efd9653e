"""Request body size limit as a pure ASGI middleware (checked on Content-Length and on the streamed body)."""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]


class RequestSizeLimit:
    """Answer 413 to any request whose body exceeds ``max_bytes``; FHIR paths get an OperationOutcome. A body
    streamed without Content-Length is cut off at the limit: the app sees a client disconnect and its response
    is dropped."""

    def __init__(self, app: Any, max_bytes: int, *, upload_paths: tuple[str, ...] = (),
                 upload_max_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = upload_paths
        self.upload_max_bytes = upload_max_bytes

    def limit_for(self, scope: Scope) -> int:
        """``upload_max_bytes`` for a POST below one of ``upload_paths`` (STOW-RS, streamed to disk), else
        ``max_bytes``."""
        path = scope.get("path", "")
        if scope.get("method") == "POST" and any(path == p or path.startswith(p + "/") for p in self.upload_paths):
            return self.upload_max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(scope, send, limit)
            return
        seen = 0
        rejected = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    rejected = True
                    await self._reject(scope, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, scope: Scope, send: Any, limit: int) -> None:
        message = f"request body larger than {limit} bytes"
        if limit != self.max_bytes:
            message += "; nothing of it was stored"
        if scope["path"].startswith("/fhir/"):
            body = {"resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "too-long", "diagnostics": message}]}
            media = b"application/fhir+json"
        else:
            body, media = {"detail": message}, b"application/json"
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", media), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
