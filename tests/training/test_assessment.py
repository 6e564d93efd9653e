"""The assessment stage: partial labels are masked, never taught as absent; training scores exactly what the engine
scores; questions do not depend on the source dataset."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from model import protocol
from model.checkpoint import Assessment
from model.schema import Condition, LesionType
from training.assessment import (
    allowed_answers,
    answer_log_likelihoods,
    candidate_loss,
    encode_questions,
    make_batch,
    question_weights,
)
from training.records import Record

CONDITIONS = [Condition.DIABETIC_RETINOPATHY, Condition.DIABETIC_MACULAR_EDEMA, Condition.GLAUCOMA]
LESIONS = [LesionType.HAEMORRHAGE.value, protocol.ANY_LESION]


def record(dataset: str, **labels: Any) -> Record:
    return Record(image=Path(f"/nonexistent/{dataset}.jpg"), dataset=dataset, record_id=dataset, split="train",
                  **labels)


@pytest.fixture(scope="module")
def engine_and_questions() -> tuple[Any, list[Any]]:
    from model.engine import RetinalGPTEngine
    from model.presets import build_model

    torch.set_num_threads(1)
    model, tokenizer, metadata = build_model("tiny", seed=3)
    metadata.assessment = Assessment(conditions=CONDITIONS, lesions=LESIONS)
    engine = RetinalGPTEngine.from_model(model, tokenizer, metadata)
    questions = metadata.assessment.questions()
    sep = tokenizer.convert_tokens_to_ids(engine.template.sep)
    encoded = encode_questions(questions, lambda q: engine.encode(engine.template.prompt(q)),
                               lambda q, a: engine.continuation(engine.template.prompt(q), a), sep)
    return engine, encoded


def test_allowed_answers_follow_partial_labels() -> None:
    dr, dme, glaucoma = (protocol.condition_question(c) for c in CONDITIONS)
    haemorrhage, any_lesion = (protocol.lesion_question(k) for k in LESIONS)
    idrid = record("idrid", grades={Condition.DIABETIC_RETINOPATHY: 2, Condition.DIABETIC_MACULAR_EDEMA: 0})
    assert allowed_answers(idrid, dr) == {2}
    assert allowed_answers(idrid, dme) == {0}
    assert allowed_answers(idrid, glaucoma) is None  # not labelled by the dataset: masked, never "absent"
    assert allowed_answers(idrid, haemorrhage) is None
    npdr = record("oct", present={Condition.DIABETIC_RETINOPATHY: True, Condition.DIABETIC_MACULAR_EDEMA: True})
    assert allowed_answers(npdr, dr) == {1, 2, 3, 4}
    assert allowed_answers(npdr, dme) == {1, 2}
    codras = record("codras", lesions={LesionType.HAEMORRHAGE: True, LesionType.HARD_EXUDATE: False})
    assert allowed_answers(codras, haemorrhage) == {1}
    assert allowed_answers(codras, any_lesion) == {1}
    assert allowed_answers(record("none"), any_lesion) is None


def test_masked_question_does_not_change_the_loss() -> None:
    scores = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, float("-inf")]])
    allowed = torch.tensor([[False, True, False], [True, False, False]])
    weight = torch.tensor([1.0, 0.0])
    base = candidate_loss(scores, allowed, weight)
    altered = allowed.clone()
    altered[1] = torch.tensor([False, True, False])  # the unlabelled question's "answer" changed
    assert torch.equal(candidate_loss(scores, altered, weight), base)
    labelled_changed = allowed.clone()
    labelled_changed[0] = torch.tensor([True, False, False])
    assert not torch.equal(candidate_loss(scores, labelled_changed, weight), base)
    # a range label is the probability of the range
    ranged = torch.tensor([[False, True, True], [True, False, False]])
    expected = torch.logsumexp(scores[0], 0) - torch.logsumexp(scores[0, 1:], 0)
    assert torch.allclose(candidate_loss(scores, ranged, weight), expected)


def test_unlabelled_questions_get_no_rows(engine_and_questions: Any) -> None:
    _, encoded = engine_and_questions
    keys = [e.question.key for e in encoded]
    idrid = record("idrid", grades={Condition.DIABETIC_RETINOPATHY: 0})
    odir = record("odir", grades={Condition.GLAUCOMA: 1})
    targets = [{i: a for i, e in enumerate(encoded) if (a := allowed_answers(r, e.question)) is not None}
               for r in (idrid, odir)]
    batch = make_batch([0, 1], targets, encoded, question_weights(targets, len(encoded)), random.Random(0),
                       paraphrase_rate=0.0)
    asked = [(position, keys[q]) for position, q, _ in batch.rows]
    assert asked == [(0, "condition:diabetic_retinopathy"), (1, "condition:glaucoma")]
    assert question_weights(targets, len(encoded))[keys.index("condition:diabetic_macular_edema")] == 0.0


def test_training_scores_equal_the_engine_scores(engine_and_questions: Any, retina_rgb: Any) -> None:
    import numpy as np

    engine, encoded = engine_and_questions
    model = engine.model
    images = [retina_rgb, np.random.default_rng(0).integers(0, 255, (200, 240, 3), dtype=np.uint8)]
    with torch.no_grad():
        pixels = engine.pixel_values(images)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        tokens = hidden[model.config.vision_feature_layer][:, 1:]
    targets = [{i: frozenset({0}) for i in range(len(encoded))}, {0: frozenset({1}), 4: frozenset({0})}]
    batch = make_batch([0, 1], targets, encoded, [1.0] * len(encoded), random.Random(0), paraphrase_rate=0.0)
    with torch.no_grad():
        scores, _, _ = answer_log_likelihoods(model, tokens, batch, encoded, model.config.image_token_index,
                                              engine.pad_id)
    reference = engine.assessment_log_likelihoods(engine.image_features(images))
    for row, (position, q, _) in enumerate(batch.rows):
        expected = reference[position][encoded[q].question.key]
        assert scores[row, :len(expected)].tolist() == pytest.approx(expected, abs=1e-4)
