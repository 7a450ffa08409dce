"""Scheduler liveness: each scheduler process records its last successful pass in PostgreSQL.

Every API process reads the same rows for the `scheduler` readiness check, however many API
processes and schedulers run. Several schedulers may run (one admits at a time; the others still
recover and sweep), so the freshest pass of any of them is what counts.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain.jobs import utcnow
from app.models import SchedulerHeartbeat


def started(session: Session, name: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    with transaction(session):
        session.execute(
            insert(SchedulerHeartbeat)
            .values(name=name, started_at=now)
            .on_conflict_do_update(index_elements=["name"], set_={"started_at": now, "last_pass_at": None})
        )


def passed(session: Session, name: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    with transaction(session):
        session.execute(
            insert(SchedulerHeartbeat)
            .values(name=name, started_at=now, last_pass_at=now)
            .on_conflict_do_update(index_elements=["name"], set_={"last_pass_at": now})
        )


def failed(session: Session, name: str, error: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    with transaction(session):
        session.execute(
            insert(SchedulerHeartbeat)
            .values(name=name, started_at=now, last_error_at=now, last_error=error[:1000])
            .on_conflict_do_update(index_elements=["name"], set_={"last_error_at": now, "last_error": error[:1000]})
        )


def stopped(session: Session, name: str) -> None:
    """A scheduler that stops cleanly leaves no row: no scheduler at all reads as `unknown`, not failing."""
    with transaction(session):
        session.execute(delete(SchedulerHeartbeat).where(SchedulerHeartbeat.name == name))


def status(session: Session, max_age_seconds: float, now: datetime | None = None) -> str:
    """`ok` if some scheduler passed (or started) within `max_age_seconds`; `error` if every known one is
    older; `unknown` if no scheduler has ever registered (the API may run before any scheduler)."""
    now = now or utcnow()
    freshest = session.execute(
        select(func.count(), func.max(func.coalesce(SchedulerHeartbeat.last_pass_at, SchedulerHeartbeat.started_at)))
    ).one()
    count, latest = freshest
    if not count:
        return "unknown"
    return "ok" if latest >= now - timedelta(seconds=max_age_seconds) else "error"
