"""Follow-up questions about a study, answered by RetinalGPT on the inference workers (Celery task
``retinalgpt.answer_question``), grounded by the worker in the study's stored results; every exchange is
written to the audit trail (action ``chat``)."""

from __future__ import annotations

from typing import Any, Literal

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from pydantic import BaseModel, Field

from worker.celery_app import ANSWER_QUESTION
from worker.db import AuditEvent, Database


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
        timeout: float) -> ChatAnswer:
    """Send the question to the inference queue, wait up to ``timeout`` seconds, audit the exchange."""
    result = celery.send_task(ANSWER_QUESTION, kwargs={
        "study_instance_uid": study_uid, "question": request.question,
        "history": [turn.model_dump() for turn in request.history]})
    try:
        reply: dict[str, Any] = result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
    except CeleryTimeout:
        result.revoke()
        _audit(db, actor, study_uid, request, error=f"no answer within {timeout:g} s")
        raise ChatUnavailable(f"the inference workers did not answer within {timeout:g} s", timed_out=True) from None
    except Exception as exc:  # noqa: BLE001 - the task's own exception (any type), re-raised by Celery
        _audit(db, actor, study_uid, request, error=f"{type(exc).__name__}: {exc}")
        raise ChatUnavailable(f"the inference worker failed: {exc}", timed_out=False) from None
    answer = ChatAnswer(study_instance_uid=study_uid, question=request.question, answer=str(reply["answer"]),
                        model=ModelInfo.model_validate(reply["model"]) if reply.get("model") else None)
    _audit(db, actor, study_uid, request, answer=answer)
    return answer


def _audit(db: Database, actor: str, study_uid: str, request: ChatRequest, *, answer: ChatAnswer | None = None,
           error: str | None = None) -> None:
    detail: dict[str, Any] = {"question": request.question, "history_turns": len(request.history)}
    if answer is not None:
        detail["answer"] = answer.answer
        detail["model"] = answer.model.model_dump() if answer.model else None
    if error is not None:
        detail["error"] = error
    with db.session() as session:
        session.add(AuditEvent(actor=actor, action="chat", study_instance_uid=study_uid, detail=detail))
