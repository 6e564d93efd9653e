"""The settings added for issue 18 (admission, instance size, time limits, image limits): each reaches its
component, and a wrong value is one line naming the key, in ``load_settings`` and in ``retinalgpt config check``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.config import ConfigError, load_settings
from worker.dicom_params import listener_params
from worker.pipeline.sources import decode_limits

BAD = [
    ("dicom", "max_connections_per_host", "0", "dicom.max_connections_per_host"),
    ("dicom", "max_negotiating_connections", "0", "dicom.max_negotiating_connections"),
    ("dicom", "max_instance_mb", "0", "dicom.max_instance_mb"),
    ("dicom", "max_instance_mb", "5000", "dicom.max_instance_mb"),
    ("pipeline", "analysis_time_limit_seconds", "0", "pipeline.analysis_time_limit_seconds"),
    ("pipeline", "delivery_time_limit_seconds", "-1", "pipeline.delivery_time_limit_seconds"),
    ("analysis", "max_image_pixels", "10", "analysis.max_image_pixels"),
    ("analysis", "decode_size", "512", "analysis.decode_size must be >= analysis.working_size"),
]


@pytest.mark.parametrize(("section", "key", "value", "message"), BAD)
def test_a_wrong_value_names_the_key(tmp_path: Path, section: str, key: str, value: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'home = "{tmp_path}"\n[{section}]\n{key} = {value}\n')
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(config)


def test_config_check_reports_it_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dicom]\nmax_instance_mb = 0\n")
    run = subprocess.run([sys.executable, "-c", "from worker.cli.app import main; main()", "config", "check",
                          "--config", str(config)], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1
    assert "dicom.max_instance_mb" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_values_reach_their_components(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text(f'home = "{tmp_path}"\n'
                      '[dicom]\nmax_connections_per_host = 3\nmax_negotiating_connections = 5\nmax_instance_mb = 1.5\n'
                      'allowed_callers = [{ ae_title = "CAM", host = "10.0.0.7" }, { ae_title = "PACS" }]\n'
                      "[analysis]\nmax_image_pixels = 2000000\ndecode_size = 1024\n")
    settings = load_settings(config)
    params = listener_params(settings)
    assert (params.max_connections_per_host, params.max_negotiating_connections) == (3, 5)
    assert params.max_instance_bytes == 1_572_864 and params.trusted_hosts == frozenset({"10.0.0.7"})
    limits = decode_limits(settings)
    assert (limits.max_pixels, limits.max_side) == (2_000_000, 1024)
