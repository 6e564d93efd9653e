"""Grammars of the canonical protocol answers, for constrained greedy decoding.

A model trained on the canonical answers (:func:`model.protocol.render_answer`) almost always writes them, but
"almost" is not a product: one repeated line (``Glaucoma: absent Glaucoma: absent.``) makes an answer
unreadable and the finding is lost. With a grammar the engine picks, at every step, the most likely token that
keeps the answer a prefix of some canonical answer, and lets the answer end only where it is complete — the
technique of grammar-constrained decoding (Geng et al., EMNLP 2023, "Grammar-Constrained Decoding for
Structured NLP Tasks without Finetuning"). The grammar is what :mod:`model.protocol` renders:

``modality_quality``  ``This is a {modality}.`` optionally followed by `` Image quality: {good|usable|poor}.``
``disease_grade``     lines ``{Condition}: grade {0..max}.`` / ``{Condition}: absent|present.``, one per condition
                      at most, in :data:`~model.protocol.DISEASE_CONDITIONS` order, at least one
``vascular``          lines ``{Feature} is {value:.3f}`` in :data:`~model.protocol.VASCULAR_FEATURES` order
``lesions``           ``No lesions detected.`` or lines ``{Lesion}: [x0, y0, x1, y1], ….`` in lesion-type order,
                      coordinates ``0.dddd``/``1.0000`` with ``x0 ≤ x1`` and ``y0 ≤ y1``, at most
                      :data:`MAX_BOXES_PER_TYPE` boxes per type

Lines are separated by ``\\n``; the answer may begin with one space (the template puts one after the role).
Every answer the grammar completes is read back exactly by :func:`model.protocol.parse_answer` (tested).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex

from model import protocol
from model.schema import GRADE_SCALES, max_grade

MAX_BOXES_PER_TYPE = 8
"""Boxes one lesion line may hold: bounds the answer's length within the engine's token budget."""

_COORDINATE = r"(?:0\.\d{4}|1\.0000)"
_BOX = r"\[" + r", ".join([_COORDINATE] * 4) + r"\]"
_VALUE = r"-?\d{1,6}\.\d{3}"
_OPEN_BOX = re.compile(r"\[([^\[\]]*)$")

LineCheck = Callable[[str], bool]


@dataclass(frozen=True)
class _Line:
    """One kind of answer line: its pattern, the literal text every such line starts with (the condition,
    feature or lesion name: a cheap test that rules out most kinds before the pattern runs) and, optionally, a
    check the pattern cannot express."""

    pattern: regex.Pattern[str]
    literal: str
    check: LineCheck | None = None

    @classmethod
    def starting(cls, literal: str, rest: str, check: LineCheck | None = None) -> _Line:
        """The line ``literal`` (matched as written) followed by the pattern ``rest``: the literal the cheap
        test reads and the pattern's start are one text."""
        return cls(_compile(regex.escape(literal) + rest), literal, check)

    def matches(self, line: str, *, partial: bool) -> bool:
        if not (line.startswith(self.literal) or (partial and self.literal.startswith(line))):
            return False
        if self.pattern.fullmatch(line, partial=partial) is None:
            return False
        return self.check is None or self.check(line)


@dataclass(frozen=True)
class _OrderedLines:
    """Answers made of lines of the given kinds, each kind at most once, in order, at least one line."""

    kinds: tuple[_Line, ...]

    def kind_after(self, previous: int | None, line: str, *, partial: bool) -> int | None:
        """Index of the kind ``line`` is read as when the line before it was of kind ``previous`` (-1 before
        the first line), or None when it cannot be (the prefix of, when ``partial``) such a line."""
        if previous is None:
            return None
        return next(
            (k for k in range(previous + 1, len(self.kinds)) if self.kinds[k].matches(line, partial=partial)),
            None,
        )


Reading = tuple[int | None, ...]
"""Where each form of a grammar stands after some complete lines: the kind of the last line, -1 before any,
None when the lines are not the start of an answer of that form."""


class AnswerGrammar:
    """The canonical answers to one :class:`~model.protocol.Task`. :meth:`viable` tells whether a text can
    still grow into an answer, :meth:`complete` whether it is one. A decoder reads the complete lines once
    (:meth:`read`) and asks only about the line being written (:meth:`accepts`)."""

    def __init__(self, task: protocol.Task) -> None:
        self.task = protocol.Task(task)
        self._forms = _forms(self.task)

    def start(self) -> Reading:
        return tuple(-1 for _ in self._forms)

    def read(self, reading: Reading, lines: Sequence[str]) -> Reading:
        """``reading`` advanced over complete ``lines``."""
        for line in lines:
            reading = tuple(
                form.kind_after(previous, line, partial=False)
                for form, previous in zip(self._forms, reading, strict=True)
            )
        return reading

    def accepts(self, reading: Reading, line: str, *, partial: bool) -> bool:
        """Whether ``line`` can follow the lines read into ``reading`` as the last line of an answer (or of the
        prefix of one, when ``partial``)."""
        return any(
            form.kind_after(previous, line, partial=partial) is not None
            for form, previous in zip(self._forms, reading, strict=True)
        )

    def viable(self, text: str) -> bool:
        *complete, last = _body(text).split("\n")
        return self.accepts(self.read(self.start(), complete), last, partial=True)

    def complete(self, text: str) -> bool:
        *complete, last = _body(text).split("\n")
        return self.accepts(self.read(self.start(), complete), last, partial=False)


