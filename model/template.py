"""Conversation templates: how questions, the image and earlier answers become the prompt, and how the generated
text becomes the answer.

Both templates below are LLaVA's "SINGLE separator" conversation (``Conversation.get_prompt`` with
``SeparatorStyle.SINGLE`` in the LLaVA v0 / LLaVA-Med v1.0 code): the system message and the separator, then per
message ``role + ": " + message + sep``, or the bare ``role + ":"`` for an empty message.

:data:`NATIVE_TEMPLATE`
    Ours (models built and trained here): the image block before the first question, and the prompt opens the
    assistant's turn, ``{system}###Human: <image>\\n{q1}###Assistant: {a1}###Human: {q2}###Assistant:``.
:data:`LLAVA_MED_SIMPLE`
    The LLaVA-Med v1.0 ``conv_templates["simple"]`` the RetinalGPT authors' inference scripts use
    (``run_retinalGPT_simple.py``, ``run_retinalGPT.py``): two few-shot turns after the system message, the image
    after the question (``{question}\\n<im_start><im_patch>…<im_end>``) and **no** opened assistant turn — the
    prompt ends with the human turn's separator, so the model writes the role itself (``Assistant: …``), which the
    cleaning rule strips. Imported ``llava-med-v0`` checkpoints get it (docs/model.md cites the source).

Interface (the engine and training use only this):

* :meth:`ConversationTemplate.prompt` ``(question, history, context)`` — the text to generate after;
* :meth:`ConversationTemplate.clean_answer` ``(generated)`` — the answer in the decoded new tokens;
* :meth:`ConversationTemplate.answer_complete` ``(generated)`` — whether more tokens can still change that answer
  (so decoding may stop);
* :attr:`ConversationTemplate.continuation_prefix` — what the model writes between the prompt and the answer
  proper (likelihood scoring scores ``continuation_prefix + answer``);
* :meth:`ConversationTemplate.segments` — ``(text, is_target)`` pieces for training loss masking;
* :meth:`~ConversationTemplate.to_dict` / :meth:`~ConversationTemplate.from_dict` — the ``template`` object of
  ``retinalgpt.json``, where every string can be overridden.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

IMAGE_TOKEN = "<image>"
"""The image placeholder of native models; the engine expands it to the image's tokens."""

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""The system message of LLaVA v0's ``conv_v1_2`` / ``simple_conv`` (LLaVA-Med v1.0 ``llava/conversation.py``)."""

IMAGE_POSITIONS = ("before", "after")


class TemplateError(ValueError):
    """A conversation template (e.g. the ``template`` object of ``retinalgpt.json``) is invalid."""


