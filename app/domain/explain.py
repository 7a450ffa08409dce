"""Why is my job not running? The scheduler's own rules, replayed read-only for one job.

A pending job waits for one of these reasons, checked in the order the scheduler applies them
(app.domain.scheduling.admit):

- BACKOFF: a retry waits until `retry_at` before it is a candidate again.
- QUEUE_CONCURRENCY_LIMIT: its queue already has max_concurrency jobs queued or running.
- NO_NODES: no live node (a worker host or Kubernetes node heartbeating within NODE_LEASE_SECONDS).
- HIGHER_PRIORITY_AHEAD: admission is strict (priority, then age); a job ahead of it that does not
  fit blocks every later one, and `blocked_by` names that job and its own reason.
- GANG_INCOMPLETE: a gang starts all its members at once on one node; only some of them fit now.
- NO_FREE_SLOTS / INSUFFICIENT_GPUS / INSUFFICIENT_CPU / INSUFFICIENT_MEMORY: what the node that
  came nearest to fitting it lacks (capacity.NodeCapacity.shortfall's codes, in its order).
- WAITING_FOR_SCHEDULER: it fits now; the scheduler admits it on its next pass.

The replay walks the same candidates the scheduler would (the first ADMISSION_BATCH eligible pending
jobs, in admission order), against the same capacity and placement (capacity.load_nodes of live
nodes, capacity.place, NodeCapacity.shortfall), on its own copy, and never writes. It is a snapshot:
the answer can change a moment later.
"""
from __future__ import annotations

import copy
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from itertools import islice

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.domain import capacity, counters, jobs, stats
from app.domain.capacity import NodeCapacity
from app.domain.nodes import why_unschedulable
from app.domain.quantities import format_bytes, format_millis
from app.domain.scheduling import ADMISSION_BATCH
from app.domain.states import TERMINAL, JobStatus
from app.models import Job
from config import Settings

FIRST_CANDIDATES = 32  # per queue; the rest of the batch is read only if the walk gets that far


class Reason(StrEnum):
    BACKOFF = "BACKOFF"
    QUEUE_CONCURRENCY_LIMIT = "QUEUE_CONCURRENCY_LIMIT"
    NO_NODES = "NO_NODES"
    HIGHER_PRIORITY_AHEAD = "HIGHER_PRIORITY_AHEAD"
    GANG_INCOMPLETE = "GANG_INCOMPLETE"
    NO_FREE_SLOTS = "NO_FREE_SLOTS"
    INSUFFICIENT_GPUS = "INSUFFICIENT_GPUS"
    INSUFFICIENT_CPU = "INSUFFICIENT_CPU"
    INSUFFICIENT_MEMORY = "INSUFFICIENT_MEMORY"
    NO_FITTING_NODE = "NO_FITTING_NODE"  # a shortfall code this module does not know yet
    WAITING_FOR_SCHEDULER = "WAITING_FOR_SCHEDULER"
    WAITING_FOR_WORKER = "WAITING_FOR_WORKER"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# NodeCapacity.shortfall checks in this order: a node failing a later check came nearer to fitting.
_SHORTFALL_ORDER = ("SLOTS", "GPUS", "CPU", "MEMORY")
_SHORTFALL_REASONS = {
    "SLOTS": Reason.NO_FREE_SLOTS,
    "GPUS": Reason.INSUFFICIENT_GPUS,
    "CPU": Reason.INSUFFICIENT_CPU,
    "MEMORY": Reason.INSUFFICIENT_MEMORY,
}


@dataclass(frozen=True)
class Blocking:
    resource: str  # gpus | cpu | memory | slots | gang_members
    requested: int | str
    free: int | str
    node: str | None  # cluster/name of the node that came nearest to fitting


@dataclass(frozen=True)
class BlockedBy:
    job_id: str
    priority: int
    queue: str
    reason: Reason
    message: str


@dataclass(frozen=True)
class Estimate:
    start_at: datetime | None
    wait_seconds: float | None
    basis: str


