"""What every request handler needs: settings, database, Celery app and the public base URL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from worker.config import Settings
from worker.db import Database


@dataclass
class ApiContext:
    settings: Settings
    db: Database
    celery: Celery

    def base_url(self, request: Request) -> str:
        """``api.base_url`` when configured (behind a proxy), else the URL the client used."""
        configured = self.settings.api.base_url
        return (configured or str(request.base_url)).rstrip("/")

    def fhir_base(self, request: Request) -> str:
        return f"{self.base_url(request)}/fhir/r4"


def context(request: Request) -> ApiContext:
    """FastAPI dependency: the :class:`ApiContext` of the running app."""
    return request.app.state.context


Ctx = Annotated[ApiContext, Depends(context)]
"""Handler parameter type: the running app's :class:`ApiContext`."""
