"""``retinalgpt api``: migrates, serves until SIGTERM, and a configuration error is one line."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import READ_TOKEN, sha
from tests.support.net import free_port

pytestmark = pytest.mark.xdist_group("api")
RETINALGPT = Path(sys.executable).with_name("retinalgpt")


def test_api_command_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "retinalgpt.toml"
    config.write_text(f'home = "{tmp_path}"\n[api]\nport = {port}\n'
                      f'tokens = [{{ name = "ehr", sha256 = "{sha(READ_TOKEN)}", role = "read" }}]\n')
    proc = subprocess.Popen([str(RETINALGPT), "api", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "retinalgpt api did not come up"
            time.sleep(0.3)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["database"] == "ok"  # migrated on start
        worklist = httpx.get(f"http://127.0.0.1:{port}/api/worklist", headers={"Authorization": f"Bearer {READ_TOKEN}"})
        assert worklist.json()["total"] == 0
        # what an EHR and a careless client send: MRNs in query strings, a token as a query parameter
        auth = {"Authorization": f"Bearer {READ_TOKEN}"}
        httpx.get(f"http://127.0.0.1:{port}/api/worklist?patient_id=MRN-7731-Q", headers=auth)
        httpx.get(f"http://127.0.0.1:{port}/fhir/r4/Patient?identifier=urn:x|MRN-7731-F", headers=auth)
        httpx.get(f"http://127.0.0.1:{port}/api/studies/1.2.3?access_token=TOKEN-IN-QUERY-99")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert READ_TOKEN not in output
    # our access log (issue 19): method, route template, status, duration; never a query string or path value
    for secret in ("MRN-7731-Q", "MRN-7731-F", "TOKEN-IN-QUERY-99", "?", "1.2.3"):
        assert secret not in output.split("API on http")[-1], output
    assert re.search(r"retinalgpt\.access: GET /api/worklist 200 [0-9.]+ ms", output), output
    assert re.search(r"retinalgpt\.access: GET /fhir/r4/Patient 200 [0-9.]+ ms", output), output
    assert re.search(r"retinalgpt\.access: GET /api/studies/\{study_instance_uid\} 401 [0-9.]+ ms", output), output


def test_api_command_reports_bad_configuration_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[api]\ntokens = [{ name = "x", sha256 = "not-a-digest" }]\n')
    run = subprocess.run([str(RETINALGPT), "api", "--config", str(config)], capture_output=True, text=True, check=False,
                         timeout=60)
    assert run.returncode == 1
    assert "api.tokens.0.sha256" in run.stderr and len(run.stderr.strip().splitlines()) == 1
