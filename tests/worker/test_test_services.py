"""The test suite's own service helpers (issue 19, item 13): a missing service skips a test locally and fails it
under ``REQUIRE_SERVICES=1`` (what .ci/run sets); each test process holds its own Redis DB index."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import redis_database

REPO = Path(__file__).resolve().parents[2]
PROBE = """
from tests.support.services import service_missing

def test_needs_a_service():
    service_missing("the probe service is not running")
"""


@pytest.mark.parametrize(("required", "outcome"), [("", "1 skipped"), ("1", "1 failed")])
def test_missing_service_skips_or_fails_when_required(tmp_path: Path, required: str, outcome: str) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "REQUIRE_SERVICES": required, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "0", "-q", "-rs",
                          str(probe), "--rootdir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert outcome in run.stdout, run.stdout + run.stderr
    assert "the probe service is not running" in run.stdout


CLAIM = """
from tests.support.services import redis_database
with redis_database() as url:
    print(url)
"""


def test_each_test_process_has_its_own_redis_database() -> None:
    """Not random.randint(8, 15): two processes (xdist workers, or another session on the machine) get
    different DB indexes while both hold one."""
    with redis_database() as mine:
        other = subprocess.run([sys.executable, "-c", CLAIM], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip().startswith("redis://127.0.0.1:6379/")
        assert other.stdout.strip() != mine
    with redis_database() as again:
        assert again == mine  # a process keeps its index for all its tests
