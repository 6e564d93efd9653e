"""reporting imports only model.schema from the model package, never torch and never worker (DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import reporting, reporting.sr.sop, reporting.seg, reporting.key_image, reporting.pdf
import reporting.fhir.bundle, reporting.fhir.client
ours = {'torch', 'worker', 'training', 'dicom_node', 'model'}
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ours)
print(','.join(loaded))
"""


def test_reporting_imports_only_model_schema():
    run = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "model,model.schema"
