"""Admission: PostgreSQL holds the backlog; the scheduler admits from it and writes the tasks to publish.

One admission pass, in one transaction:
- only one scheduler admits at a time (an advisory lock), so capacity is never promised twice;
- pending jobs are taken in strict order (priority, then age) with FOR UPDATE SKIP LOCKED, so a job
  being cancelled at that instant is skipped rather than waited for;
- each admitted job gets a placement (node, GPUs), a fresh dispatch token, and an outbox row.
The outbox rows are published after the commit (see app.dispatch); a row left unpublished by a
crash is published again by the next pass's sweep.
"""
from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain import capacity
from app.domain.callers import SYSTEM
from app.domain.jobs import clear_placement, notify_scheduler, record_transition, utcnow
from app.domain.states import TERMINAL, JobStatus
from app.models import Job, Node, OutboxMessage
from config import Settings

log = logging.getLogger("jobservice.scheduler")
T = TypeVar("T")

EXECUTE_TASK = "jobservice.execute_job"
ADOPT_TASK = "jobservice.adopt_job"
ADMISSION_LOCK = 7_311_001  # pg advisory lock key shared by every scheduler process
ADMISSION_BATCH = 500


def broker_queue(queue: str, cluster: str, node: str | None) -> str:
    """The Celery queue a placed job's task goes to: its logical queue, on the workers of its node."""
    return ".".join(part for part in (queue, cluster, node) if part)


@dataclass
class AdmissionResult:
    messages: list[OutboxMessage] = field(default_factory=list)  # to publish once the admission committed
    locked_out: bool = False
    next_wakeup: datetime | None = None  # earliest backoff expiry among waiting jobs
    failed: list[str] = field(default_factory=list)  # jobs whose handling raised: ended as failed

    @property
    def admitted(self) -> list[str]:
        return [message.job_id for message in self.messages]


