"""The job lifecycle as seen by its submitter: submit, read, list, cancel.

Each verb that changes a job is one transaction: it locks the row, checks the transition against
`states.ALLOWED_TRANSITIONS`, writes the new state and its event row, and commits together.
"""
from __future__ import annotations

import logging
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db import GENERIC_INDEXED_PLAN, Prepared, fetch_in_transaction, first_line, is_connection_error, retried_on_disconnect, transaction
from app.domain import capacity, counters, idempotency, quotas
from app.domain.idempotency import IdempotencyKey
from app.domain.callers import Caller
from app.domain.errors import Conflict, InvalidRequest, NotFound
from app.domain.states import TERMINAL, JobStatus, can_transition
from app.models import Job, JobEvent
from config import Settings

SCHEDULER_CHANNEL = "jobservice_scheduler"
SUBMIT_WAKEUP = "submit"  # the payload of a submit's NOTIFY (the scheduler spaces the passes they alone ask for)
POSITION_SAVEPOINT = "submit_position"
FieldNamer = Callable[[int, str], str]  # (item index, field) -> the name an error gives it: `jobs.3.resources`
log = logging.getLogger("jobservice.jobs")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return f"job-{secrets.token_hex(6)}"


@dataclass(frozen=True)
class JobRequest:
    """A validated submission, resources already in canonical units."""

    job_type: str
    priority: int
    image: str | None
    config: dict[str, Any]
    resources: dict[str, Any]
    cpu_millis: int
    memory_bytes: int
    gpus: int
    gang_enabled: bool = False
    gang_min_members: int = 1
    timeout_seconds: int | None = None
    max_retries: int = 0
    backoff_multiplier: float = 2.0
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    gpu_types: tuple[str, ...] = ()  # acceptable GPU models, preferred first; empty: any
    pool: str | None = None  # the worker pool that must run it; None: any
    preemptible: bool = True

    @property
    def members(self) -> int:
        return self.gang_min_members if self.gang_enabled else 1


@dataclass(frozen=True)
class JobFilters:
    status: str | None = None
    job_type: str | None = None
    priority_min: int = 0
    limit: int = 50
    offset: int = 0


def notify_scheduler(session: Session, reason: str) -> None:
    """Wake the schedulers. NOTIFY is delivered only when the transaction commits."""
    session.execute(text("SELECT pg_notify(:channel, :reason)"), {"channel": SCHEDULER_CHANNEL, "reason": reason})


def placed_nodes(job: Job) -> str | None:
    """The node(s) the job's members were placed on: one name, or "a,b" for a gang spread over several
    (job.node is None then; the placement lists every part)."""
    if job.node:
        return job.node
    names = [str(part["node"]) for part in job.placement or [] if isinstance(part, dict) and part.get("node")]
    return ",".join(dict.fromkeys(names)) or None


def placement_summary(job: Job) -> str:
    """Where the job runs, for people: `cluster/node`, or every node of a spread gang with its members."""
    parts = [part for part in job.placement or [] if isinstance(part, dict) and part.get("node")]
    if job.node or len(parts) <= 1:
        return f"{job.cluster}/{placed_nodes(job)}"
    return ", ".join(f"{job.cluster}/{p['node']} ({p.get('members', 1)} member{'s' if p.get('members', 1) != 1 else ''})"
                     for p in parts)


