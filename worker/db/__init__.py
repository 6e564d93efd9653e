"""The database: models, state machine, sessions and migrations."""

from worker.db.models import (
    Analysis,
    AuditEvent,
    Base,
    Delivery,
    Instance,
    Job,
    ResultObject,
    Series,
    SignOff,
    Study,
    WorkerHeartbeat,
    utcnow,
)
from worker.db.session import Database, make_engine
from worker.db.states import (
    STUDY_TRANSITIONS,
    DeliveryObject,
    DeliveryState,
    FailureReason,
    InvalidTransition,
    JobKind,
    JobState,
    StudyState,
    check_transition,
)

__all__ = [
    "STUDY_TRANSITIONS",
    "Analysis",
    "AuditEvent",
    "Base",
    "Database",
    "Delivery",
    "DeliveryObject",
    "DeliveryState",
    "FailureReason",
    "Instance",
    "InvalidTransition",
    "Job",
    "JobKind",
    "JobState",
    "ResultObject",
    "Series",
    "SignOff",
    "Study",
    "StudyState",
    "WorkerHeartbeat",
    "check_transition",
    "make_engine",
    "utcnow",
]
