"""Secrets and patient identifiers stay out of what the product prints and logs (issue 19, items 1 and 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from worker.logsetup import mask_url

CLI = [sys.executable, "-c", "from worker.cli.app import main; main()"]
SECRETS = {
    "RETINALGPT_DATABASE__URL": "postgresql+psycopg://rg:S3cretPW@db/rg",
    "RETINALGPT_BROKER__URL": "amqp://rg:BrokerPW@mq//",
    "RETINALGPT_BROKER__RESULT_BACKEND": "redis://:RedisPW@cache:6379/1",
}


def _config_with_fhir_destination(tmp_path: Path) -> Path:
    config = tmp_path / "retinalgpt.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[[destinations]]\nname = "ehr"\nkind = "fhir"\n'
                      'url = "https://ehr-user:EhrPW@ehr.example.org/fhir"\n')
    return config


def test_config_check_masks_every_url_password(tmp_path: Path) -> None:
    config = _config_with_fhir_destination(tmp_path)
    env = {**os.environ, **SECRETS}
    for extra in ([], ["--json"]):
        run = subprocess.run([*CLI, "config", "check", "--config", str(config), *extra], capture_output=True,
                             text=True, timeout=60, env=env)
        assert run.returncode == 0, run.stderr
        for secret in ("S3cretPW", "BrokerPW", "RedisPW", "EhrPW"):
            assert secret not in run.stdout + run.stderr
        assert "postgresql+psycopg://rg:***@db/rg" in run.stdout and "amqp://rg:***@mq//" in run.stdout
        assert "https://ehr-user:***@ehr.example.org/fhir" in run.stdout
    data = json.loads(run.stdout)
    assert data["database"]["url"] == "postgresql+psycopg://rg:***@db/rg"
    assert data["logging"] == {"phi": False} and data["audit"] == {"chat_text": "hash"}


def test_log_lines_and_tracebacks_mask_url_passwords() -> None:
    code = """
import logging
from worker import logsetup
logsetup.configure()
log = logging.getLogger("probe")
log.error("cannot connect to %s", "postgresql+psycopg://rg:S3cretPW@db:5432/rg")
try:
    raise ConnectionError("amqp://rg:BrokerPW@mq:5672// refused the connection")
except ConnectionError:
    log.exception("broker down")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "S3cretPW" not in run.stderr and "BrokerPW" not in run.stderr
    assert "postgresql+psycopg://rg:***@db:5432/rg" in run.stderr and "amqp://rg:***@mq:5672//" in run.stderr
    assert "Traceback" in run.stderr  # the traceback itself is kept, only the password goes


def test_mask_url_keeps_what_has_no_password() -> None:
    assert mask_url("sqlite:////var/lib/retinalgpt/retinalgpt.sqlite") == "sqlite:////var/lib/retinalgpt/retinalgpt.sqlite"
    assert mask_url("redis://cache:6379/0 and amqp://guest@mq//") == "redis://cache:6379/0 and amqp://guest@mq//"
    assert mask_url("two: http://a:x@h1/ http://b:y@h2/") == "two: http://a:***@h1/ http://b:***@h2/"


REDACTION = """
import logging, sys
from worker import logsetup
logsetup.configure()
logsetup.apply("INFO", phi=sys.argv[1] == "phi")
logsetup.remember_patient("PAT-90210", "Doe^Jane^Quinn", "19500102")
log = logging.getLogger("reporting.fhir.client")
log.warning("FHIR delivery failed permanently: HTTP 422: Patient PAT-90210 (Doe^Jane^Quinn, born 1950-01-02)")
log.warning("echo: Jane Doe 19500102")
"""


def test_remembered_patient_identifiers_are_redacted_from_any_log_line() -> None:
    """Second line of defence (issue 19): text we do not write ourselves -- here a FHIR server's outcome echoing
    the Patient -- loses the identifiers of the patients this process handles, unless logging.phi is on."""
    hidden = subprocess.run([sys.executable, "-c", REDACTION, "no"], capture_output=True, text=True, timeout=60)
    assert hidden.returncode == 0, hidden.stderr
    for identifier in ("PAT-90210", "Doe", "Jane", "Quinn", "19500102", "1950-01-02"):
        assert identifier not in hidden.stderr, hidden.stderr
    assert hidden.stderr.count("[PHI]") >= 6 and "HTTP 422: Patient [PHI]" in hidden.stderr
    shown = subprocess.run([sys.executable, "-c", REDACTION, "phi"], capture_output=True, text=True, timeout=60)
    assert "Patient PAT-90210 (Doe^Jane^Quinn, born 1950-01-02)" in shown.stderr and "[PHI]" not in shown.stderr


def test_redaction_takes_whole_words_and_spares_uids() -> None:
    code = """
from worker import logsetup
logsetup.remember_patient("123", "Doe^Jane", "19500102")
for text in ("study 1.2.123.4 took 123 ms", "Doe^Jane Doesnt Jane.", "born 1950-01-02, 19500102."):
    print(logsetup.redact_phi(text))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines() == ["study 1.2.123.4 took [PHI] ms", "[PHI] Doesnt [PHI].", "born [PHI], [PHI]."]
