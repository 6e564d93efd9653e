"""The HTTP API (``retinalgpt api``): FHIR R4 read/search, worklist, study chat, review page, health, metrics.

The API process never imports torch: chat questions go to the inference workers through Celery.
"""

from worker.api.app import create_app

__all__ = ["create_app"]
