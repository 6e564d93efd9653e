"""Canonical-answer grammars (model.grammar) and constrained decoding in the engine: every canonical answer is
accepted prefix by prefix, the failure modes of free decoding are refused, and a random-weight model decoded
under the grammars writes answers that all parse."""

from __future__ import annotations

import itertools
import random
from typing import Any

import numpy as np
import pytest

from model import protocol
from model.engine import EngineOptions, RetinalGPTEngine, token_pieces
from model.grammar import MAX_BOXES_PER_TYPE, AnswerConstraint, AnswerGrammar
from model.protocol import ImageLabels, Task
from model.schema import LesionType, QualityGrade, max_grade


def _random_labels(rng: random.Random) -> ImageLabels:
    conditions = rng.sample(protocol.DISEASE_CONDITIONS, rng.randint(1, len(protocol.DISEASE_CONDITIONS)))
    features = rng.sample(protocol.VASCULAR_FEATURES, rng.randint(1, 12))
    lesions = []
    for _ in range(rng.randint(0, 6)):
        x0, y0 = rng.random(), rng.random()
        lesions.append((rng.choice(list(LesionType)), (x0, y0, rng.uniform(x0, 1.0), rng.uniform(y0, 1.0))))
    return ImageLabels(
        modality=rng.choice(protocol.MODALITIES),
        quality=rng.choice([None, *QualityGrade]),
        findings={c: rng.randint(0, max_grade(c)) for c in conditions},
        measurements={k: rng.uniform(-5.0, 500.0) for k in features},
        lesions=tuple(lesions),
    )


@pytest.mark.parametrize("seed", range(25))
def test_every_canonical_answer_and_each_of_its_prefixes_is_accepted(seed: int) -> None:
    labels = _random_labels(random.Random(seed))
    for task in Task:
        answer = " " + protocol.render_answer(task, labels)
        grammar = AnswerGrammar(task)
        assert grammar.complete(answer), answer
        assert all(grammar.viable(answer[:end]) for end in range(len(answer) + 1)), answer
        assert not grammar.complete(answer[:-1])
        assert protocol.parse_answer(task, answer).ok


@pytest.mark.parametrize(
    ("task", "text"),
    [
        (Task.DISEASE_GRADE, " Glaucoma: absent. Glaucoma"),  # the repetition that free decoding wrote
        (Task.DISEASE_GRADE, "Glaucoma: absent.\nGlaucoma: present."),  # a condition twice
        (Task.DISEASE_GRADE, "Cataract: absent.\nGlaucoma"),  # out of answer order
        (Task.DISEASE_GRADE, "Diabetic retinopathy: grade 5"),  # outside the ICDR scale
        (Task.MODALITY_QUALITY, "This is a colour fundus photograph. Image quality: great"),
        (Task.VASCULAR, "Fractal_dimension is 1.45x"),
        (Task.VASCULAR, "Fractal_dimension is 1.452\nFractal_dimension is"),
        (Task.LESIONS, "Haemorrhage: [0.1234, 0.2000, 0.0"),  # x1 < x0 whatever digits follow
        (Task.LESIONS, "Haemorrhage: [0.1234, 0.2000, 0.1300, 0.1999"),  # y1 < y0
        (Task.LESIONS, "Haemorrhage: [1.2"),  # not normalised
        (Task.LESIONS, "No lesions detected.\nHaemorrhage"),
    ],
)
def test_what_free_decoding_gets_wrong_is_refused(task: Task, text: str) -> None:
    assert not AnswerGrammar(task).viable(text)


def test_lesion_lines_hold_a_bounded_number_of_boxes() -> None:
    box = "[0.1000, 0.1000, 0.2000, 0.2000]"
    grammar = AnswerGrammar(Task.LESIONS)
    assert grammar.complete("Drusen: " + ", ".join([box] * MAX_BOXES_PER_TYPE) + ".")
    assert not grammar.viable("Drusen: " + ", ".join([box] * (MAX_BOXES_PER_TYPE + 1)))


