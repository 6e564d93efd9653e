"""Configuration, database, Celery pipeline, admin CLI and HTTP API."""