def admit(session: Session, settings: Settings, now: datetime | None = None) -> AdmissionResult:
    now = now or utcnow()
    result = AdmissionResult()
    with transaction(session):
        if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK}):
            result.locked_out = True
            return result
        nodes = capacity.load_nodes(session, alive_since=capacity.node_alive_since(now, settings.node_lease_seconds))
        active = dict(
            session.execute(
                select(Job.queue, func.count()).where(Job.status.in_(["queued", "running"])).group_by(Job.queue)
            ).all()
        )
        candidates = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.PENDING.value, (Job.not_before.is_(None)) | (Job.not_before <= now))
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(ADMISSION_BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        capacity_blocked = False
        unhandled: list[tuple[str, str]] = []
        for job in candidates:
            queue = settings.queue_named(job.queue)
            limit = queue.max_concurrency if queue else 0
            if active.get(job.queue, 0) >= limit:
                continue  # this queue is full; other queues may still admit
            if capacity_blocked:
                break  # strict priority: nothing overtakes a job waiting for capacity
            try:
                members = job.gang_min_members if job.gang_enabled else 1
                problem = capacity.malformed(job.cpu_millis, job.memory_bytes, job.gpus, members)
                if problem:
                    raise ValueError(problem)
                placement = capacity.place(nodes, job.cpu_millis, job.memory_bytes, job.gpus, members, has_command=bool(job.command))
                if placement is None:
                    empty = [n.emptied() for n in nodes]
                    if capacity.place(empty, job.cpu_millis, job.memory_bytes, job.gpus, members, has_command=bool(job.command)) is None:
                        continue  # not even the empty live fleet holds it: it waits (explain says why), blocking nobody
                    capacity_blocked = True
                    continue
            except Exception as exc:  # noqa: BLE001 - one job must never stop admission of the others
                log.exception("admission failed for one job; failing that job", extra={"job_id": job.id})
                unhandled.append((job.id, f"the scheduler could not admit this job: {type(exc).__name__}: {exc}"[:1000]))
                continue
            result.messages.append(_place(session, job, placement, now))
            active[job.queue] = active.get(job.queue, 0) + 1
        result.next_wakeup = session.scalar(
            select(func.min(Job.not_before)).where(Job.status == JobStatus.PENDING.value, Job.not_before > now)
        )
    for job_id, reason in unhandled:
        if fail_unhandled(session, job_id, reason, now):
            result.failed.append(job_id)
    return result


def _place(session: Session, job: Job, placement: capacity.Placement, now: datetime) -> OutboxMessage:
    job.cluster = placement.cluster
    job.node = placement.node
    job.placement = placement.as_json()
    job.gpu_indices = placement.gpu_indices
    job.holds_resources = True
    job.dispatch_token = secrets.token_hex(8)
    job.queued_at = now
    where = ", ".join(f"{node} x{members}" if members > 1 else node for node, members, _ in placement.parts)
    gpus = placement.gpu_indices
    record_transition(
        session,
        job,
        JobStatus.QUEUED,
        reason=f"admitted to {placement.cluster} ({where})" + (f" with GPUs {gpus}" if gpus else ""),
        actor="scheduler",
        at=now,
        details={"placement": job.placement},
    )
    message = OutboxMessage(
        job_id=job.id,
        task_name=EXECUTE_TASK,
        # Local jobs go to their host's worker; a Kubernetes cluster's workers share its queues.
        queue=broker_queue(job.queue, placement.cluster, placement.node if placement.cluster == capacity.LOCAL_CLUSTER else None),
        args=[job.id, job.dispatch_token],
        created_at=now,
    )
    session.add(message)
    return message


def retry_delay_seconds(settings: Settings, job: Job) -> float:
    """base * multiplier ** retries, capped at RETRY_BACKOFF_MAX_SECONDS; never overflows.

    The cap holds for any row in the database (a multiplier of 1e12, infinity or NaN written before
    the API bounded it), so neither a worker nor the scheduler's recovery can raise here.
    """
    cap = max(0.0, settings.retry_backoff_max_seconds)
    multiplier = 1.0 if job.backoff_multiplier is None else float(job.backoff_multiplier)
    try:
        delay = settings.retry_backoff_base_seconds * multiplier ** max(0, job.retry_count or 0)
    except OverflowError:  # float ** int raises rather than returning infinity
        return cap
    return cap if math.isnan(delay) else min(cap, max(0.0, delay))


def end_attempt(
    session: Session,
    job: Job,
    settings: Settings,
    *,
    succeeded: bool,
    retryable: bool,
    reason: str,
    actor: str,
    exit_code: int | None = None,
    details: dict | None = None,
    now: datetime | None = None,
    requeue: bool = False,
) -> None:
    """A running job's attempt ended: success, a retry after its backoff, a requeue, or failure. Caller commits.

    `requeue`: the attempt never really started (a gang not placed whole): back to the backlog after the
    base backoff, without spending one of the job's retries.
    """
    now = now or utcnow()
    job.exit_code = exit_code
    job.holds_resources = False
    if requeue:
        delay = settings.retry_backoff_base_seconds
        record_transition(
            session, job, JobStatus.PENDING, reason=f"{reason}; requeued in {delay:g}s", actor=actor, at=now,
            details={**(details or {}), "backoff_seconds": delay},
        )
        job.not_before = now + timedelta(seconds=delay)
        clear_placement(job)
    elif succeeded:
        record_transition(session, job, JobStatus.SUCCEEDED, reason=reason, actor=actor, at=now, exit_code=exit_code, details=details)
        job.completed_at = now
    elif retryable and job.retry_count < job.max_retries:
        delay = retry_delay_seconds(settings, job)
        record_transition(
            session,
            job,
            JobStatus.PENDING,
            reason=f"{reason}; retry {job.retry_count + 1} of {job.max_retries} in {delay:g}s",
            actor=actor,
            at=now,
            exit_code=exit_code,
            details={**(details or {}), "backoff_seconds": delay},
        )
        job.retry_count += 1
        job.not_before = now + timedelta(seconds=delay)
        clear_placement(job)
    else:
        record_transition(session, job, JobStatus.FAILED, reason=reason, actor=actor, at=now, exit_code=exit_code, details=details)
        job.completed_at = now
    notify_scheduler(session, "attempt-ended")


# Errors that say the database (not the job) is in trouble: the whole tick fails and is retried.
_INFRASTRUCTURE_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def isolated(session: Session, job_id: str, handle: Callable[[], T], now: datetime, step: str) -> T | None:
    """Run one job's handling in its own transaction; if it raises, end that job, not the tick.

    A job whose handling raises (a row no code path expects) is failed in a transaction of its own,
    with the error in its timeline, so the next tick does not trip over it again.
    """
    try:
        with transaction(session):
            return handle()
    except _INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - one job must never stop the scheduler
        log.exception("%s failed for one job; failing that job", step, extra={"job_id": job_id})
        fail_unhandled(session, job_id, f"the scheduler could not {step} this job: {type(exc).__name__}: {exc}"[:1000], now)
        return None


def fail_unhandled(session: Session, job_id: str, reason: str, now: datetime | None = None) -> bool:
    """End a job the scheduler cannot handle: failed, with the reason in its timeline. True if it was ended."""
    now = now or utcnow()
    with transaction(session):
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None or JobStatus(job.status) in TERMINAL:
            return False
        record_transition(session, job, JobStatus.FAILED, reason=reason, actor="scheduler", at=now)
        job.completed_at = now
        # Its lease expired (recovery) or it never held anything (admission): nothing runs for it any more.
        job.holds_resources = False
        notify_scheduler(session, "job-failed")
        return True


def recover_lost(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Running jobs whose worker stopped heartbeating, and queued jobs whose node died, are not left hanging.

    Each job is handled in its own transaction (see `isolated`): one bad row cannot stop the others.
    """
    now = now or utcnow()
    recovered: list[str] = []
    lease = now - timedelta(seconds=settings.job_lease_seconds)
    node_lease = now - timedelta(seconds=settings.node_lease_seconds)
    node_alive = select(Node.name).where(Node.cluster == Job.cluster, Node.name == Job.node, Node.heartbeat_at >= node_lease)
    stale_running = (Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < lease)
    orphaned_queued = (Job.status == JobStatus.QUEUED.value, Job.queued_at < node_lease, ~node_alive.exists())
    with transaction(session):
        stale_ids = list(session.scalars(select(Job.id).where(*stale_running)))
        orphaned_ids = list(session.scalars(select(Job.id).where(*orphaned_queued)))
        released = session.execute(
            update(Job)
            .where(Job.status == JobStatus.CANCELLED.value, Job.holds_resources, Job.heartbeat_at < lease)
            .values(holds_resources=False)
        )
        if released.rowcount:
            notify_scheduler(session, "resources-released")

    def lost(job_id: str) -> Callable[[], bool]:
        def handle() -> bool:
            job = session.scalars(select(Job).where(Job.id == job_id, *stale_running).with_for_update(skip_locked=True)).first()
            if job is None:
                return False  # it heartbeated, ended or is being handled meanwhile
            silent = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else settings.job_lease_seconds
            end_attempt(
                session, job, settings, succeeded=False, retryable=True, actor=SYSTEM, now=now,
                reason=f"worker {job.worker_id} lost: no heartbeat for {silent:.0f}s",
            )
            return True

        return handle

    def orphaned(job_id: str) -> Callable[[], bool]:
        def handle() -> bool:
            job = session.scalars(select(Job).where(Job.id == job_id, *orphaned_queued).with_for_update(skip_locked=True)).first()
            if job is None:
                return False
            node = f"{job.cluster}/{job.node}"
            record_transition(session, job, JobStatus.PENDING, reason=f"node {node} lost before the job started", actor=SYSTEM, at=now)
            clear_placement(job)
            notify_scheduler(session, "requeued")
            return True

        return handle

    for job_id in stale_ids:
        if isolated(session, job_id, lost(job_id), now, "recover"):
            recovered.append(job_id)
    for job_id in orphaned_ids:
        if isolated(session, job_id, orphaned(job_id), now, "requeue"):
            recovered.append(job_id)
    return recovered


def stale_outbox(session: Session, older_than: datetime) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.created_at < older_than).order_by(OutboxMessage.id)))