def test_constraint_ends_only_a_complete_answer_at_the_separator() -> None:
    pieces = ["", " Glaucoma", ": absent", ".", "#", "##", "###", " Cataract"]
    stop = frozenset({6})
    constraint = AnswerConstraint(AnswerGrammar(Task.DISEASE_GRADE), pieces, stop, "###")
    assert not constraint.allows(6) and not constraint.allows(4)  # nothing said yet
    for token in (1, 2):
        assert constraint.allows(token)
        constraint.advance(token)
    assert not constraint.allows(6)  # "Glaucoma: absent" lacks its full stop
    assert not constraint.allows(7)  # no second line without a line break
    constraint.advance(3)
    assert constraint.allows(6) and constraint.allows(4) and constraint.allows(5)
    constraint.advance(5)  # "##": the separator is being written
    assert not constraint.finished and constraint.allows(4) and not constraint.allows(7)
    constraint.advance(4)
    assert constraint.finished and not constraint.allows(3)


@pytest.mark.parametrize("seed", range(10))
def test_constraint_reading_lines_once_agrees_with_the_grammar_on_the_whole_text(seed: int) -> None:
    """The constraint reads complete lines only once; at every step of a canonical answer (fed in pieces that
    may span line breaks) it must allow exactly the continuations the grammar allows on the whole text."""
    rng = random.Random(seed)
    labels = _random_labels(rng)
    for task in Task:
        answer = " " + protocol.render_answer(task, labels)
        cuts = sorted({0, len(answer), *rng.sample(range(1, len(answer)), min(len(answer) - 1, len(answer) // 3))})
        steps = [answer[a:b] for a, b in itertools.pairwise(cuts)]
        probes = ["\n", ".", "0", " is 1.000", "Glaucoma: absent.", "This is a", "]", ", [0.5000"]
        pieces = [*steps, *probes, "#"]
        grammar = AnswerGrammar(task)
        constraint = AnswerConstraint(grammar, pieces, frozenset({len(pieces)}), "#")
        for step, piece in enumerate(steps):
            for token in range(len(steps), len(pieces) - 1):
                assert constraint.allows(token) == grammar.viable(constraint.text + pieces[token]), (answer, step)
            assert constraint.allows(len(pieces) - 1) == grammar.complete(constraint.text)
            assert constraint.allows(step)
            constraint.advance(step)
        assert constraint.text == answer
        assert constraint.allows(len(pieces)) and constraint.allows(len(pieces) - 1)


def test_token_pieces_concatenate_to_the_decoded_text(tiny_tokenizer: Any) -> None:
    pieces = token_pieces(tiny_tokenizer)
    text = " " + protocol.render_answer(Task.LESIONS, ImageLabels(lesions=((LesionType.DRUSEN, (0.1, 0.2, 0.3, 0.4)),)))
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert "".join(pieces[i] for i in ids) == tiny_tokenizer.decode(ids) == text


def test_random_weights_decoded_under_the_grammars_answer_parseably(
    tiny: tuple[Any, Any, Any], retina_rgb: np.ndarray
) -> None:
    model, tokenizer, metadata = tiny
    assert metadata.answer_format == "free"
    images = [retina_rgb, np.random.default_rng(3).integers(0, 256, (200, 300, 3), dtype=np.uint8)]
    free = RetinalGPTEngine.from_model(model, tokenizer, metadata, EngineOptions(max_new_tokens=64))
    assert not free.constrain_answers
    assert not any(a.parsed for r in free.analyze(images) for a in r.answers)  # the random model babbles
    constrained = RetinalGPTEngine.from_model(
        model, tokenizer, metadata, EngineOptions(max_new_tokens=256, constrain_answers=True)
    )
    results = constrained.analyze(images)
    answers = [a for r in results for a in r.answers]
    assert len(answers) == 2 * len(Task) and all(a.parsed for a in answers), [a.error for a in answers]
    assert all(r.modality in protocol.MODALITIES and r.findings for r in results)
