"""Fixtures for the DICOM node tests: a running listener on a free port with a temp storage root."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dicom_node.listener import Listener
from dicom_node.params import CallerRule, CompletionParams, ListenerParams
from tests.dicom_node.dicom_fixtures import MemorySink


@pytest.fixture
def start_listener(tmp_path) -> Iterator[Callable[..., tuple[Listener, MemorySink]]]:
    """Start a listener: ``listener, sink = start_listener(**ListenerParams overrides)``."""
    started: list[Listener] = []

    def start(completion: CompletionParams | None = None, sink: MemorySink | None = None, **overrides):
        params = {
            "ae_title": "RETINALGPT",
            "storage_root": tmp_path / "studies",
            "bind_address": "127.0.0.1",
            "port": 0,
            "allowed_callers": (CallerRule("CAMERA1", "127.0.0.1"), CallerRule("STORESCU")),
        } | overrides
        sink = sink or MemorySink()
        listener = Listener(ListenerParams(**params), completion or CompletionParams(stable_seconds=60,
                                                                                     max_wait_seconds=600), sink)
        listener.start()
        started.append(listener)
        return listener, sink

    yield start
    for listener in started:
        listener.stop()