@dataclass(frozen=True)
class Explanation:
    job_id: str
    status: str
    reason: Reason
    message: str
    queue: str
    queue_position: int | None = None
    blocking: Blocking | None = None
    blocked_by: BlockedBy | None = None
    retry_at: datetime | None = None
    estimate: Estimate | None = None
    cluster: str | None = None
    node: str | None = None
    worker_id: str | None = None
    since: datetime | None = None
    exit_code: int | None = None
    attempt: int = 0


@dataclass(frozen=True)
class _Candidate:
    id: str
    queue: str
    priority: int
    created_at: datetime
    cpu_millis: int
    memory_bytes: int
    gpus: int
    members: int
    has_command: bool  # the local executor runs commands only (capacity.place)

    @property
    def order(self) -> tuple[int, datetime, str]:
        return (-self.priority, self.created_at, self.id)


def explain(session: Session, job: Job, settings: Settings, now: datetime | None = None) -> Explanation:
    """Why `job` (already authorized by the caller) is where it is."""
    now = now or jobs.utcnow()
    status = JobStatus(job.status)
    if status is JobStatus.PENDING:
        return _explain_pending(session, job, settings, now)
    base = dict(job_id=job.id, status=job.status, queue=job.queue, cluster=job.cluster, node=job.node, attempt=job.retry_count)
    if status is JobStatus.QUEUED:
        return Explanation(
            reason=Reason.WAITING_FOR_WORKER, since=job.queued_at,
            message=f"Placed on {job.cluster}/{job.node}; waiting for its worker to start it", **base,
        )
    if status is JobStatus.RUNNING:
        return Explanation(
            reason=Reason.RUNNING, since=job.started_at, worker_id=job.worker_id,
            message=f"Running on {job.cluster}/{job.node} (worker {job.worker_id}, attempt {job.retry_count})", **base,
        )
    assert status in TERMINAL
    return Explanation(
        reason=Reason(status.value.upper()), since=job.completed_at, exit_code=job.exit_code, worker_id=job.worker_id,
        message=job.status_reason or status.value, **base,
    )


def _explain_pending(session: Session, job: Job, settings: Settings, now: datetime) -> Explanation:
    position = jobs.queue_position(session, job)
    retry_at = job.not_before if job.not_before and job.not_before > now else None

    def answer(reason: Reason, message: str, **extra: object) -> Explanation:
        return Explanation(
            job_id=job.id, status=job.status, reason=reason, message=message, queue=job.queue, queue_position=position,
            retry_at=retry_at, estimate=_estimate(session, job.queue, position or 1, now, retry_at),
            attempt=job.retry_count, **extra,  # type: ignore[arg-type]
        )

    if retry_at is not None:
        return answer(Reason.BACKOFF, f"Retry {job.retry_count} of {job.max_retries} waits for its backoff until {retry_at.isoformat()}")
    counts = counters.counts_by_queue_and_status(session)
    active = {q: c.get(JobStatus.QUEUED.value, 0) + c.get(JobStatus.RUNNING.value, 0) for q, c in counts.items()}
    full = _queue_full(settings, job.queue, active)
    if full:
        return answer(Reason.QUEUE_CONCURRENCY_LIMIT, full)
    nodes = capacity.load_nodes(session, alive_since=capacity.node_alive_since(now, settings.node_lease_seconds))
    if not nodes:
        held_back = why_unschedulable(session, capacity.node_alive_since(now, settings.node_lease_seconds))
        return answer(Reason.NO_NODES, held_back or f"No live node: none has heartbeated in the last {settings.node_lease_seconds:g}s")

    pending_queues = [q for q, c in counts.items() if c.get(JobStatus.PENDING.value, 0) > 0]
    blocker: tuple[_Candidate, Reason, Blocking | None, str] | None = None
    for candidate in _candidates(session, pending_queues, now):
        if _queue_full(settings, candidate.queue, active):
            if candidate.id == job.id:
                return answer(Reason.QUEUE_CONCURRENCY_LIMIT, _queue_full(settings, candidate.queue, active) or "")
            continue  # the scheduler skips a full queue's jobs; they block nobody
        if blocker is not None:
            break  # strict priority: nothing behind the blocked job is admitted
        # On success place() reserves on `nodes`: a job ahead that fits takes its share first.
        placement = _place(nodes, candidate)
        if placement is None:
            reason, blocking, message = _diagnose(nodes, candidate)
            if candidate.id == job.id:
                return answer(reason, message, blocking=blocking)
            blocker = (candidate, reason, blocking, message)
            continue
        active[candidate.queue] = active.get(candidate.queue, 0) + 1
        if candidate.id == job.id:
            where = f"{placement.cluster}/{placement.node}" if placement.node else placement.cluster
            return answer(Reason.WAITING_FOR_SCHEDULER, f"It fits on {where} now; the scheduler admits it on its next pass")
    if blocker is not None:
        ahead, reason, blocking, message = blocker
        return answer(
            Reason.HIGHER_PRIORITY_AHEAD,
            f"Job {ahead.id} (priority {ahead.priority}) is ahead of it and cannot start: {message}",
            blocked_by=BlockedBy(ahead.id, ahead.priority, ahead.queue, reason, message),
            blocking=blocking,
        )
    return answer(
        Reason.HIGHER_PRIORITY_AHEAD,
        f"More than {ADMISSION_BATCH} jobs are ahead of it; the scheduler admits them first",
    )


