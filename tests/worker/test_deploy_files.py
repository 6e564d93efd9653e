"""The deployment files operators copy must match the product: the example configuration loads with the real
Settings, compose/Kubernetes manifests parse and every role command they run exists in the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from worker.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CLI = [sys.executable, "-c", "from worker.cli.app import main; main()"]


def test_example_production_config_is_valid() -> None:
    settings = load_settings(DEPLOY / "config" / "production.toml")
    assert settings.database.url.startswith("postgresql+psycopg://")
    assert settings.broker.url.startswith("redis://")
    assert {d.kind for d in settings.destinations} == {"dicom", "fhir"}
    result = subprocess.run([*CLI, "config", "check", "--config", str(DEPLOY / "config" / "production.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _role_commands() -> set[tuple[str, ...]]:
    commands: set[tuple[str, ...]] = set()
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    for service in compose["services"].values():
        if "command" in service and service.get("image", "").startswith("retinalgpt"):
            commands.add(tuple(service["command"]))
    for manifest in (DEPLOY / "kubernetes").glob("*.yaml"):
        for doc in yaml.safe_load_all(manifest.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []):
                commands.add(tuple(container.get("args", [])))
    for unit in (DEPLOY / "systemd").glob("*.service"):
        for line in unit.read_text().splitlines():
            found = re.match(r"ExecStart(?:Pre)?=\S+/retinalgpt (.+)$", line)
            if found:
                commands.add(tuple(found.group(1).replace("%i", "inference").split()))
    return commands


@pytest.mark.parametrize("command", sorted(_role_commands()))
def test_every_deployed_role_command_exists(command: tuple[str, ...]) -> None:
    words = [w for w in command if not w.startswith("-")][:2]
    result = subprocess.run([*CLI, *words[:1], *(words[1:] if words[0] in {"db"} else []), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    for option in (w for w in command if w.startswith("--")):
        assert option in result.stdout, f"{command}: option {option} unknown"
