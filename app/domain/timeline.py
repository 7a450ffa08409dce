"""A job's timeline: every state transition, as recorded by the verb that made it (job_events)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import JobEvent


@dataclass(frozen=True)
class Event:
    id: int
    at: datetime
    from_status: str | None
    to_status: str
    reason: str
    actor: str
    attempt: int
    worker_id: str | None
    cluster: str | None
    node: str | None
    exit_code: int | None
    details: dict[str, Any]


def events(session: Session, job_id: str, after_id: int = 0, limit: int = 1000) -> list[Event]:
    """The job's transitions after event `after_id`, oldest first (ix_job_events_job)."""
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id).limit(limit)
    )
    return [
        Event(e.id, e.at, e.from_status, e.to_status, e.reason, e.actor, e.attempt, e.worker_id, e.cluster, e.node,
              e.exit_code, dict(e.details or {}))
        for e in rows
    ]
