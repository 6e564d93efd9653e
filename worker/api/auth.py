"""Bearer-token authentication with ``read``, ``clinician``, ``admin`` and ``sender`` roles (RFC 6750).

``read`` may use every GET route; ``clinician`` may also sign off results (issue 17 item 1; the token's name is
the signing identity recorded in the SR, FHIR and the audit trail); ``admin`` may also operate the node and store
instances, but not sign; ``sender`` (a modality, router or PACS that pushes studies by DICOMweb STOW-RS) may only
store instances (``POST /dicomweb/studies``), and is the one thing ``read`` may not do. A sender's token
therefore cannot read results or patient data.

Tokens are configured as SHA-256 hex digests (``[[api.tokens]]``), so the configuration never holds a usable
secret; a presented token is hashed and compared in constant time. The review page keeps the token in an
HttpOnly, SameSite=Strict cookie set by its login form; requests that change something and authenticate by
cookie must also carry the ``X-Requested-With`` header, which a cross-site form cannot send. Tokens are never
logged and never accepted in a URL (URLs end up in access logs).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.api.context import ApiContext, Ctx
from worker.config import ApiToken

Role = Literal["read", "clinician", "admin", "sender"]
SESSION_COOKIE = "retinalgpt_session"
CSRF_HEADER = "X-Requested-With"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_GRANTS: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "clinician": frozenset({"read", "clinician"}),
    "admin": frozenset({"read", "admin", "sender"}),
    "sender": frozenset({"sender"}),
}
"""What each token role may do: signing is a clinician's act, not an operator's; storing is a sender's or an
administrator's, not a reader's."""


@dataclass(frozen=True)
class Principal:
    """Who made a request: the configured token's name and role."""

    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return role in _GRANTS[self.role]

    @property
    def actor(self) -> str:
        """The audit-trail actor name."""
        return f"api:{self.name}"


def token_digest(token: str) -> str:
    """The SHA-256 hex digest stored in configuration for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def principal_for(token: str, tokens: list[ApiToken]) -> Principal | None:
    """The principal of a presented token, or None. Every configured digest is compared (constant time)."""
    digest = token_digest(token)
    found: Principal | None = None
    for configured in tokens:
        if hmac.compare_digest(digest, configured.sha256):
            found = Principal(configured.name, configured.role)
    return found


class LoginRequired(HTTPException):
    """401 with a Bearer challenge (RFC 6750 §3)."""

    def __init__(self, detail: str) -> None:
        super().__init__(401, detail, headers={"WWW-Authenticate": 'Bearer realm="retinalgpt"'})


def presented_token(request: Request) -> tuple[str | None, bool]:
    """(token, came from cookie)."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


def authenticate(request: Request, ctx: ApiContext) -> Principal:
    token, from_cookie = presented_token(request)
    if token is None:
        raise LoginRequired("authentication required: send Authorization: Bearer <token>")
    principal = principal_for(token, ctx.settings.api.tokens)
    if principal is None:
        raise LoginRequired("invalid token")
    if from_cookie and request.method not in SAFE_METHODS and CSRF_HEADER.lower() not in request.headers:
        raise HTTPException(403, f"cookie-authenticated {request.method} needs the {CSRF_HEADER} header")
    return principal


BEARER = HTTPBearer(auto_error=False,
                    description="an API token from api.tokens (read, clinician, admin or sender role)")
"""Declares the scheme in the OpenAPI schema; :func:`authenticate` does the checking (header or cookie)."""


def require(role: Role) -> Callable[..., Principal]:
    """FastAPI dependency factory: the request's principal, which must hold ``role`` (403 otherwise)."""

    def dependency(request: Request, ctx: Ctx,
                   _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Principal:
        principal = authenticate(request, ctx)
        if not principal.may(role):
            raise HTTPException(403, f"this operation needs the {role} role")
        request.state.principal = principal
        return principal

    return dependency


require_read = require("read")
require_admin = require("admin")
require_clinician = require("clinician")
require_sender = require("sender")
Reader = Annotated[Principal, Depends(require_read)]
"""Handler parameter type: an authenticated principal with at least the read role."""
Admin = Annotated[Principal, Depends(require_admin)]
"""Handler parameter type: an authenticated principal with the admin role."""
Clinician = Annotated[Principal, Depends(require_clinician)]
"""Handler parameter type: an authenticated principal with the clinician role (may sign off results)."""
Sender = Annotated[Principal, Depends(require_sender)]
"""Handler parameter type: an authenticated principal allowed to store instances (sender or admin role)."""
