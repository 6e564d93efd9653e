"""Fixtures for the worker tests: a configuration with a temp home, and the DICOM test tools."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.services import postgres_database
from worker.config import Settings, load_settings


@pytest.fixture
def config_file(tmp_path) -> Callable[..., Path]:
    """Write a TOML configuration below tmp_path: ``config_file(port=..., stable_seconds=..., extra="...")``."""

    def write(port: int = 11112, stable_seconds: float = 1.0, extra: str = "") -> Path:
        path = tmp_path / "retinalgpt.toml"
        path.write_text(
            f'home = "{tmp_path / "home"}"\n'
            "[dicom]\n"
            'ae_title = "RETINALGPT"\n'
            'bind_address = "127.0.0.1"\n'
            f"port = {port}\n"
            f"stable_seconds = {stable_seconds}\n"
            'allowed_callers = [{ ae_title = "CAMERA1", host = "127.0.0.1" }, { ae_title = "RETINALGPT" }]\n'
            + extra
        )
        return path

    return write


@pytest.fixture
def settings_for(config_file) -> Callable[..., Settings]:
    def load(**kwargs) -> Settings:
        return load_settings(config_file(**kwargs))

    return load


@pytest.fixture
def free_tcp_port() -> int:
    """A loopback port free right now (for tests that restart a listener on the same port)."""
    return free_port()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database on loopback (trust auth, user postgres); skips when none is running."""
    with postgres_database("retinalgpt_test") as url:
        yield url
