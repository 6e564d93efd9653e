"""A site for model-version tests: its settings read from ``config`` (also named in ``RETINALGPT_CONFIG`` for the
CLI), the database migrated, and the bundled model registered twice — ``v1`` active and ``v2`` beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.registry import ModelRegistry
from worker.config import Settings, load_settings
from worker.db.migrate import upgrade
from worker.runtime import bundled_model


def two_version_site(config: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("RETINALGPT_CONFIG", str(config))
    settings = load_settings(config)
    upgrade(settings.database.url)
    registry = ModelRegistry(settings.model.registry)
    registry.register(bundled_model(), version="v1", activate=True)
    registry.register(bundled_model(), version="v2")
    return settings
