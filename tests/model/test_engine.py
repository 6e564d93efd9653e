"""The batched engine: batched output equals one-at-a-time output, agreement with transformers' own greedy
``generate``, likelihood scoring on a hand-made model, clear errors for broken checkpoints."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model import protocol
from model.checkpoint import CheckpointError
from model.engine import EngineError, EngineOptions, ModelImageResult, RetinalGPTEngine
from model.schema import Condition, ImageAnalysis, Measurement, Source


@pytest.fixture(scope="module")
def images(retina_rgb: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        retina_rgb,
        rng.integers(0, 256, (240, 320, 3), dtype=np.uint8),
        rng.integers(0, 256, (300, 200, 3), dtype=np.uint8),
        np.ascontiguousarray(retina_rgb[::4, ::4]),
    ]


@pytest.fixture(scope="module")
def engine(tiny: tuple[Any, Any, Any]) -> RetinalGPTEngine:
    model, tokenizer, metadata = tiny
    return RetinalGPTEngine.from_model(
        model, tokenizer, metadata, EngineOptions(max_new_tokens=12, batch_size=8)
    )


def _answers(results: list[ModelImageResult]) -> list[list[tuple[str, str]]]:
    return [[(a.task, a.answer) for a in r.answers] for r in results]


def test_batched_equals_one_at_a_time(engine: RetinalGPTEngine, images: list[np.ndarray]) -> None:
    batched = engine.analyze(images)
    single = [engine.analyze([image])[0] for image in images]
    assert _answers(batched) == _answers(single)
    assert len(batched) == len(images) and all(len(r.answers) == len(protocol.Task) for r in batched)
    assert any(a.answer for r in batched for a in r.answers)  # the random model does say something
    chunked = RetinalGPTEngine.from_model(
        engine.model, engine.tokenizer, engine.metadata, EngineOptions(max_new_tokens=12, batch_size=3)
    ).analyze(images)
    assert _answers(chunked) == _answers(batched)
    assert _answers(engine.analyze(images)) == _answers(batched)  # deterministic


def test_unparsable_answers_are_kept_and_flagged(engine: RetinalGPTEngine, images: list[np.ndarray]) -> None:
    result = engine.analyze(images[:1])[0]
    for answer in result.answers:
        parsed = protocol.parse_answer(answer.task, answer.answer)
        assert answer.parsed == parsed.ok and answer.error == parsed.error
        assert answer.question == protocol.question(protocol.Task(answer.task))


def test_engine_matches_transformers_generate(engine: RetinalGPTEngine, retina_rgb: np.ndarray) -> None:
    import torch

    question = protocol.question(protocol.Task.DISEASE_GRADE)
    ours = engine.ask(retina_rgb, question)
    ids = torch.tensor([engine.encode(engine.template.prompt(question))])
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=engine.pixel_values([retina_rgb]),
            do_sample=False,
            max_new_tokens=12,
        )
    text = engine.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert ours == engine.template.clean_answer(text)


def test_preprocessing_matches_the_clip_image_processor(
    engine: RetinalGPTEngine, retina_rgb: np.ndarray
) -> None:
    from transformers import CLIPImageProcessorPil

    size = engine.metadata.image.size
    reference = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image = np.ascontiguousarray(retina_rgb[:900, :1200])
    expected = reference(images=[image], return_tensors="np")["pixel_values"][0]
    ours = engine.pixel_values([image])[0].numpy()
    assert ours.shape == expected.shape == (3, size, size)
    assert np.abs(ours - expected).max() < 0.05


def test_ask_with_history_and_context(engine: RetinalGPTEngine, retina_rgb: np.ndarray) -> None:
    """The answer is the model's own greedy continuation of a prompt that holds the earlier turn and the
    context (checked against transformers' generate on that prompt), cleaned of the template's markers."""
    import torch

    history, context = [("What is this?", "A fundus photograph.")], "DR grade 2."
    answer = engine.ask(retina_rgb, "Is this eye healthy?", history=history, context=context)
    prompt = engine.template.prompt("Is this eye healthy?", history=history, context=context)
    assert "What is this?" in prompt and "A fundus photograph." in prompt and "DR grade 2." in prompt
    ids = torch.tensor([engine.encode(prompt)])
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    pixel_values=engine.pixel_values([retina_rgb]), do_sample=False,
                                    max_new_tokens=12)
    reference = engine.template.clean_answer(
        engine.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    assert answer == reference
    assert answer == answer.strip() and "###" not in answer and "<im_patch>" not in answer
    assert len(engine.tokenizer.encode(answer, add_special_tokens=False)) <= 12 + 1
    with pytest.raises(EngineError):
        engine.ask(retina_rgb, "   ")
    with pytest.raises(EngineError):
        engine.analyze([np.zeros((10, 10, 3), dtype=np.float32)])


def test_too_long_prompt_loses_history_then_context_from_the_end(engine: RetinalGPTEngine,
                                                                   retina_rgb: np.ndarray) -> None:
    """A study with many images writes a context longer than the model's window: the oldest exchange goes,
    then context lines from the end (the study-level lines come first); a question that cannot fit alone is
    refused with :class:`PromptTooLong`, never a model error."""
    from model.engine import PromptTooLong

    limit = engine.model.config.text_config.max_position_embeddings - engine.options.max_new_tokens
    context = "\n".join(["Referral: urgent."] + [f"Image {i}: diabetic retinopathy grade 2 (p=0.81), "
                                                  "glaucoma (p=0.12), cataract (p=0.05)." for i in range(60)])
    history = [("What is this?", "A fundus photograph.")]
    assert len(engine.encode(engine.template.prompt("Refer?", history=history, context=context))) > limit
    answer = engine.ask(retina_rgb, "Refer?", history=history, context=context)
    kept = context.splitlines()
    while len(engine.encode(engine.template.prompt("Refer?", context="\n".join(kept)))) > limit:
        kept = kept[:-1]
    assert len(kept) > 1 and kept[0] == "Referral: urgent."
    assert answer == engine.ask(retina_rgb, "Refer?", context="\n".join(kept))
    with pytest.raises(PromptTooLong, match="ask a shorter question"):
        engine.ask(retina_rgb, "Refer? " * limit)


def _hand_made(tiny: tuple[Any, Any, Any]) -> RetinalGPTEngine:
    """A tiny model whose layers write nothing to the residual stream (o_proj = down_proj = 0), so its next-token
    distribution depends only on the current token: a bigram model we can set by hand. All digit tokens share one
    embedding (what follows a digit is the same for every digit), and the logits of the digits 0…4 after the space
    before a grade are set to C[k]."""
    import torch

    model, tokenizer, metadata = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.language_model.norm.weight.fill_(1.0)
        embed = model.get_input_embeddings().weight
        digits = tokenizer.convert_tokens_to_ids([str(k) for k in range(10)])
        embed[digits] = embed[digits[0]].clone()
        space = tokenizer(" 1", add_special_tokens=False).input_ids[0]
        direction = embed[space] / embed[space].norm()
        width = embed.shape[1]
        for k in range(5):
            model.lm_head.weight[digits[k]] = GRADE_LOGITS[k] / math.sqrt(width) * direction
    return RetinalGPTEngine.from_model(model, tokenizer, metadata, EngineOptions(max_new_tokens=8))


GRADE_LOGITS = [0.5, 2.0, -1.0, 3.0, 0.0]  # ranks grade 3 > 1 > 0 > 4 > 2


def _bigram_log_likelihood(
    engine: RetinalGPTEngine, prompt: list[int], candidate: list[int], start: int
) -> float:
    import torch

    model = engine.model
    with torch.no_grad():
        total = 0.0
        for j in range(start, len(candidate)):
            previous = candidate[j - 1] if j else prompt[-1]
            hidden = model.model.language_model.norm(model.get_input_embeddings().weight[previous])
            total += float(torch.log_softmax(model.lm_head(hidden), dim=-1)[candidate[j]])
    return total


def test_likelihood_scoring_ranks_as_the_hand_made_model(
    tiny: tuple[Any, Any, Any], retina_rgb: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _hand_made(tiny)
    answer = "Diabetic retinopathy: grade 1.\nGlaucoma: present."

    canned_answers = {
        protocol.Task.MODALITY_QUALITY: "This is a colour fundus photograph. Image quality: good.",
        protocol.Task.DISEASE_GRADE: answer,
        protocol.Task.VASCULAR: "Fractal_dimension is 1.452",
        protocol.Task.LESIONS: "No lesions detected.",
    }
    by_prompt = {
        tuple(engine.encode(engine.template.prompt(protocol.question(t)))): a
        for t, a in canned_answers.items()
    }

    def canned(rows: list[list[int]], features: Any, row_image: Any = None, constraints: Any = None) -> list[str]:
        return [by_prompt[tuple(row)] for row in rows]

    prompt_text = engine.template.prompt(protocol.question(protocol.Task.DISEASE_GRADE))
    prompt = engine.encode(prompt_text)
    monkeypatch.setattr(engine, "_generate", canned)
    result = engine.analyze([retina_rgb])[0]
    dr = next(f for f in result.findings if f.condition == Condition.DIABETIC_RETINOPATHY)
    glaucoma = next(f for f in result.findings if f.condition == Condition.GLAUCOMA)
    referable = next(f for f in result.findings if f.condition == Condition.REFERABLE_DIABETIC_RETINOPATHY)

    assert dr.grade == 1 and dr.grade_probabilities is not None
    assert sum(dr.grade_probabilities) == pytest.approx(1.0, abs=1e-9)
    order = sorted(range(5), key=lambda k: -dr.grade_probabilities[k])
    assert order == sorted(range(5), key=lambda k: -GRADE_LOGITS[k]) == [3, 1, 0, 4, 2]
    designed = np.exp(GRADE_LOGITS) / np.exp(GRADE_LOGITS).sum()
    assert np.allclose(dr.grade_probabilities, designed, atol=2e-3)  # up to RMSNorm's epsilon
    dr_candidates = [
        engine.continuation(prompt_text, protocol.render_condition_line(Condition.DIABETIC_RETINOPATHY, g))
        for g in range(5)
    ]
    dr_shared = next(i for i, column in enumerate(zip(*dr_candidates)) if len(set(column)) > 1)
    dr_bigram = np.array([_bigram_log_likelihood(engine, prompt, c, dr_shared) for c in dr_candidates])
    assert np.allclose(dr.grade_probabilities, np.exp(dr_bigram) / np.exp(dr_bigram).sum(), atol=1e-5)
    assert dr.probability == pytest.approx(1 - dr.grade_probabilities[0])
    assert referable.grade == 0 and referable.probability == pytest.approx(sum(dr.grade_probabilities[2:]))

    candidates = [
        engine.continuation(
            prompt_text, "Diabetic retinopathy: grade 1.\n" + protocol.render_condition_line(Condition.GLAUCOMA, g)
        )
        for g in (0, 1)
    ]
    shared = next(i for i, (a, b) in enumerate(zip(*candidates)) if a != b)
    bigram = [_bigram_log_likelihood(engine, prompt, c, shared) for c in candidates]
    expected_glaucoma = np.exp(bigram) / np.exp(bigram).sum()
    assert glaucoma.grade == 1 and glaucoma.grade_probabilities is not None
    assert np.allclose(glaucoma.grade_probabilities, expected_glaucoma, atol=1e-5)
    assert glaucoma.probability == pytest.approx(glaucoma.grade_probabilities[1])
    assert result.lesions == [] and all(a.parsed for a in result.answers)
    assert [(m.key, m.value, m.source) for m in result.measurements] == [
        ("Fractal_dimension", 1.452, Source.MODEL)
    ]


def test_merge_into_an_image_analysis_flags_disagreements() -> None:
    result = ModelImageResult(
        measurements=[Measurement(key="Fractal_dimension", value=1.60, unit="1", source=Source.MODEL)],
    )
    image = ImageAnalysis(
        file_path="x.png",
        measurements=[Measurement(key="Fractal_dimension", value=1.45, unit="1", source=Source.MEASURED)],
    )
    merged = result.merge_into(image)
    assert [d.key for d in merged.disagreements] == ["Fractal_dimension"]
    assert len(merged.measurements) == 2 and image.disagreements == []


def test_load_errors_are_clear(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        RetinalGPTEngine.load(tmp_path / "absent")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "retinalgpt.json").unlink()
    with pytest.raises(CheckpointError, match="retinalgpt.json is missing"):
        RetinalGPTEngine.load(broken)
    shutil.rmtree(broken)
    shutil.copytree(tiny_dir, broken)
    meta = json.loads((broken / "retinalgpt.json").read_text())
    meta["image"]["size"] = 224
    (broken / "retinalgpt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="image_size"):
        RetinalGPTEngine.load(broken)
    shutil.rmtree(broken)
    shutil.copytree(tiny_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        RetinalGPTEngine.load(broken)
    shutil.rmtree(broken)
    shutil.copytree(tiny_dir, broken)
    meta = json.loads((broken / "retinalgpt.json").read_text())
    meta["template"]["image_token"] = "<pad>"
    (broken / "retinalgpt.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="image_token_index"):
        RetinalGPTEngine.load(broken)


def test_loaded_engine_equals_in_memory(
    tiny_dir: Path, engine: RetinalGPTEngine, images: list[np.ndarray]
) -> None:
    loaded = RetinalGPTEngine.load(tiny_dir, EngineOptions(device="cpu", max_new_tokens=12))
    assert loaded.identity.checkpoint_sha256 and loaded.identity.device_uid.startswith("2.25.")
    assert _answers(loaded.analyze(images[:2])) == _answers(engine.analyze(images[:2]))


def test_static_cache_decoding_equals_dynamic(engine: RetinalGPTEngine, images: list[np.ndarray]) -> None:
    """The GPU default (preallocated KV cache written in place) gives the same tokens as the growing cache."""
    static = RetinalGPTEngine.from_model(
        engine.model, engine.tokenizer, engine.metadata, EngineOptions(max_new_tokens=12, static_cache=True)
    )
    assert _answers(static.analyze(images)) == _answers(engine.analyze(images))
    together = _answers(static.analyze(images))
    assert _answers(static.analyze(images[1:2])) == together[1:2]
    assert static.last_timing is not None and static.last_timing.rows == len(protocol.Task)


@pytest.mark.parametrize("static_cache", [False, True])
def test_finished_rows_leave_the_batch_without_changing_the_others(
    engine: RetinalGPTEngine, images: list[np.ndarray], static_cache: bool
) -> None:
    """Rows that emit a stop token are dropped from the batch and its KV cache; every other row must continue
    exactly as it would have. Stop tokens are chosen from the unconstrained output so rows stop at different
    steps."""
    import torch

    tasks = list(protocol.Task)
    rows = [engine.encode(engine.template.prompt(protocol.question(t))) for _ in images for t in tasks]
    row_image = [i for i in range(len(images)) for _ in tasks]
    features = engine.image_features(images)
    forced = RetinalGPTEngine.from_model(
        engine.model,
        engine.tokenizer,
        engine.metadata,
        EngineOptions(force_new_tokens=12, static_cache=static_cache),
    )
    full = forced.generate_tokens(rows, features, row_image)
    stops = {full[r][2] for r in range(0, len(rows), 5)} | {full[1][6]}
    stopping = RetinalGPTEngine.from_model(
        engine.model,
        engine.tokenizer,
        engine.metadata,
        EngineOptions(max_new_tokens=12, static_cache=static_cache),
    )
    stopping.stop_ids = torch.tensor(sorted(stops))
    stopping._stop_set = frozenset(stops)
    got = stopping.generate_tokens(rows, features, row_image)
    expected = []
    for row in full:
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        expected.append(row[:end] + [engine.pad_id] * (len(row) - end))
    width = len(got[0])
    assert got == [row[:width] for row in expected]
    lengths = [sum(t != engine.pad_id for t in row) for row in got]
    assert min(lengths) < 12 and max(lengths) == width  # some rows stopped early, others ran on
    assert stopping.last_timing is not None and stopping.last_timing.final_rows < len(
        rows
    )  # and left the batch
