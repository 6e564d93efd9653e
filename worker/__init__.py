"""Configuration, database, Celery pipeline, admin CLI and HTTP API."""

import dicom_node.codecs  # noqa: E402,F401 - every worker process decodes pixel data with permissive code only
