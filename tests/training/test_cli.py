"""``retinalgpt data build`` / ``train`` / ``evaluate``: outputs and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from worker.cli.app import app

runner = CliRunner()


def _generic_dataset(root: Path) -> None:
    root.mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 20 * i, dtype=np.uint8)).save(root / f"{i}.png")
        rows.append([f"{i}.png", "train" if i < 3 else "test", i % 2, i % 5])
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "split", "glaucoma", "diabetic_retinopathy"])
        writer.writerows(rows)


def test_data_build_writes_llava_json(tmp_path: Path) -> None:
    _generic_dataset(tmp_path / "mydata")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[data]\ndatasets = [{ kind = "generic", root = "mydata" }]\n[run]\noutput = "out"\n')
    result = runner.invoke(app, ["data", "build", str(recipe), "--out", str(tmp_path / "built"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["conversations"] == 3 and summary["images_per_source"] == {"mydata": 3}
    items = json.loads((tmp_path / "built" / "instructions.json").read_text())
    assert all(3 <= len(item["conversations"]) // 2 <= 6 for item in items)
    assert (tmp_path / "built" / "alignment.json").is_file()


def test_one_line_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1 and "does not exist" in result.output and len(result.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[stage2]\nepochs = -1\n[data]\ndatasets = []\ninstructions = "x.json"\n')
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 1 and "stage2.epochs" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--data", "nonsense"])
    assert result.exit_code == 1 and "KIND=DIR" in result.output