def _queue_full(settings: Settings, queue: str, active: dict[str, int]) -> str | None:
    config = settings.queue_named(queue)
    limit = config.max_concurrency if config else 0
    running = active.get(queue, 0)
    if running < limit:
        return None
    if config is None:
        return f"Queue {queue} is not configured (JOB_QUEUES); its jobs are never admitted"
    return f"Queue {queue} has {running} of {limit} jobs queued or running (max_concurrency)"


def _candidates(session: Session, queues: list[str], now: datetime) -> Iterator[_Candidate]:
    """The scheduler's candidates: eligible pending jobs in admission order, the first ADMISSION_BATCH.

    Per queue an index range scan (ix_jobs_pending_order), merged lazily: the walk usually stops
    within the first few jobs, so it reads a few dozen rows, never a sort of the whole backlog.
    """
    streams = [_queue_candidates(session, queue, now) for queue in queues]
    return islice(heapq.merge(*streams, key=lambda c: c.order), ADMISSION_BATCH)


def _queue_candidates(session: Session, queue: str, now: datetime) -> Iterator[_Candidate]:
    first = FIRST_CANDIDATES
    for limit in (first, ADMISSION_BATCH):
        rows = session.execute(
            select(Job.id, Job.queue, Job.priority, Job.created_at, Job.cpu_millis, Job.memory_bytes, Job.gpus,
                   Job.gang_enabled, Job.gang_min_members, Job.command)
            .where(Job.status == JobStatus.PENDING.value, Job.queue == queue,
                   (Job.not_before.is_(None)) | (Job.not_before <= now))
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
        ).all()
        for r in rows[first if limit != first else 0:]:
            yield _Candidate(r.id, r.queue, r.priority, r.created_at, r.cpu_millis, r.memory_bytes, r.gpus,
                             r.gang_min_members if r.gang_enabled else 1, bool(r.command))
        if len(rows) < limit:
            return


def _place(nodes: list[NodeCapacity], job: _Candidate, members: int | None = None) -> capacity.Placement | None:
    return capacity.place(nodes, job.cpu_millis, job.memory_bytes, job.gpus, members or job.members, has_command=job.has_command)


