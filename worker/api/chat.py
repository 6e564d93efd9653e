"""Follow-up questions about a study, answered by RetinalGPT on the inference workers (Celery task
``retinalgpt.answer_question``), grounded by the worker in the study's stored results; every exchange is
written to the audit trail once, here (action ``chat``, with the asking user as actor). The question and
answer are kept as ``audit.chat_text`` says: their SHA-256 and length (default; a question may name the
patient) or their full text."""

from __future__ import annotations

from typing import Any, Literal

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from pydantic import BaseModel, Field

from worker.celery_app import ANSWER_QUESTION
from worker.db import Database
from worker.pipeline.chat_audit import ChatText, chat_event


class ChatTurn(BaseModel):
    role: Literal["user", "assistant"]
    content: str = Field(min_length=1, max_length=4000)


class ChatRequest(BaseModel):
    question: str = Field(min_length=1, max_length=2000, description="the clinician's question")
    history: list[ChatTurn] = Field(default_factory=list, max_length=20, description="earlier turns, oldest first")


class ModelInfo(BaseModel):
    name: str
    version: str
    device_uid: str


class ChatAnswer(BaseModel):
    study_instance_uid: str
    question: str
    answer: str
    model: ModelInfo | None = None


class ChatUnavailable(RuntimeError):
    """No answer: the inference workers did not answer in time (``timed_out``) or the task failed."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def ask(celery: Celery, db: Database, study_uid: str, request: ChatRequest, *, actor: str,
        timeout: float, chat_text: ChatText = "hash") -> ChatAnswer:
    """Send the question to the inference queue, wait up to ``timeout`` seconds, audit the exchange."""
    result = celery.send_task(ANSWER_QUESTION, kwargs={
        "study_instance_uid": study_uid, "question": request.question,
        "history": [turn.model_dump() for turn in request.history]})
    try:
        reply: dict[str, Any] = result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
    except CeleryTimeout:
        result.revoke()
        _audit(db, actor, study_uid, request, chat_text, error=f"no answer within {timeout:g} s")
        raise ChatUnavailable(f"the inference workers did not answer within {timeout:g} s", timed_out=True) from None
    except Exception as exc:  # noqa: BLE001 - the task's own exception (any type), re-raised by Celery
        _audit(db, actor, study_uid, request, chat_text, error=f"{type(exc).__name__}: {exc}")
        raise ChatUnavailable(f"the inference worker failed: {exc}", timed_out=False) from None
    answer = ChatAnswer(study_instance_uid=study_uid, question=request.question, answer=str(reply["answer"]),
                        model=ModelInfo.model_validate(reply["model"]) if reply.get("model") else None)
    _audit(db, actor, study_uid, request, chat_text, answer=answer)
    return answer


def _audit(db: Database, actor: str, study_uid: str, request: ChatRequest, chat_text: ChatText, *,
           answer: ChatAnswer | None = None, error: str | None = None) -> None:
    event = chat_event(actor, study_uid, request.question, len(request.history), chat_text,
                       answer=answer.answer if answer is not None else None,
                       model=answer.model.model_dump() if answer is not None and answer.model else None, error=error)
    with db.session() as session:
        session.add(event)
