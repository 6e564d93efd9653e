"""Stratified sampling of the language stages (``balance = "sqrt"``): rare label combinations are drawn more
often, deterministically, and every micro-batch is still a batch of valid indices."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.sft import Example
from training.trainer import Trainer, balanced_weights, stratum


def _item(source: str, disease: str | None) -> dict:
    tasks, conversations = ["modality_quality"], [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    if disease is not None:
        tasks.append("disease_grade")
        conversations += [{"from": "human", "value": "q2"}, {"from": "gpt", "value": disease}]
    return {"source": source, "tasks": tasks, "conversations": conversations}


def test_stratum_is_source_and_disease_answer() -> None:
    assert stratum(_item("idrid_grading", "Diabetic retinopathy: grade 3.")) == "idrid_grading|Diabetic retinopathy: grade 3."
    assert stratum(_item("palm_pm", None)) == "palm_pm|"


def test_balanced_weights_are_inverse_square_roots_of_stratum_sizes() -> None:
    assert balanced_weights(["a", "a", "a", "a", "b"]) == pytest.approx([0.5, 0.5, 0.5, 0.5, 1.0])


def test_sqrt_balance_draws_the_rare_stratum_more_often(tmp_path: Path) -> None:
    config = {"data": {"instructions": tmp_path / "instructions.json"}, "run": {"output": tmp_path / "run"}}
    trainer = Trainer(TrainConfig.model_validate(config))
    examples = [Example([1] * (3 + i % 5), [1] * (3 + i % 5), i) for i in range(100)]
    strata = ["grade 0"] * 90 + ["grade 4"] * 10
    plain = trainer._batches(examples, 4, 250)
    balanced = trainer._batches(examples, 4, 250, strata)
    assert balanced == trainer._batches(examples, 4, 250, strata)  # seeded
    assert all(0 <= i < 100 for batch in balanced for i in batch)

    def rare_share(batches: list[list[int]]) -> float:
        drawn = Counter(strata[i] for batch in batches for i in batch)
        return drawn["grade 4"] / sum(drawn.values())

    assert rare_share(plain) == pytest.approx(0.10, abs=0.01)  # every item once per epoch
    assert rare_share(balanced) == pytest.approx(1 / (1 + 3), abs=0.05)  # √10 : √90 = 1 : 3
