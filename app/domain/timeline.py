"""A job's timeline: every state transition, as recorded by the verb that made it (job_events)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, true
from sqlalchemy.orm import Session, aliased

from app.domain.logs import cursor_table
from app.models import Job, JobEvent


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
    return [_event(e) for e in rows]


def _event(e: JobEvent) -> Event:
    return Event(e.id, e.at, e.from_status, e.to_status, e.reason, e.actor, e.attempt, e.worker_id, e.cluster, e.node,
                 e.exit_code, dict(e.details or {}))


def events_many(session: Session, cursors: Sequence[tuple[str, int]], limit: int = 1000) -> dict[tuple[str, int], list[Event]]:
    """For each (job id, last event id) the next `limit` events, in one statement (see logs.after_many)."""
    if not cursors:
        return {}
    wanted = cursor_table(cursors)
    page = (
        select(JobEvent)
        .where(JobEvent.job_id == wanted.c.job_id, JobEvent.id > wanted.c.after_id)
        .order_by(JobEvent.id)
        .limit(limit)
        .lateral("e")
    )
    event = aliased(JobEvent, page)
    query = select(wanted.c.job_id, wanted.c.after_id, event).select_from(wanted).join(page, true()).order_by(page.c.id)
    found: dict[tuple[str, int], list[Event]] = {(job_id, after_id): [] for job_id, after_id in cursors}
    for job_id, after_id, e in session.execute(query):
        found[(job_id, after_id)].append(_event(e))
    return found


def statuses(session: Session, job_ids: Iterable[str]) -> dict[str, str]:
    """The current status of each job that still exists, in one statement."""
    ids = list(job_ids)
    if not ids:
        return {}
    return {job_id: status for job_id, status in session.execute(select(Job.id, Job.status).where(Job.id.in_(ids)))}
