"""``retinalgpt model …``, ``ask`` and ``chat`` through the real CLI (typer runner, real registry and model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from worker.cli.app import app


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "retinalgpt.toml"
    config.write_text(f'home = "{tmp_path / "var"}"\n[model]\ndevice = "cpu"\nmax_new_tokens = 8\n')
    monkeypatch.setenv("RETINALGPT_CONFIG", str(config))
    return tmp_path


def run(*args: str) -> tuple[int, str]:
    """Exit code and stdout (JSON, messages) — or stderr when the command failed."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def test_model_lifecycle_and_ask(env: Path, tiny_dir: Path, retina_rgb: np.ndarray) -> None:
    code, out = run("model", "list", "--json")
    assert code == 0 and json.loads(out) == []

    plain = env / "plain"
    shutil.copytree(tiny_dir, plain)
    (plain / "retinalgpt.json").unlink()
    code, out = run("model", "import", "--format", "hf-llava", str(plain), "--activate", "--json")
    assert code == 0, out
    first = json.loads(out)
    assert first["version"] == "v1" and first["active"] and first["device_uid"].startswith("2.25.")
    code, out = run("model", "import", "--format", "hf-llava", str(tiny_dir), "--version", "tuned")
    assert code == 0 and "registered tuned" in out

    code, out = run("model", "activate", "tuned")  # no signed case at all: the promotion gate cannot judge
    assert code == 1 and "cannot judge tuned" in out and "no sign-off table" in out and "--force" in out, out
    assert run("db", "upgrade")[0] == 0
    code, out = run("model", "activate", "tuned")
    assert code == 1 and "inconclusive: 0 signed studies" in out and "at least 20 signed images" in out, out
    code, out = run("model", "activate", "tuned", "--force")
    assert code == 0 and "forced past the promotion gate" in out and "active model version: tuned" in out, out
    code, out = run("model", "info", "--json")
    info = json.loads(out)
    assert code == 0 and info["version"] == "tuned" and info["image"]["image_tokens"] == 64
    code, out = run("model", "rollback")
    assert code == 0 and "v1" in out
    code, out = run("model", "list", "--json")
    assert [(v["version"], v["active"]) for v in json.loads(out)] == [("v1", True), ("tuned", False)]

    image = env / "fundus.png"
    Image.fromarray(retina_rgb[::4, ::4]).save(image)
    code, out = run("ask", str(image), "What is the modality of this image?", "--json")
    assert code == 0, out
    reply = json.loads(out)
    assert isinstance(reply["answer"], str) and reply["model"]["version"] == "v1"


def test_errors_are_one_line(env: Path, tiny_dir: Path) -> None:
    for args, message in [
        (("model", "activate", "v7"), "unknown model version"),
        (("model", "rollback"), "no earlier active version"),
        (("model", "import", str(tiny_dir), "--format", "llava-med-v0"), "--vision-tower"),
        (("model", "import", str(env / "nowhere"), "--format", "hf-llava"), "config.json is missing"),
        (("ask", str(env / "none.png"), "Why?"), "does not exist"),
        (("model", "info", "v3"), "unknown model version"),
    ]:
        code, out = run(*args)
        assert code == 1, (args, out)
        assert message in out and len(out.strip().splitlines()) == 1, out


def test_chat_needs_a_stored_study(env: Path) -> None:
    code, out = run("db", "upgrade")
    assert code == 0, out
    code, out = run("chat", "1.2.3.4", "--question", "Is it urgent?")
    assert code == 1 and "no study 1.2.3.4" in out


def test_import_with_activate_goes_through_the_promotion_gate(env: Path, tiny_dir: Path) -> None:
    """A site's first model is activated at import; a later ``import --activate`` is registered, then judged by
    the same gate as ``model activate`` (it used to replace the active model unjudged)."""
    code, out = run("model", "import", "--format", "hf-llava", str(tiny_dir), "--activate", "--json")
    assert code == 0 and json.loads(out)["active"], out
    code, out = run("model", "import", "--format", "hf-llava", str(tiny_dir), "--version", "candidate", "--activate")
    assert code == 1 and "cannot judge candidate against the active v1" in out, out
    code, out = run("model", "list", "--json")
    assert [(v["version"], v["active"]) for v in json.loads(out)] == [("v1", True), ("candidate", False)]
    assert run("db", "upgrade")[0] == 0
    code, out = run("model", "import", "--format", "hf-llava", str(tiny_dir), "--version", "forced", "--activate",
                    "--force", "--json")
    assert code == 0 and json.loads(out)["version"] == "forced" and json.loads(out)["active"], out
