"""``[model]`` settings reach the engine's options; a wrong value names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import ConfigError, load_settings
from worker.runtime import engine_options


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("on", True), ("off", False)])
def test_constrained_decoding_setting_reaches_the_engine(tmp_path: Path, value: str, expected: bool | None) -> None:
    settings = load_settings(None, home=tmp_path, model={"constrained_decoding": value, "max_new_tokens": 99})
    options = engine_options(settings)
    assert options.constrain_answers is expected and options.max_new_tokens == 99


def test_a_wrong_constrained_decoding_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.constrained_decoding"):
        load_settings(None, home=tmp_path, model={"constrained_decoding": "yes"})
