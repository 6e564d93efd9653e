"""A short vision + stage 1 + stage 2 run on a handful of shared images: the loss falls, the model directory
loads in the runtime engine and answers, and an interrupted run resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.config import TrainConfig

pytestmark = pytest.mark.shared_data


class Interrupt(Exception):
    pass


def _config(shared: Path, output: Path) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": {"preset": "tiny", "name": "test-tiny", "version": "t1"},
        "data": {"datasets": [{"kind": "palm_pm", "root": shared / "palm_pm"},
                              {"kind": "idrid_grading", "root": shared / "idrid_grading"}],
                 "max_records_per_dataset": 4, "max_turns": 3},
        "vision": {"epochs": 1, "batch_size": 4},
        "stage1": {"epochs": 1, "batch_size": 4, "learning_rate": 2e-3},
        "stage2": {"epochs": 3, "batch_size": 2, "learning_rate": 2e-3, "warmup_fraction": 0.0},
        "run": {"output": output, "cpu_threads": 1, "checkpoint_every": 2},
    })


def test_short_run_lowers_loss_resumes_and_answers(shared_fundus: Path, tmp_path: Path, retina_rgb: np.ndarray) -> None:
    from model.engine import EngineOptions, RetinalGPTEngine
    from training.trainer import Trainer

    config = _config(shared_fundus, tmp_path / "run")
    seen: list[tuple[str, int]] = []

    def stop_in_stage2(stage: str, step: int, total: int, loss: float) -> None:
        seen.append((stage, step))
        if stage == "stage2" and step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config, stop_in_stage2).run()
    assert ("vision", 1) in seen and ("stage1", 1) in seen
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.pt").is_file()

    resumed: list[tuple[str, int]] = []
    trainer = Trainer(config, lambda stage, step, total, loss: resumed.append((stage, step)))
    model_dir = trainer.run()
    assert resumed[0] == ("stage2", 3)  # continues after the checkpoint at step 2; vision and stage 1 are not redone
    assert {stage for stage, _ in resumed} == {"stage2"}
    losses = trainer.state.losses["stage2"]
    total = max(step for _, step in resumed)
    assert len(losses) == total
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) and trainer.state.losses["stage1"][-1] < trainer.state.losses["stage1"][0]
    assert (tmp_path / "run" / "loss_curves.png").stat().st_size > 1000

    engine = RetinalGPTEngine.load(model_dir, EngineOptions(device="cpu", max_new_tokens=24, cpu_threads=1))
    assert engine.metadata.name == "test-tiny" and engine.metadata.provenance["data"]["conversations"] > 0
    assert engine.metadata.answer_format == "canonical" and engine.constrain_answers  # stage 2 taught canonical answers
    answer = engine.ask(retina_rgb, "Which retinal diseases does this fundus photograph show, and at what grade?")
    assert isinstance(answer, str)
    (result,) = engine.analyze([retina_rgb])
    assert len(result.answers) == 4


def test_lora_stage2_merges_into_a_plain_model(shared_fundus: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from training.trainer import Trainer

    config = _config(shared_fundus, tmp_path / "lora")
    config.data.max_records_per_dataset = 2
    config.vision.enabled = False
    config.stage1.enabled = False
    config.stage2.lora = True
    config.stage2.epochs = 2
    trainer = Trainer(config)
    model_dir = trainer.run()
    losses = trainer.state.losses["stage2"]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in name for name in names)


def test_stage2_balance_reaches_the_sampler(shared_fundus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.trainer import Trainer

    config = _config(shared_fundus, tmp_path / "balanced")
    config.data.max_records_per_dataset = 2
    config.vision.enabled = False
    config.stage2.epochs = 1
    config.stage2.balance = "sqrt"
    seen: dict[int, object] = {}
    plain = Trainer._batches

    def spy(self: Trainer, examples: list, batch: int, count: int, strata: list[str] | None = None) -> list[list[int]]:
        seen[batch] = strata
        return plain(self, examples, batch, count, strata)

    monkeypatch.setattr(Trainer, "_batches", spy)
    Trainer(config).run()
    assert seen[config.stage1.batch_size] is None  # stage 1 keeps "none"
    strata = seen[config.stage2.batch_size]
    assert isinstance(strata, list) and strata and all("|" in s for s in strata)
    assert any(s.startswith("idrid_grading|Diabetic retinopathy: grade") for s in strata)
