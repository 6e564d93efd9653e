"""Audit events of follow-up questions about a study: one event per exchange (action ``chat``), written by the entry
point that took the question — the API's chat route (the asking user as actor) or ``retinalgpt chat`` (the operator)
— never by the inference task as well. The question and answer are kept as ``audit.chat_text`` says: their SHA-256
and length (default; a question may name the patient) or their full text."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from worker.db import AuditEvent

ChatText = Literal["full", "hash"]


def audited_text(text: str, chat_text: ChatText) -> str | dict[str, Any]:
    """``text`` as the audit trail keeps it: verbatim, or its SHA-256 and length."""
    if chat_text == "full":
        return text
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), "length": len(text)}


def chat_event(actor: str, study_uid: str, question: str, history_turns: int, chat_text: ChatText, *,
               answer: str | None = None, model: dict[str, Any] | None = None, error: str | None = None) -> AuditEvent:
    """The audit event of one exchange (an answer, or the error that prevented one)."""
    detail: dict[str, Any] = {"question": audited_text(question, chat_text), "history_turns": history_turns}
    if answer is not None:
        detail["answer"] = audited_text(answer, chat_text)
        detail["model"] = model
    if error is not None:
        detail["error"] = error
    return AuditEvent(actor=actor, action="chat", study_instance_uid=study_uid, detail=detail)
