"""Why is my job not running? The scheduler's own policy (app.domain.policy.decide), run read-only.

`explain` loads the same snapshot the scheduler loads (app.domain.scheduling.load_snapshot), runs the
same policy function on it, and reads that job's decision, so the reason it gives is the scheduler's:

- BACKOFF: a retry waits until `retry_at` before it is a candidate again (estimated no earlier).
- QUEUE_CONCURRENCY_LIMIT: its queue already has max_concurrency jobs queued or running.
- NO_NODES: no live node (a worker host or Kubernetes node heartbeating within NODE_LEASE_SECONDS).
- RESERVED: it is the next of its kind to start: `reserved_start_at` on `reserved_nodes`, when what
  runs there ends at the latest (started_at + timeout). Smaller jobs may start before it only if
  they end before that or use capacity it does not need.
- BACKFILL_WINDOW: it fits now but would still run when a reserved job starts; a shorter timeout
  would let it start now (`blocked_by` names the reserved job).
- HIGHER_PRIORITY_AHEAD: a job ahead of it in the same pool (GPU or CPU-only capacity) waits for the
  same capacity first; `blocked_by` names it and its own reason.
- GANG_INCOMPLETE / NO_FREE_SLOTS / INSUFFICIENT_GPUS / INSUFFICIENT_CPU / INSUFFICIENT_MEMORY: what
  the node that came nearest to fitting it lacks (capacity.NodeCapacity.shortfall's codes).
- WAITING_FOR_SCHEDULER: it fits now; the scheduler admits it on its next pass.
- QUOTA_EXCEEDED: its tenant's usage plus the job would exceed a quota plus its borrowing limit
  (`quota` names the resource, the quota and the usage); it holds nothing back.

`fair_share` gives the owner's share and rank among owners with a backlog (equal priorities are
served lowest share first). `estimated_start_at` comes from the plan: the reservation's start, or
the start the policy would reserve for it. It is a snapshot: the answer can change a moment later.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain import capacity, counters, jobs, policy, scheduling
from app.domain.capacity import NodeCapacity
from app.domain.nodes import why_unschedulable
from app.domain.quantities import format_bytes, format_millis
from app.domain.states import TERMINAL, JobStatus
from app.models import FairShareWeightChange, Job, JobEvent, Node
from config import Settings


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
    RESERVED = "RESERVED"
    BACKFILL_WINDOW = "BACKFILL_WINDOW"
    WAITING_FOR_SCHEDULER = "WAITING_FOR_SCHEDULER"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
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
    reserved_start_at: datetime | None = None
    reserved_nodes: list[str] | None = None
    fair_share: dict[str, object] | None = None
    quota: dict[str, str] | None = None  # QUOTA_EXCEEDED: tenant, cluster, resource, quota, borrowing_limit, used, requested


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
    gpu_types: tuple[str, ...] = ()
    pool: str | None = None

    @property
    def order(self) -> tuple[int, datetime, str]:
        return (-self.priority, self.created_at, self.id)


def explain(session: Session, job: Job, settings: Settings, now: datetime | None = None, plans: PlanCache | None = None) -> Explanation:
    """Why `job` (already authorized by the caller) is where it is; `plans` shares recent plans between calls."""
    now = now or jobs.utcnow()
    status = JobStatus(job.status)
    if status is JobStatus.PENDING:
        return _explain_pending(session, job, settings, now, plans)
    base = dict(job_id=job.id, status=job.status, queue=job.queue, cluster=job.cluster, node=jobs.placed_nodes(job), attempt=job.retry_count)
    if status is JobStatus.QUEUED:
        return Explanation(
            reason=Reason.WAITING_FOR_WORKER, since=job.queued_at,
            message=f"Placed on {jobs.placement_summary(job)}; waiting for its worker to start it", **base,
        )
    if status is JobStatus.RUNNING:
        return Explanation(
            reason=Reason.RUNNING, since=job.started_at, worker_id=job.worker_id,
            message=f"Running on {jobs.placement_summary(job)} (worker {job.worker_id}, attempt {job.retry_count})", **base,
        )
    assert status in TERMINAL
    return Explanation(
        reason=Reason(status.value.upper()), since=job.completed_at, exit_code=job.exit_code, worker_id=job.worker_id,
        message=job.status_reason or status.value, **base,
    )


class PlanCache:
    """The last plan, shared by the explain calls of one API process (a plan costs a scheduler pass: tens of
    milliseconds with a big backlog). It is reused while no job changed state (the newest event id is the same)
    and no node registered, for at most `ttl_seconds`: only a node's death can be that much older than the answer."""

    def __init__(self, ttl_seconds: float = 1.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()
        self._made_at = -math.inf
        self._version: tuple[object, ...] | None = None
        self._entry: tuple[policy.Snapshot, policy.Plan] | None = None
        self._rows = scheduling.SnapshotCache()  # used under the lock only

    def get(self, session: Session, settings: Settings, now: datetime) -> tuple[policy.Snapshot, policy.Plan]:
        version = tuple(session.execute(select(
            select(func.max(JobEvent.id)).scalar_subquery(),
            select(func.count()).select_from(Node).scalar_subquery(),
            select(func.max(Node.started_at)).scalar_subquery(),
            select(func.max(FairShareWeightChange.id)).scalar_subquery(),  # an admin changed a weight
        )).one())
        with self._lock:
            if self._entry is None or version != self._version or time.monotonic() - self._made_at > self.ttl_seconds:
                snapshot = scheduling.load_snapshot(session, settings, now, cache=self._rows)
                self._entry = (snapshot, policy.decide(snapshot, scheduling.policy_config(settings)))
                self._made_at, self._version = time.monotonic(), version
            return self._entry


def _explain_pending(session: Session, job: Job, settings: Settings, now: datetime, plans: PlanCache | None = None) -> Explanation:
    position = jobs.queue_position(session, job)
    retry_at = job.not_before if job.not_before and job.not_before > now else None

    bound = capacity.describe_constraint(job.gpu_types or (), job.pool) if job.gpu_types or job.pool is not None else None

    def answer(reason: Reason, message: str, estimate: Estimate | None = None, **extra: object) -> Explanation:
        if bound is not None:
            message = f"{message.rstrip('.')}. It runs only on a node that {bound}"
        return Explanation(
            job_id=job.id, status=job.status, reason=reason, message=message, queue=job.queue, queue_position=position,
            retry_at=retry_at, estimate=estimate or Estimate(None, None, "No start can be estimated now"),
            attempt=job.retry_count, **extra,  # type: ignore[arg-type]
        )

    def at(start: float, basis: str) -> Estimate:
        when = max(datetime.fromtimestamp(start, tz=timezone.utc), retry_at or now)
        return Estimate(when, round((when - now).total_seconds(), 1), basis)

    if retry_at is not None:
        return answer(
            Reason.BACKOFF, f"Retry {job.retry_count} of {job.max_retries} waits for its backoff until {retry_at.isoformat()}",
            Estimate(retry_at, round((retry_at - now).total_seconds(), 1), "No earlier than the end of its backoff"),
        )
    counts = counters.counts_by_queue_and_status(session)
    active = {q: c.get(JobStatus.QUEUED.value, 0) + c.get(JobStatus.RUNNING.value, 0) for q, c in counts.items()}
    full = _queue_full(settings, job.queue, active)
    if full:
        return answer(Reason.QUEUE_CONCURRENCY_LIMIT, full)
    snapshot, plan = plans.get(session, settings, now) if plans is not None else (None, None)
    decision = plan.decisions.get(job.id) if plan is not None else None
    if decision is None and plan is not None and snapshot is not None and job.pending_since.timestamp() <= snapshot.now:
        # In the backlog when the plan was made, yet not among the jobs the scheduler considers: pruned.
        return answer(
            Reason.HIGHER_PRIORITY_AHEAD,
            f"Many jobs are ahead of it: the scheduler considers the first {scheduling.BACKLOG_PER_OWNER} of each owner's "
            f"backlog and the first {scheduling.BACKLOG_PER_POOL} of each pool in a pass, and this is not among them yet",
            _after_reservations(plan, _pending_of(job), lambda start, basis: at(start, basis)),
        )
    if decision is None:
        # Not in the shared plan (pruned, or newer than it): plan again with this job in.
        snapshot = scheduling.load_snapshot(session, settings, now, include=job.id)
        if snapshot.nodes:
            plan = policy.decide(dataclasses.replace(snapshot, focus=job.id), scheduling.policy_config(settings))
            decision = plan.decisions.get(job.id)
    assert snapshot is not None
    if not snapshot.nodes:
        held_back = why_unschedulable(session, capacity.node_alive_since(now, settings.node_lease_seconds))
        return answer(Reason.NO_NODES, held_back or f"No live node: none has heartbeated in the last {settings.node_lease_seconds:g}s")
    assert plan is not None  # planned above whenever a node is live
    share = plan.shares.get(job.tenant or job.owner)
    fair = None if share is None else {
        "owner": share.owner, "weight": share.weight, "share": round(share.share, 6), "rank": share.rank,
        "owners_waiting": sum(1 for s in plan.shares.values() if s.rank),
    }
    extra: dict[str, object] = {"fair_share": fair}
    if decision is None:
        return answer(Reason.HIGHER_PRIORITY_AHEAD, "The scheduler does not consider it yet: many jobs are ahead of it", **extra)
    pending = decision.job
    if isinstance(decision, policy.Admit):
        placement = decision.placement
        where = f"{placement.cluster}/{placement.node}" if placement.node else placement.cluster
        return answer(Reason.WAITING_FOR_SCHEDULER, f"It fits on {where} now; the scheduler admits it on its next pass",
                      Estimate(now, 0.0, "It fits now"), **extra)
    if isinstance(decision, policy.Reserve):
        start = datetime.fromtimestamp(decision.start_at, tz=timezone.utc)
        nodes = [f"{decision.cluster}/{name}" for name in decision.nodes]
        return answer(
            Reason.RESERVED,
            f"Reserved: it starts on {', '.join(nodes)} by {start.isoformat()} at the latest, when what runs there "
            "reaches its timeout; smaller jobs start before it only if they cannot delay it",
            at(decision.start_at, "The reservation: the running jobs' ends (started_at + timeout)"),
            reserved_start_at=start, reserved_nodes=nodes, **extra,
        )
    if isinstance(decision, policy.Fail):
        return answer(Reason.NO_FITTING_NODE, decision.reason, **extra)
    estimate = at(decision.estimated_start_at, "The start the scheduler would reserve for it, from the running jobs' ends") \
        if decision.estimated_start_at is not None else _after_reservations(plan, pending, at)
    if decision.reason == policy.QUEUE_FULL:
        return answer(Reason.QUEUE_CONCURRENCY_LIMIT, decision.message, **extra)
    if decision.reason == policy.QUOTA_EXCEEDED:
        return answer(Reason.QUOTA_EXCEEDED, decision.message, quota=decision.quota.as_dict() if decision.quota else None, **extra)
    if decision.reason == policy.NO_NODES:
        return answer(Reason.NO_NODES, decision.message, **extra)
    if decision.reason == policy.NOT_EXAMINED:
        return answer(Reason.HIGHER_PRIORITY_AHEAD, decision.message, **extra)
    if decision.reason == policy.BACKFILL_WINDOW:
        blocked_by = _blocked_by(plan, decision.blocked_by, Reason.RESERVED, "It holds a reservation")
        return answer(Reason.BACKFILL_WINDOW, decision.message, estimate, blocked_by=blocked_by, **extra)
    if decision.blocked_by:
        ahead = plan.decisions.get(decision.blocked_by)
        if ahead is not None:
            reason, blocking, message = _diagnose(plan.free, _candidate(ahead.job))
            if isinstance(ahead, policy.Reserve):
                reason, message = Reason.RESERVED, f"reserved to start by {datetime.fromtimestamp(ahead.start_at, tz=timezone.utc).isoformat()}"
            blocked_by = BlockedBy(ahead.job.id, ahead.job.priority, ahead.job.queue, reason, message)
            return answer(
                Reason.HIGHER_PRIORITY_AHEAD,
                f"Job {ahead.job.id} (priority {ahead.job.priority}) is ahead of it for the same capacity and cannot start: {message}",
                estimate, blocked_by=blocked_by, blocking=blocking, **extra,
            )
    reason, blocking, message = _diagnose(plan.free, _candidate(pending))
    if decision.reason == policy.NEVER_FITS_LIVE:
        message += "; no live node could hold it even empty, so it holds nothing back"
    elif decision.reason == policy.NO_RESERVATION:
        message += "; what holds that capacity has no timeout, so no start can be promised"
    return answer(reason, message, estimate, blocking=blocking, **extra)


def _after_reservations(plan: policy.Plan, job: policy.Pending, at: Callable[[float, str], Estimate]) -> Estimate | None:
    """Beyond its pool's reservations: no earlier than the last of them."""
    starts = [r.start_at for r in plan.reserved if r.job.pool == job.pool]
    if not starts:
        return None
    return at(max(starts), f"No earlier than the last of the {len(starts)} reservation(s) ahead of it for the same capacity")


def _pending_of(job: Job) -> policy.Pending:
    members = job.gang_min_members if job.gang_enabled else 1
    return policy.Pending(job.id, job.tenant or job.owner, job.priority, job.queue, job.created_at.timestamp(), job.cpu_millis,
                          job.memory_bytes, job.gpus, members, bool(job.command), job.timeout_seconds,
                          tuple(job.gpu_types or ()), job.pool)


def _candidate(job: policy.Pending) -> _Candidate:
    created = datetime.fromtimestamp(job.submitted_at, tz=timezone.utc)
    return _Candidate(job.id, job.queue, job.priority, created, job.cpu_millis, job.memory_bytes, job.gpus, job.members, job.has_command,
                      job.gpu_types, job.node_pool)


def _blocked_by(plan: policy.Plan, job_id: str | None, reason: Reason, message: str) -> BlockedBy | None:
    ahead = plan.decisions.get(job_id or "")
    if ahead is None:
        return None
    if isinstance(ahead, policy.Reserve):
        message = f"reserved to start by {datetime.fromtimestamp(ahead.start_at, tz=timezone.utc).isoformat()}"
    return BlockedBy(ahead.job.id, ahead.job.priority, ahead.job.queue, reason, message)


def _queue_full(settings: Settings, queue: str, active: dict[str, int]) -> str | None:
    config = settings.queue_named(queue)
    limit = config.max_concurrency if config else 0
    running = active.get(queue, 0)
    if running < limit:
        return None
    if config is None:
        return f"Queue {queue} is not configured (JOB_QUEUES); its jobs are never admitted"
    return f"Queue {queue} has {running} of {limit} jobs queued or running (max_concurrency)"


def _place(nodes: list[NodeCapacity], job: _Candidate, members: int | None = None) -> capacity.Placement | None:
    return capacity.place(nodes, job.cpu_millis, job.memory_bytes, job.gpus, members or job.members, has_command=job.has_command,
                          gpu_types=job.gpu_types, pool=job.pool)


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
    if job.gpu_types or job.pool is not None:
        # A job bound to GPU types or a pool waits for those nodes only: diagnose among them.
        serving = [n for n in eligible if n.serves(job.gpu_types, job.pool)]
        if not serving:
            return (Reason.NO_FITTING_NODE, Blocking("gpu_type" if job.gpu_types else "pool", ", ".join(job.gpu_types) or job.pool or "", 0, None),
                    f"No live node {capacity.describe_constraint(job.gpu_types, job.pool)}")
        eligible = serving

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
