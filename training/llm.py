"""Optional LLM question writer: an OpenAI-compatible chat endpoint rephrases the generated questions.

The paper wrote its conversations with a paid LLM API. Here the deterministic generator stays the source of
truth: the endpoint only rewrites each *question* (given the hidden description as context), never an answer, so
answers remain the canonical renderings the runtime's parsers read back exactly. A failed or empty reply keeps
the deterministic question. Request: ``POST {base_url}/chat/completions`` with ``{"model", "messages",
"temperature"}``; reply: ``choices[0].message.content``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import httpx

from model.protocol import ImageLabels
from training.instructions import Turn
from training.records import Record

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You rewrite questions that a clinician asks about a colour fundus photograph. Reply with one rephrased "
    "question only, same meaning, no answer, no preamble."
)


@dataclass(frozen=True)
class EndpointOptions:
    base_url: str
    model: str
    api_key: str | None = None
    temperature: float = 0.7
    timeout: float = 30.0


class LLMQuestionWriter:
    """A :data:`training.instructions.TurnWriter` backed by a chat-completions endpoint."""

    def __init__(self, options: EndpointOptions, client: httpx.Client | None = None):
        self.options = options
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.client = client or httpx.Client(timeout=options.timeout, headers=headers)
        self.calls = 0
        self.failures = 0

    def rephrase(self, question: str, context: str) -> str:
        self.calls += 1
        try:
            response = self.client.post(
                self.options.base_url.rstrip("/") + "/chat/completions",
                json={"model": self.options.model, "temperature": self.options.temperature,
                      "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                   {"role": "user", "content": f"Image description: {context}\nQuestion: {question}"}]},
            )
            response.raise_for_status()
            text = response.json()["choices"][0]["message"]["content"].strip()
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            self.failures += 1
            log.warning("LLM endpoint failed (%s); keeping the generated question", exc)
            return question
        first = text.splitlines()[0].strip() if text else ""
        if not first or "<image>" in first:
            self.failures += 1
            return question
        return first

    def __call__(self, record: Record, labels: ImageLabels, turns: Sequence[Turn]) -> list[Turn]:
        context = "; ".join(f"{c.value}={g}" for c, g in labels.findings.items()) or "no disease labels"
        return [replace(turn, question=self.rephrase(turn.question, context)) for turn in turns]