def _body(text: str) -> str:
    return text.removeprefix(" ")


def _compile(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


def _modality_quality() -> list[_OrderedLines]:
    modalities = "|".join(regex.escape(m) for m in protocol.MODALITIES)
    qualities = "|".join(regex.escape(w) for w in protocol.QUALITY_WORDS.values())
    line = _Line.starting("This is a ", rf"(?:{modalities})\.(?: Image quality: (?:{qualities})\.)?")
    return [_OrderedLines((line,))]


def _disease() -> list[_OrderedLines]:
    kinds = []
    for condition in protocol.DISEASE_CONDITIONS:
        if condition in GRADE_SCALES:
            value = rf"grade [0-{max_grade(condition)}]"
        else:
            value = "(?:absent|present)"
        kinds.append(_Line.starting(f"{protocol.CONDITION_NAMES[condition]}: ", rf"{value}\."))
    return [_OrderedLines(tuple(kinds))]


def _vascular() -> list[_OrderedLines]:
    return [_OrderedLines(tuple(_Line.starting(f"{key} is ", _VALUE) for key in protocol.VASCULAR_FEATURES))]


def _lesions() -> list[_OrderedLines]:
    boxes = rf"{_BOX}(?:, {_BOX}){{0,{MAX_BOXES_PER_TYPE - 1}}}"
    kinds = tuple(
        _Line.starting(f"{name}: ", rf"{boxes}\.", _boxes_ordered)
        for name in (protocol.LESION_NAMES[kind] for kind in protocol.LesionType)
    )
    return [_OrderedLines((_Line.starting("No lesions detected.", ""),)), _OrderedLines(kinds)]


def _boxes_ordered(line: str) -> bool:
    """``x0 ≤ x1`` and ``y0 ≤ y1`` still possible for the box being written (earlier boxes were checked when
    they were written, since every prefix of an answer is checked)."""
    open_box = _OPEN_BOX.search(line)
    closed = line.rfind("]")
    if open_box is None:
        text = line[line.rfind("[", 0, closed) + 1 : closed] if closed > 0 else ""
    else:
        text = open_box.group(1)
    numbers = [number.strip() for number in text.split(",")]
    if len(numbers) < 3:
        return True
    written = [float(n) for n in numbers[:2]]
    return all(
        _largest_completion(numbers[i + 2]) >= written[i] for i in range(min(2, len(numbers) - 2))
    )


def _largest_completion(partial: str) -> float:
    """The largest coordinate (``0.dddd`` or ``1.0000``) that starts with ``partial``."""
    if partial == "" or partial.startswith("1"):
        return 1.0
    digits = partial[2:] if len(partial) > 2 else ""
    return float("0." + digits.ljust(4, "9"))


_FORMS: dict[protocol.Task, Callable[[], list[_OrderedLines]]] = {
    protocol.Task.MODALITY_QUALITY: _modality_quality,
    protocol.Task.DISEASE_GRADE: _disease,
    protocol.Task.VASCULAR: _vascular,
    protocol.Task.LESIONS: _lesions,
}


@functools.cache
def _forms(task: protocol.Task) -> tuple[_OrderedLines, ...]:
    """The compiled forms of ``task``'s answers, built once per process (every decoded answer asks for them)."""
    return tuple(_FORMS[task]())


class AnswerConstraint:
    """Decoding state of one answer under an :class:`AnswerGrammar`.

    ``pieces[token]`` is the text a token adds; ``stop_tokens`` end an answer (the template separator, EOS).
    The separator's first character never occurs in a canonical answer, so text from it on is the separator
    being written: allowed only after a complete answer, and the answer is finished once the whole separator
    is there. Lines are read once, when they are complete, so a step costs the line being written, not the
    whole answer."""

    def __init__(self, grammar: AnswerGrammar, pieces: Sequence[str], stop_tokens: frozenset[int], sep: str) -> None:
        self.grammar = grammar
        self.pieces = pieces
        self.stop_tokens = stop_tokens
        self.sep = sep
        self.text = ""
        self.finished = False
        self._reading = grammar.start()
        self._lines_read = 0  # characters of the answer body in complete lines already read

    def allows(self, token: int) -> bool:
        if self.finished:
            return False
        if token in self.stop_tokens:
            return self._accepts(self.text, partial=False)
        candidate = self.text + self.pieces[token]
        marker = candidate.find(self.sep[0])
        if marker < 0:
            return self._accepts(candidate, partial=True)
        tail = candidate[marker:]
        if not (self.sep.startswith(tail) or tail.startswith(self.sep)):
            return False
        return self._accepts(candidate[:marker], partial=False)

    def advance(self, token: int) -> None:
        """Take ``token`` (one :meth:`allows` accepted)."""
        if token in self.stop_tokens:
            self.finished = True
            return
        self.text += self.pieces[token]
        self.finished = self.sep in self.text
        body = _body(self.text)
        end = body.rfind("\n") + 1
        if end > self._lines_read and self.sep[0] not in body:
            self._reading = self.grammar.read(self._reading, body[self._lines_read : end - 1].split("\n"))
            self._lines_read = end

    def _accepts(self, answer: str, *, partial: bool) -> bool:
        *complete, last = _body(answer)[self._lines_read :].split("\n")
        return self.grammar.accepts(self.grammar.read(self._reading, complete), last, partial=partial)
