"""The database: models, state machine, sessions and migrations."""

from worker.db.models import (
    Analysis,
    AuditEvent,
    Base,
    Delivery,
    Instance,
    Job,
    Series,
    Study,
    WorkerHeartbeat,
    utcnow,
)
from worker.db.session import Database, make_engine
from worker.db.states import (
    STUDY_TRANSITIONS,
    DeliveryObject,
    DeliveryState,
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
    "Instance",
    "InvalidTransition",
    "Job",
    "JobKind",
    "JobState",
    "Series",
    "Study",
    "StudyState",
    "WorkerHeartbeat",
    "check_transition",
    "make_engine",
    "utcnow",
]
