"""Layering (DESIGN.md): dicom_node imports none of worker, model, training — and never torch; the worker's
ingest side (what the listener process loads) does not import torch either."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = (
    "import sys, {modules}; "
    "bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden})); "
    "print(bad); sys.exit(1 if bad else 0)"
)


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        ("dicom_node.listener, dicom_node.sender, dicom_node.completion, dicom_node.part10",
         {"worker", "model", "training", "reporting", "torch"}),
        ("worker.ingest, worker.cli.dicom, worker.cli.studies, worker.cli.db, worker.api.stow, worker.api.dicomweb",
         {"torch", "transformers"}),
    ],
)
def test_listener_side_imports(modules, forbidden):
    result = subprocess.run([sys.executable, "-c", PROBE.format(modules=modules, forbidden=sorted(forbidden))],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
