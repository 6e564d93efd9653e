"""Fixtures of the model runtime tests: one tiny RetinalGPT per session, single-threaded torch (the test machine
is shared; one intra-op thread avoids spin-wait contention)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    from model.presets import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny(tiny_tokenizer: Any) -> tuple[Any, Any, Any]:
    """(model, tokenizer, metadata) of the tiny preset, random weights, fp32."""
    from model.presets import build_model

    return build_model("tiny", seed=0, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Any, Any, Any]) -> Path:
    """The tiny preset saved as a model directory (fp32, so loaded logits equal the in-memory model's)."""
    from model.checkpoint import save_model_dir

    model, tokenizer, metadata = tiny
    return save_model_dir(tmp_path_factory.mktemp("tiny") / "model", model, tokenizer, metadata)
