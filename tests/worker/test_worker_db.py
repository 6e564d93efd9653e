"""Migrations on SQLite and PostgreSQL, the study state machine, idempotency constraints."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from worker.db import (
    STUDY_TRANSITIONS,
    Base,
    Database,
    InvalidTransition,
    Job,
    JobKind,
    Study,
    StudyState,
    check_transition,
)
from worker.db.migrate import head_revision, is_current, upgrade

TABLES = {"studies", "series", "instances", "jobs", "analyses", "deliveries", "audit_events", "alembic_version"}


def _assert_schema_matches_models(db: Database) -> None:
    assert TABLES <= set(inspect(db.engine).get_table_names())
    with db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": _modelled_here}
        )
        assert compare_metadata(context, Base.metadata) == []
    assert is_current(db.engine)


def _modelled_here(obj, name, type_, reflected, compare_to) -> bool:
    """Compare only tables of models imported in this process (other areas add tables in later migrations)."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return table is None or not reflected or table.name in Base.metadata.tables


def _exercise(db: Database) -> None:
    with db.session() as session:
        study = Study(study_instance_uid="1.2.3.4", state=StudyState.COMPLETE)
        session.add(study)
        session.flush()
        session.add(Job(study_id=study.id, revision=1, model_name="tiny", model_version="1", kind=JobKind.ANALYSIS))
    with db.session() as session:
        stored = session.query(Study).one()
        assert stored.state is StudyState.COMPLETE and stored.created_at.tzinfo is not None
    with pytest.raises(IntegrityError), db.session() as session:
        session.add(Job(study_id=stored.id, revision=1, model_name="tiny", model_version="1", kind=JobKind.ANALYSIS))


def test_migrations_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'db' / 'retinalgpt.sqlite'}"
    assert upgrade(url) == head_revision()
    assert upgrade(url) == head_revision()  # idempotent
    db = Database(url)
    try:
        _assert_schema_matches_models(db)
        _exercise(db)
    finally:
        db.dispose()


@pytest.mark.postgres
def test_migrations_on_postgresql(postgres_url):
    assert upgrade(postgres_url) == head_revision()
    db = Database(postgres_url)
    try:
        _assert_schema_matches_models(db)
        _exercise(db)
    finally:
        db.dispose()


def test_study_state_machine():
    assert set(STUDY_TRANSITIONS) == set(StudyState)
    check_transition(StudyState.RECEIVING, StudyState.COMPLETE)
    check_transition(StudyState.ANALYSED, StudyState.DELIVERING)
    check_transition(StudyState.FAILED, StudyState.QUEUED)
    for target in set(StudyState) - {StudyState.COMPLETE}:
        with pytest.raises(InvalidTransition):
            check_transition(StudyState.RECEIVING, target)
    with pytest.raises(InvalidTransition):
        check_transition(StudyState.DELIVERED, StudyState.ANALYSED)
    assert all(StudyState.RECEIVING not in targets for targets in STUDY_TRANSITIONS.values())
