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

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain import capacity
from app.domain.callers import SYSTEM
from app.domain.jobs import clear_placement, notify_scheduler, record_transition, utcnow
from app.domain.states import JobStatus
from app.models import Job, Node, OutboxMessage
from config import Settings

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
        for job in candidates:
            queue = settings.queue_named(job.queue)
            limit = queue.max_concurrency if queue else 0
            if active.get(job.queue, 0) >= limit:
                continue  # this queue is full; other queues may still admit
            if capacity_blocked:
                break  # strict priority: nothing overtakes a job waiting for capacity
            members = job.gang_min_members if job.gang_enabled else 1
            placement = capacity.place(nodes, job.cpu_millis, job.memory_bytes, job.gpus, members, has_command=bool(job.command))
            if placement is None:
                capacity_blocked = True
                continue
            result.messages.append(_place(session, job, placement, now))
            active[job.queue] = active.get(job.queue, 0) + 1
        result.next_wakeup = session.scalar(
            select(func.min(Job.not_before)).where(Job.status == JobStatus.PENDING.value, Job.not_before > now)
        )
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
    return settings.retry_backoff_base_seconds * job.backoff_multiplier ** job.retry_count


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


def recover_lost(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Running jobs whose worker stopped heartbeating, and queued jobs whose node died, are not left hanging."""
    now = now or utcnow()
    recovered: list[str] = []
    lease = now - timedelta(seconds=settings.job_lease_seconds)
    with transaction(session):
        # Only local attempts die with their worker. A Kubernetes attempt's truth is in its cluster: the
        # cluster's other workers adopt it (workers/node.py) and end it only when its Job is gone or failed.
        stale_running = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < lease, Job.cluster == capacity.LOCAL_CLUSTER)
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale_running:
            silent = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else settings.job_lease_seconds
            end_attempt(
                session, job, settings, succeeded=False, retryable=True, actor=SYSTEM, now=now,
                reason=f"worker {job.worker_id} lost: no heartbeat for {silent:.0f}s",
            )
            recovered.append(job.id)
        released = session.execute(
            update(Job)
            .where(Job.status == JobStatus.CANCELLED.value, Job.holds_resources, Job.heartbeat_at < lease)
            .values(holds_resources=False)
        )
        if released.rowcount:
            notify_scheduler(session, "resources-released")
        node_lease = now - timedelta(seconds=settings.node_lease_seconds)
        node_alive = select(Node.name).where(Node.cluster == Job.cluster, Node.name == Job.node, Node.heartbeat_at >= node_lease)
        orphaned = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED.value, Job.queued_at < node_lease, ~node_alive.exists())
            .with_for_update(skip_locked=True)
        ).all()
        for job in orphaned:
            node = f"{job.cluster}/{job.node}"
            record_transition(session, job, JobStatus.PENDING, reason=f"node {node} lost before the job started", actor=SYSTEM, at=now)
            clear_placement(job)
            recovered.append(job.id)
        if orphaned:
            notify_scheduler(session, "requeued")
    return recovered


def requeue_unclaimed(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Queued jobs no worker claimed within CLAIM_TIMEOUT_SECONDS go back to the backlog.

    Admission places a job only on a free worker slot, so a claim normally follows within milliseconds;
    a job still queued long after lost its task on the way (broker lost the message, the worker's claim
    failed, the worker process died holding it). Holding capacity requires a claim: the job releases its
    placement and gets a new admission and dispatch token, which turns any late claim of the old task
    into a no-op (the claim is a compare-and-set on the token).
    """
    now = now or utcnow()
    timeout = settings.claim_timeout_seconds
    with transaction(session):
        unclaimed = session.scalars(
            select(Job)
            .where(Job.status == JobStatus.QUEUED.value, Job.queued_at < now - timedelta(seconds=timeout))
            .order_by(Job.queued_at)
            .limit(ADMISSION_BATCH)
            .with_for_update(skip_locked=True)  # a worker claiming it right now wins
        ).all()
        for job in unclaimed:
            waited = (now - job.queued_at).total_seconds() if job.queued_at else timeout
            record_transition(
                session, job, JobStatus.PENDING, actor=SYSTEM, at=now,
                reason=f"not claimed by a worker within {timeout:g}s of its admission to {job.cluster}/{job.node or '*'}; back to the backlog",
                details={"unclaimed_seconds": round(waited, 3), "placement": job.placement},
            )
            clear_placement(job)
        if unclaimed:
            ids = [job.id for job in unclaimed]
            session.execute(delete(OutboxMessage).where(OutboxMessage.job_id.in_(ids)))  # stale tasks: no use sending them
            notify_scheduler(session, "requeued")
    return [job.id for job in unclaimed]


def stale_outbox(session: Session, older_than: datetime) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.created_at < older_than).order_by(OutboxMessage.id)))