def record_transition(
    session: Session,
    job: Job,
    target: JobStatus,
    *,
    reason: str,
    actor: str,
    at: datetime | None = None,
    exit_code: int | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Move a locked job to `target` and write the event; the caller's transaction commits both."""
    if not can_transition(job.status, target):
        raise Conflict(f"job {job.id} is {job.status}; it cannot become {target.value}")
    at = at or utcnow()
    session.add(
        JobEvent(
            job_id=job.id,
            at=at,
            from_status=job.status,
            to_status=target.value,
            reason=reason,
            actor=actor,
            attempt=job.retry_count,
            worker_id=job.worker_id,
            cluster=job.cluster,
            node=placed_nodes(job),
            exit_code=exit_code,
            details=details or {},
        )
    )
    job.status = target.value
    job.status_reason = reason
    job.updated_at = at
    if target is JobStatus.PENDING:
        job.pending_since = at  # back in the backlog: its wait (GET /queues/, explain) starts again


@dataclass
class Submitted:
    """A job as its submit answers it (the same fields whether created now or replayed)."""

    id: str
    job_type: str
    priority: int
    queue: str
    status: str
    created_at: datetime
    queue_position: int | None = None
    replayed: bool = False  # the answer of an earlier request with the same Idempotency-Key

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "job_type": self.job_type, "priority": self.priority, "queue": self.queue,
            "status": self.status, "created_at": self.created_at.isoformat(), "queue_position": self.queue_position,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Submitted":
        return cls(**{**data, "created_at": datetime.fromisoformat(data["created_at"])})


@dataclass(frozen=True)
class Submission:
    jobs: list[Submitted]
    replayed: bool = False  # the answer of an earlier request with the same Idempotency-Key


# One statement, one round trip, whatever the number of jobs: the rows travel as one JSON array, the
# events are written from the inserted rows. Core SQL: the ORM's unit of work cost more than the INSERTs.
_INSERT_JOBS = text(
    """
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
            id text, job_type text, priority integer, queue text, image text, command jsonb, env jsonb, config jsonb,
            resources jsonb, cpu_millis bigint, memory_bytes bigint, gpus integer, gang_enabled boolean,
            gang_min_members integer, timeout_seconds integer, max_retries integer, backoff_multiplier double precision,
            created_at timestamptz, gpu_types text[], pool text, preemptible boolean)
    ), j AS (
        INSERT INTO jobs (id, owner, tenant, job_type, priority, queue, status, status_reason, image, command, env, config,
                          resources, cpu_millis, memory_bytes, gpus, gpu_types, pool, gang_enabled, gang_min_members,
                          timeout_seconds, max_retries, backoff_multiplier, preemptible, retry_count, created_at, updated_at,
                          pending_since)
        SELECT id, :owner, :tenant, job_type, priority, queue, 'pending', 'submitted', image, command, env, config,
               resources, cpu_millis, memory_bytes, gpus, gpu_types, pool, gang_enabled, gang_min_members,
               timeout_seconds, max_retries, backoff_multiplier, preemptible, 0, created_at, created_at, created_at
        FROM r
        RETURNING id, created_at
    )
    INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor, attempt, details)
    SELECT id, created_at, NULL, 'pending', 'submitted', :owner, 0, '{}'::jsonb FROM j
    """
)


# Read in the same round trip as the INSERT: what a submit checks against (why_never_fits) is the nodes alone.
# Every known node, ready or not: a node NotReady for a moment must not turn a valid job away. One row at
# least (node columns null when there is none), carrying whether the tenant has a quota at all: most have
# none, and their submits then skip the quota check's own round trip.
_READ_NODES = (
    "SELECT q.has_quota, n.cluster, n.name, n.gpu_indices, n.gpu_type, n.cpu_millis, n.memory_bytes, n.slots, n.pool "
    "FROM (SELECT EXISTS (SELECT 1 FROM quotas WHERE tenant = :quota_tenant) AS has_quota) AS q LEFT JOIN nodes AS n ON true"
)
# A submit's one round trip before its COMMIT: the INSERT, the savepoint that keeps the jobs if the reads
# after it fail (see _fill_positions), then the nodes and the first job's queue position (counters) in one
# SELECT. Built once: parsing a statement's text for its parameters was ~3% of a submit's CPU.
_READ_NODES_AND_POSITION = (
    "SELECT q.has_quota, p.higher, p.same, p.behind, n.cluster, n.name, n.gpu_indices, n.gpu_type, n.cpu_millis, "
    "n.memory_bytes, n.slots, n.pool "
    "FROM (SELECT EXISTS (SELECT 1 FROM quotas WHERE tenant = :quota_tenant) AS has_quota) AS q "
    f"CROSS JOIN ({counters.NEW_POSITION_SQL}) AS p LEFT JOIN nodes AS n ON true"
)
_READ_NODES_ALONE = text(_READ_NODES)
# Prepared, with a generic plan: a custom plan weighed the twelve indexes of `jobs` on every submit, and planning cost
# PostgreSQL more than running the reads (0.6 of 1.1 ms per submit). Its one choice, the scan of `jobs` for the jobs
# behind the new one, is made with sequential scans ruled out (GENERIC_INDEXED_PLAN): a plan made while `jobs` was
# empty walks the admission order from the new job all the same.
SUBMIT_READS = Prepared(
    "jobservice_submit_reads", _READ_NODES_AND_POSITION,
    {"quota_tenant": "text", "queue": "text", "priority": "integer", "created_at": "timestamptz", "id": "text",
     "scan_limit": "integer"},
    plan=GENERIC_INDEXED_PLAN,
)


# The INSERT is prepared once per database session: planning it took about as much PostgreSQL CPU as running it
# (psycopg2 prepares nothing), and its plan has no choice to get wrong (a function scan into two inserts).
INSERT = Prepared("jobservice_submit_insert", _INSERT_JOBS.text, {"rows": "jsonb", "owner": "text", "tenant": "text"})
# The plan's settings (SET LOCAL) last until the submit's transaction ends: what it runs after the reads (a quota check,
# an Idempotency-Key's row, a batch's other positions) is planned with them too, index scans where one serves.
_INSERT_READ_NODES_AND_POSITION = text(f"{INSERT.execute_sql}; SAVEPOINT {POSITION_SAVEPOINT}; {SUBMIT_READS.run_sql}")
# The same with the scheduler's wake-up, delivered by the commit (app.wakeup: a lone submit after a quiet spell).
_INSERT_NOTIFY_READ_NODES_AND_POSITION = text(
    f"{INSERT.execute_sql}; SELECT pg_notify('{SCHEDULER_CHANNEL}', '{SUBMIT_WAKEUP}'); SAVEPOINT {POSITION_SAVEPOINT}; "
    f"{SUBMIT_READS.run_sql}")


_POSITION_FAILED = -1  # the first position's read failed: none is answered


def insert_pending(
    session: Session, caller: Caller, requests: list[JobRequest], settings: Settings, field: FieldNamer,
    *, wake_at_commit: bool = False,
) -> list[Submitted]:
    """Write the jobs and their `submitted` events in the caller's transaction (which commits, or not); with
    `wake_at_commit`, and the NOTIFY that wakes the schedulers when it commits (app.wakeup).

    Raises InvalidRequest (the caller's transaction must then roll back) for any job that no known
    node could ever run, even empty: `field(index, "resources")` names each.
    """
    now = utcnow()
    jobs: list[Submitted] = []
    rows = []
    for index, request in enumerate(requests):
        # A microsecond apart: a batch is admitted in its order within a priority (admission is by age, then id).
        created_at = now + timedelta(microseconds=index)
        job = Submitted(new_job_id(), request.job_type, request.priority, settings.queue_for_priority(request.priority).name,
                        JobStatus.PENDING.value, created_at)
        jobs.append(job)
        rows.append(
            {
                "id": job.id, "job_type": request.job_type, "priority": request.priority, "queue": job.queue,
                "image": request.image, "command": request.command, "env": request.env, "config": request.config,
                "resources": request.resources, "cpu_millis": request.cpu_millis, "memory_bytes": request.memory_bytes,
                "gpus": request.gpus, "gang_enabled": request.gang_enabled, "gang_min_members": request.gang_min_members,
                "timeout_seconds": request.timeout_seconds, "max_retries": request.max_retries,
                "backoff_multiplier": request.backoff_multiplier, "created_at": created_at.isoformat(),
                "gpu_types": list(request.gpu_types) or None, "pool": request.pool, "preemptible": request.preemptible,
            }
        )
    # Three statements, one round trip (psycopg2 sends them as one query; the result is the last one's).
    first = jobs[0]
    params = {"rows": json.dumps(rows, ensure_ascii=False), "owner": caller.sub, "tenant": caller.tenant,
              "quota_tenant": caller.fair_share_owner, "queue": first.queue, "priority": first.priority,
              "created_at": first.created_at, "id": first.id, "scan_limit": counters.SAME_PRIORITY_SCAN_LIMIT + 1}
    try:
        INSERT.ensure(session.connection())
        SUBMIT_READS.ensure(session.connection())
        statement = _INSERT_NOTIFY_READ_NODES_AND_POSITION if wake_at_commit else _INSERT_READ_NODES_AND_POSITION
        node_rows = fetch_in_transaction(session, statement, params)
        first.queue_position = counters.new_position_from(session, node_rows[0], first.queue, first.priority,
                                                          first.created_at, first.id)
    except Exception as exc:
        if is_connection_error(exc):
            raise
        try:
            # Set after the INSERT ran: the jobs are kept. If the INSERT itself failed there is no savepoint,
            # this fails too, and the INSERT's own error is what the caller gets (nothing is committed).
            session.execute(text(f"ROLLBACK TO SAVEPOINT {POSITION_SAVEPOINT}"))
        except Exception:
            raise exc from None
        log.warning("queue positions of %s not computed; answering without them: %s", first.id, first_line(exc),
                    extra={"job_id": first.id})
        first.queue_position = _POSITION_FAILED
        node_rows = session.execute(_READ_NODES_ALONE, {"quota_tenant": caller.fair_share_owner}).all()
    nodes = [
        capacity.NodeCapacity(r.cluster, r.name, sorted(int(g) for g in r.gpu_indices), r.gpu_type, r.cpu_millis,
                              r.memory_bytes, r.slots, pool=r.pool)
        for r in node_rows
        if r.name is not None
    ]
    _check_schedulable(nodes, requests, field, settings.job_pools)
    if node_rows[0].has_quota:
        _check_quota(session, caller, requests, field)
    return jobs


def _check_quota(session: Session, caller: Caller, requests: list[JobRequest], field: FieldNamer) -> None:
    """400 for any request that alone exceeds its tenant's quota plus borrowing limit (each shape checked once)."""
    checked: set[tuple[int, int, int, int]] = set()
    for index, request in enumerate(requests):
        shape = (request.cpu_millis, request.memory_bytes, request.gpus, request.members)
        if shape in checked:
            continue
        checked.add(shape)
        try:
            quotas.check_submit(session, caller.fair_share_owner, *shape)
        except InvalidRequest as error:
            raise InvalidRequest(error.message, [{**d, "field": field(index, "resources")} for d in error.details]) from None


def _check_schedulable(
    nodes: list[capacity.NodeCapacity], requests: list[JobRequest], field: FieldNamer, scalable_pools: Sequence[str]
) -> None:
    """400 for any request no known node could ever run, even empty (each distinct shape checked once)."""
    verdicts: dict[tuple[Any, ...], str | None] = {}
    problems = []
    for index, request in enumerate(requests):
        shape = (request.cpu_millis, request.memory_bytes, request.gpus, request.members, bool(request.command),
                 tuple(request.gpu_types), request.pool)
        if shape not in verdicts:
            verdicts[shape] = capacity.never_fits(
                nodes, *shape[:4], has_command=shape[4], gpu_types=shape[5], pool=shape[6], scalable_pools=scalable_pools
            )
        problem = verdicts[shape]
        if problem:
            name = "resources"
            if problem.startswith("no known node"):  # no node of its GPU type / pool at all
                name = "resources.gpu_type" if request.gpu_types else "resources.pool"
            problems.append({"field": field(index, name), "message": problem})
    if problems:
        raise InvalidRequest("Job can never be scheduled", problems)


def submit_many(
    session: Session,
    caller: Caller,
    requests: list[JobRequest],
    settings: Settings,
    *,
    key: IdempotencyKey | None = None,
    field: FieldNamer = lambda index, name: f"jobs.{index}.{name}",
    wake_at_commit: bool = False,
) -> Submission:
    """Create all the jobs or none, in one transaction; with `key`, at most once per caller and key.

    The scheduler is notified here only with `wake_at_commit` (a NOTIFY serialises the commits of concurrent
    submits: app.wakeup decides when one may carry it); else the caller wakes it after the commit. Its interval
    tick is the guarantee.

    A connection that turns out dead before the COMMIT was sent is retried once on a new one: nothing was
    committed, so nothing can be created twice. That lets the pool skip its pre-ping round trip for a connection
    in use a moment ago (app.db.retried_on_disconnect). A connection lost during the COMMIT is not retried:
    whether it committed is unknown, and the client's retry (with its Idempotency-Key) decides.
    """
    with retried_on_disconnect():
        try:
            return _submit_once(session, caller, requests, settings, key, field, wake_at_commit)
        except _LostBeforeCommit as lost:
            log.info("a submit met a dropped database connection before its commit; retrying it on a new one: %s",
                     first_line(lost.error))
    # Outside the block: the retry's connection is pinged before use, as the rest of the pool may be as dead as the one
    # it met (a database restart ends every session).
    try:
        return _submit_once(session, caller, requests, settings, key, field, wake_at_commit)
    except _LostBeforeCommit as again:
        raise again.error from None


class _LostBeforeCommit(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _submit_once(
    session: Session, caller: Caller, requests: list[JobRequest], settings: Settings, key: IdempotencyKey | None,
    field: FieldNamer, wake_at_commit: bool,
) -> Submission:
    committing = False
    try:
        with transaction(session):
            now = utcnow()
            if key is not None:
                stored = idempotency.find(session, caller.sub, key, now)
                if stored is not None:
                    return _replay(stored)
            jobs = insert_pending(session, caller, requests, settings, field, wake_at_commit=wake_at_commit)
            # The answer is computed before the commit: after it, nothing may turn a created job into an error
            # (a client that retries a 500 would submit it twice).
            _fill_positions(session, jobs)
            if key is not None:
                answer = idempotency.Stored(201, {"jobs": [job.as_json() for job in jobs]})
                idempotency.remember(session, caller.sub, key, answer, now, settings.idempotency_key_ttl_seconds)
            committing = True  # the block's end sends the COMMIT
            return Submission(jobs)
    except idempotency.KeyTaken:
        # A racing request with this key committed first: our jobs rolled back; answer what it answered.
        with transaction(session):
            stored = idempotency.find(session, caller.sub, key, utcnow())  # type: ignore[arg-type]
        if stored is None:  # pragma: no cover - it committed, so it is there (and not yet expired)
            raise Conflict("Idempotency-Key is being used by another request; retry")
        return _replay(stored)
    except Exception as exc:
        if not committing and is_connection_error(exc):
            raise _LostBeforeCommit(exc) from exc
        raise


def submit(
    session: Session, caller: Caller, request: JobRequest, settings: Settings, *, key: IdempotencyKey | None = None,
    wake_at_commit: bool = False,
) -> Submitted:
    submission = submit_many(session, caller, [request], settings, key=key, field=lambda _index, name: name,
                             wake_at_commit=wake_at_commit)
    return submission.jobs[0]


def _replay(stored: idempotency.Stored) -> Submission:
    return Submission([Submitted.from_json({**job, "replayed": True}) for job in stored.response["jobs"]], replayed=True)


def _fill_positions(session: Session, jobs: list[Submitted]) -> None:
    """Queue positions inside the submit's transaction: one read per (queue, priority) of the batch, the first
    one already made with the INSERT (insert_pending).

    Jobs of one batch with the same queue and priority follow each other in admission order (their
    created_at are a microsecond apart), so the next one's position is the previous one's plus one.
    A savepoint keeps a failed read (a cancelled statement, a timeout) from aborting the write it answers:
    positions are then None (logged). It is set in the INSERT's round trip, and released by the commit.
    A dropped connection still fails the whole transaction.
    """
    if jobs[0].queue_position == _POSITION_FAILED:
        for job in jobs:
            job.queue_position = None
        return
    firsts: dict[tuple[str, int], int] = {(jobs[0].queue, jobs[0].priority): int(jobs[0].queue_position or 0) - 1}
    try:
        for job in jobs:
            group = (job.queue, job.priority)
            if group in firsts:
                firsts[group] += 1
            else:
                firsts[group] = counters.new_job_position(session, job.queue, job.priority, job.created_at, job.id)
            job.queue_position = firsts[group]
    except Exception as exc:
        if is_connection_error(exc):
            raise
        session.execute(text(f"ROLLBACK TO SAVEPOINT {POSITION_SAVEPOINT}"))
        log.warning("queue positions of %s not computed; answering without them: %s", jobs[0].id, first_line(exc),
                    extra={"job_id": jobs[0].id})
        for job in jobs:
            job.queue_position = None


def _visible(caller: Caller):  # type: ignore[no-untyped-def]
    return True if caller.is_admin else Job.owner == caller.sub


def get(session: Session, caller: Caller, job_id: str) -> Job:
    """A job the caller may see; another user's job is indistinguishable from a missing one."""
    job = session.scalars(select(Job).where(Job.id == job_id, _visible(caller))).first()
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    return job


def current_status(session: Session, job_id: str) -> str:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise NotFound(f"Job {job_id} not found")
    return status


def list_jobs(session: Session, caller: Caller, filters: JobFilters) -> tuple[list[Job], int]:
    conditions = [_visible(caller), Job.priority >= filters.priority_min]
    if filters.status:
        conditions.append(Job.status == filters.status)
    if filters.job_type:
        conditions.append(Job.job_type == filters.job_type)
    if caller.is_admin and not filters.job_type:
        # Everyone's jobs: the counters answer without counting a million rows.
        total = counters.count_jobs(session, filters.status, filters.priority_min)
    else:
        total = session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0
    items = session.scalars(
        select(Job)
        .where(*conditions)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(filters.limit)
        .offset(filters.offset)
    ).all()
    return list(items), total


def queue_position(session: Session, job: Job) -> int | None:
    """1-based rank of a pending job among its queue's pending jobs, in admission order."""
    if job.status != JobStatus.PENDING:
        return None
    # A COUNT(*) of the rows ahead took ~250 ms with 750,000 pending in the queue; the counters and
    # short scans make a fresh submit's rank ~2 ms (benchmarks/queue_endpoints.py).
    return counters.pending_position(session, job.queue, job.priority, job.created_at, job.id)


def cancel(session: Session, caller: Caller, job_id: str) -> Job:
    with transaction(session):
        job = session.scalars(select(Job).where(Job.id == job_id, _visible(caller)).with_for_update()).first()
        if job is None:
            raise NotFound(f"Job {job_id} not found")
        if JobStatus(job.status) in TERMINAL:
            raise Conflict(f"Job {job_id} is already {job.status}")
        now = utcnow()
        if job.status != JobStatus.RUNNING:
            # Nothing runs yet: its resources are free now. A running job keeps them until its
            # worker has stopped the processes (see execution.end).
            job.holds_resources = False
        record_transition(session, job, JobStatus.CANCELLED, reason=f"cancelled by {caller.sub}", actor=caller.sub, at=now)
        job.cancelled_at = now
        job.completed_at = now
        notify_scheduler(session, "cancel")
    return job


def clear_placement(job: Job) -> None:
    """The job goes back to the backlog: no node, no GPUs, and its old task becomes stale."""
    job.node = None
    job.cluster = None
    job.gpu_indices = None
    job.placement = None
    job.holds_resources = False
    job.dispatch_token = None
    job.worker_id = None
    job.heartbeat_at = None