@dataclass(frozen=True)
class ConversationTemplate:
    """A SINGLE-separator conversation; every field is stored in ``retinalgpt.json`` and may be overridden there.

    ``few_shot``: ``(role, message)`` turns rendered after the system message, before the conversation.
    ``open_assistant``: the prompt ends with ``"{roles[1]}:"`` (native) or right after the human turn's separator.
    ``continuation_prefix``: the text between the end of the prompt and the answer as the model writes it (``" "``
    after an opened ``Assistant:``; ``"Assistant: "`` when the model opens the turn itself); earlier answers are
    rendered with it, and likelihood scoring scores ``continuation_prefix + answer``.
    ``strip_prefixes``: the cleaning rule strips surrounding whitespace and these prefixes from the front of the
    generated text, repeatedly, then cuts at the first ``sep``.
    ``context_in_system``: a study's stored results (chat) are appended to the system message; off for imported
    models, whose published prompt has no place for them.
    ``image_token`` is the placeholder the engine expands to the image's tokens; ``image_prefix`` / ``image_suffix``
    wrap it (``<im_start>`` / ``<im_end>`` for checkpoints trained with ``mm_use_im_start_end``); ``image_position``
    puts the image block before the first question or after it.
    """

    name: str = "llava_v0"
    system: str = SYSTEM
    roles: tuple[str, str] = ("Human", "Assistant")
    sep: str = "###"
    few_shot: tuple[tuple[str, str], ...] = ()
    open_assistant: bool = True
    continuation_prefix: str = " "
    strip_prefixes: tuple[str, ...] = ()
    context_in_system: bool = True
    image_token: str = IMAGE_TOKEN
    image_prefix: str = ""
    image_suffix: str = ""
    image_position: str = "before"

    def __post_init__(self) -> None:
        if not self.sep:
            raise TemplateError("template sep must not be empty")
        if self.image_position not in IMAGE_POSITIONS:
            raise TemplateError(
                f"template image_position {self.image_position!r} is not one of {', '.join(IMAGE_POSITIONS)}"
            )
        if not self.image_token:
            raise TemplateError("template image_token must not be empty")

    # prompt ---------------------------------------------------------------------------------------------------

    def image_block(self) -> str:
        return f"{self.image_prefix}{self.image_token}{self.image_suffix}"

    def _human(self, question: str, with_image: bool) -> str:
        question = question.strip()
        if not with_image:
            return question
        if self.image_position == "after":
            return f"{question}\n{self.image_block()}"
        return f"{self.image_block()}\n{question}"

    @staticmethod
    def _message(role: str, message: str, sep: str) -> str:
        return f"{role}: {message}{sep}" if message else f"{role}:"

    def segments(
        self, turns: Sequence[tuple[str, str | None]], context: str | None = None, with_image: bool = True
    ) -> list[tuple[str, bool]]:
        """The conversation as ``(text, is_target)`` pieces; concatenated they are the full text. Targets are the
        assistant answers as the model writes them (``continuation_prefix + answer + sep``; train on those only).
        A last turn whose answer is None ends with the generation prompt. An empty earlier answer is rendered as
        LLaVA renders an empty message: the bare role."""
        system = f"{self.system}\n{context}" if context and self.context_in_system else self.system
        text = system + self.sep + "".join(self._message(r, m, self.sep) for r, m in self.few_shot)
        pieces: list[tuple[str, bool]] = []
        opened = f"{self.roles[1]}:" if self.open_assistant else ""
        for index, (human, answer) in enumerate(turns):
            text += self._message(self.roles[0], self._human(human, with_image and index == 0), self.sep)
            text += opened
            if answer is None:
                if index != len(turns) - 1:
                    raise ValueError("only the last turn may be unanswered")
                break
            if not answer:
                text += "" if self.open_assistant else f"{self.roles[1]}:"
                continue
            pieces.append((text, False))
            pieces.append((f"{self.continuation_prefix}{answer}{self.sep}", True))
            text = ""
        if text:
            pieces.append((text, False))
        return pieces

    def prompt(
        self,
        question_text: str,
        history: Sequence[tuple[str, str]] = (),
        context: str | None = None,
        with_image: bool = True,
    ) -> str:
        """The prompt for ``question_text`` after ``history`` (earlier question / cleaned answer pairs; the image
        goes with the first question); ``context`` (e.g. a study's stored results) is appended to the system
        message when :attr:`context_in_system`."""
        turns: list[tuple[str, str | None]] = [*history, (question_text, None)]
        return "".join(text for text, _ in self.segments(turns, context=context, with_image=with_image))

    # answer ---------------------------------------------------------------------------------------------------

    def _strip_front(self, generated: str) -> str:
        """``generated`` with surrounding whitespace stripped and :attr:`strip_prefixes` removed from its front, over
        and over until nothing changes (the published cleaning loop)."""
        text = generated
        while True:
            length = len(text)
            text = text.strip()
            for prefix in self.strip_prefixes:
                if text.startswith(prefix):
                    text = text[len(prefix) :].strip()
            if len(text) == length:
                return text

    def clean_answer(self, generated: str) -> str:
        """The answer in the decoded new tokens: front cleaned (:meth:`_strip_front`), cut at the first separator,
        stripped."""
        return self._strip_front(generated).split(self.sep, 1)[0].strip()

    def answer_complete(self, generated: str) -> bool:
        """True when no further text can change :meth:`clean_answer` — a separator follows the cleaned front."""
        return self.sep in self._strip_front(generated)

    @property
    def separator_ends_answer(self) -> bool:
        """Whether the first separator the model writes always ends the answer (no cleaning prefix shares a
        character with it); otherwise a separator at the start may be cleaned away and decoding must check the
        text (:meth:`answer_complete`)."""
        return not any(set(prefix) & set(self.sep) for prefix in self.strip_prefixes)

    # storage --------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "system": self.system,
            "roles": list(self.roles),
            "sep": self.sep,
            "few_shot": [list(turn) for turn in self.few_shot],
            "open_assistant": self.open_assistant,
            "continuation_prefix": self.continuation_prefix,
            "strip_prefixes": list(self.strip_prefixes),
            "context_in_system": self.context_in_system,
            "image_token": self.image_token,
            "image_prefix": self.image_prefix,
            "image_suffix": self.image_suffix,
            "image_position": self.image_position,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversationTemplate:
        """The template stored as ``data``; keys it lacks keep the native defaults (files written before a key
        existed). :class:`TemplateError` names an unknown key or a value of the wrong type."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TemplateError(f"unknown template key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(cls, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TemplateError(f"template {key} must be true or false, not {value!r}")
                values[key] = value
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise TemplateError(f"template {key} must be a string, not {value!r}")
                values[key] = value
            elif key == "roles":
                values[key] = _strings(key, value, length=2)
            elif key == "strip_prefixes":
                values[key] = _strings(key, value)
            else:  # few_shot
                if not isinstance(value, list | tuple):
                    raise TemplateError(f"template few_shot must be a list of [role, message] pairs, not {value!r}")
                values[key] = tuple(_strings("few_shot turn", turn, length=2) for turn in value)
        return cls(**values)


def _strings(key: str, value: Any, length: int | None = None) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TemplateError(f"template {key} must be a list of strings, not {value!r}")
    if length is not None and len(value) != length:
        raise TemplateError(f"template {key} must hold {length} strings, not {len(value)}")
    return tuple(value)


NATIVE_TEMPLATE = ConversationTemplate()
"""Models built and trained here (the bundled model): native placement, opened assistant turn."""

LLAVA_MED_SIMPLE = ConversationTemplate(
    name="llava_med_simple",
    system=SYSTEM,
    roles=("Human", "Assistant"),
    sep="###",
    few_shot=(("Human", "Hi!"), ("Assistant", "Hi there!  How can I help you today?\n")),
    open_assistant=False,
    continuation_prefix="Assistant: ",
    strip_prefixes=("###", "Assistant:", "Response:"),
    context_in_system=False,
    image_token="<im_patch>",
    image_prefix="<im_start>",
    image_suffix="<im_end>",
    image_position="after",
)
"""LLaVA-Med v1.0 ``conv_templates["simple"]`` as the RetinalGPT authors' scripts prompt with it (strings from
microsoft/LLaVA-Med ``llava/conversation.py``, ``simple_conv``; two spaces after "there!"); the image block is
``<im_start><im_patch><im_end>``, or :func:`llava_med_simple` without start/end tokens."""


def llava_med_simple(use_im_start_end: bool) -> ConversationTemplate:
    """:data:`LLAVA_MED_SIMPLE` for a checkpoint with or without ``mm_use_im_start_end`` (patches only)."""
    if use_im_start_end:
        return LLAVA_MED_SIMPLE
    return replace(LLAVA_MED_SIMPLE, image_prefix="", image_suffix="")