def _diagnose(nodes: list[NodeCapacity], job: _Candidate) -> tuple[Reason, Blocking, str]:
    """Why no node fits `job`: a gang only partly placeable, or the shortfall of the node that came nearest."""
    if job.members > 1:
        for placeable in range(job.members - 1, 0, -1):
            partial = _place(copy.deepcopy(nodes), job, placeable)  # a trial: never reserve on the real copy
            if partial is not None:
                where = f"{partial.cluster}/{partial.node}" if partial.node else partial.cluster
                return (
                    Reason.GANG_INCOMPLETE,
                    Blocking("gang_members", job.members, placeable, where),
                    f"Only {placeable} of its {job.members} gang members fit at once (on {where}); "
                    "a gang starts when all of them fit",
                )
    # As capacity.place: a job without a command cannot go to the local executor when another cluster exists.
    elsewhere = any(n.cluster != capacity.LOCAL_CLUSTER for n in nodes)
    eligible = [n for n in nodes if n.cluster != capacity.LOCAL_CLUSTER or job.has_command or not elsewhere] or nodes

    def progress(node: NodeCapacity) -> tuple[int, int]:
        code = node.shortfall(job.cpu_millis, job.memory_bytes, job.gpus, job.members)
        rank = _SHORTFALL_ORDER.index(code) if code in _SHORTFALL_ORDER else -1
        return rank, _free_amount(node, code)

    nearest = max(eligible, key=lambda n: (progress(n), n.cluster, n.name))
    code = nearest.shortfall(job.cpu_millis, job.memory_bytes, job.gpus, job.members) or ""
    where = f"{nearest.cluster}/{nearest.name}"
    n = job.members
    if code == "SLOTS":
        blocking = Blocking("slots", 1, max(nearest.slots - nearest.used_slots, 0), where)
        message = f"No free worker slot: the nearest node, {where}, runs {nearest.used_slots} of {nearest.slots} jobs"
    elif code == "GPUS":
        blocking = Blocking("gpus", job.gpus * n, len(nearest.free_gpus), where)
        message = f"Needs {job.gpus * n} GPU(s); the nearest node, {where}, has {len(nearest.free_gpus)} free"
    elif code == "CPU":
        free = max(nearest.cpu_millis - nearest.used_cpu_millis, 0)
        blocking = Blocking("cpu", format_millis(job.cpu_millis * n), format_millis(free), where)
        message = f"Needs {format_millis(job.cpu_millis * n)} CPU; the nearest node, {where}, has {format_millis(free)} free"
    elif code == "MEMORY":
        free = max(nearest.memory_bytes - nearest.used_memory_bytes, 0)
        blocking = Blocking("memory", format_bytes(job.memory_bytes * n), format_bytes(free), where)
        message = f"Needs {format_bytes(job.memory_bytes * n)} memory; the nearest node, {where}, has {format_bytes(free)} free"
    else:
        blocking = Blocking(code.lower() or "unknown", "", "", where)
        message = f"No node fits it (nearest: {where}, shortfall {code or 'unknown'})"
    return _SHORTFALL_REASONS.get(code, Reason.NO_FITTING_NODE), blocking, message


def _free_amount(node: NodeCapacity, code: str | None) -> int:
    return {
        "SLOTS": node.slots - node.used_slots,
        "GPUS": len(node.free_gpus),
        "CPU": node.cpu_millis - node.used_cpu_millis,
        "MEMORY": node.memory_bytes - node.used_memory_bytes,
    }.get(code or "", 0)


def _estimate(session: Session, queue: str, position: int, now: datetime, retry_at: datetime | None) -> Estimate:
    """position / the queue's recent throughput: a rough guide, not a promise."""
    recent = stats.queue_stats(session, queue, now)
    if not recent.jobs_processed_1h:
        basis = f"No attempt ended in queue {queue} in the last hour: no throughput to estimate from"
        return Estimate(retry_at, None, basis)
    rate = recent.jobs_processed_1h / recent.window_seconds
    wait = position / rate
    start = now + timedelta(seconds=wait)
    if retry_at is not None and retry_at > start:
        start, wait = retry_at, (retry_at - now).total_seconds()
    basis = f"Position {position} / {rate:.4g} attempts ended per second in queue {queue} over the last hour"
    return Estimate(start, round(wait, 1), basis)
