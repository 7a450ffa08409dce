"""Dry run of a submission: what would happen to these jobs, with nothing created.

The jobs are written in a transaction that always rolls back, so the answer is the scheduler's own
view of them as if submitted now (their queue position, jobs of the same batch ahead of them
included) and nothing of it is ever visible to anyone else. The verdict for each job comes from
one call, `_verdict`, today the read-only replay of app.domain.explain; pointing it at a pure
admission policy is a change of that one function.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain import explain, jobs
from app.domain.callers import Caller
from app.domain.explain import Blocking, Explanation, Reason
from app.domain.jobs import JobRequest
from app.models import Job
from config import Settings


@dataclass(frozen=True)
class Preview:
    job_type: str
    priority: int
    queue: str
    queue_position: int | None
    fits_now: bool
    reason: str
    message: str
    blocking: Blocking | None
    estimated_start_at: datetime | None
    estimated_wait_seconds: float | None


def preview(
    session: Session, caller: Caller, requests: list[JobRequest], settings: Settings, field: jobs.FieldNamer
) -> list[Preview]:
    """Validate like a submit (400 for a job no node could ever run), then say what would happen; writes nothing."""
    try:
        submitted = jobs.insert_pending(session, caller, requests, settings, field)
        by_id = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_([s.id for s in submitted])))}
        now = jobs.utcnow()
        return [_preview(s, _verdict(session, by_id[s.id], settings, now)) for s in submitted]
    finally:
        session.rollback()


def _verdict(session: Session, job: Job, settings: Settings, now: datetime) -> Explanation:
    return explain.explain(session, job, settings, now)


def _preview(job: jobs.Submitted, e: Explanation) -> Preview:
    return Preview(
        job_type=job.job_type, priority=job.priority, queue=e.queue, queue_position=e.queue_position,
        fits_now=e.reason is Reason.WAITING_FOR_SCHEDULER, reason=e.reason.value, message=e.message, blocking=e.blocking,
        estimated_start_at=e.estimate.start_at if e.estimate else None,
        estimated_wait_seconds=e.estimate.wait_seconds if e.estimate else None,
    )
