"""The job lifecycle as seen by a worker: claim, heartbeat, end; and the worker's node registration."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db import Prepared, run_alone, transaction
from app.domain.capacity import LOCAL_CLUSTER
from app.domain.jobs import SCHEDULER_CHANNEL, clear_placement, notify_scheduler, placed_nodes, record_transition, utcnow
from app.domain.scheduling import end_attempt
from app.domain.states import JobStatus
from app.models import Job, JobEvent, Node
from config import Settings


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run one attempt of a job: plain data, no ORM object.
    Its fields are those of the executors' JobSpec, which is built from it field for field."""

    job_id: str
    attempt: int
    image: str | None
    command: list[str] | None
    env: dict[str, str]
    config: dict[str, Any]
    cpu_millis: int
    memory_bytes: int
    gpus: int
    members: int
    timeout_seconds: int | None
    cluster: str
    node: str | None
    gpu_indices: list[int]
    gpu_type: str | None = None  # of the nodes it was placed on, when they share one (Kubernetes: node selector)
    nodes: list[str] = field(default_factory=list)  # every node of its placement (a Kubernetes gang may span several)


def claim(
    session: Session,
    job_id: str,
    dispatch_token: str,
    worker_id: str,
    now: datetime | None = None,
    *,
    claim_id: str | None = None,
) -> ClaimedJob | None:
    """queued -> running for this admission's task; None for a duplicate or stale delivery.

    `claim_id` names this delivery's claim, so that a retry whose earlier try committed unacknowledged
    (the connection dropped during the commit) gets the job back instead of ignoring its own claim.
    """
    now = now or utcnow()
    claimed = _claim_queued(session, job_id, dispatch_token, worker_id, now, claim_id)
    if claimed is not None:
        return claimed
    # Not queued under this token: a stale or duplicate delivery, or a retry whose earlier try committed.
    with transaction(session):
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.dispatch_token != dispatch_token:
            return None
        if job.status == JobStatus.RUNNING.value and claim_id is not None and job.worker_id == worker_id:
            claimed = _claim_event(session, job_id, dispatch_token, job.retry_count)
            return _claimed(session, job) if claimed is not None and claimed.details.get("claim") == claim_id else None
        if job.status != JobStatus.QUEUED.value:
            return None
        job.worker_id = worker_id
        record_transition(
            session, job, JobStatus.RUNNING, reason=f"started by {worker_id}", actor=worker_id, at=now,
            details={"dispatch_token": dispatch_token, **({"claim": claim_id} if claim_id else {})},
        )
        job.started_at = now
        job.heartbeat_at = now
        return _claimed(session, job)


# The node(s) an event names, as jobs.placed_nodes computes it: the job's node, else every node of its
# placement in order, once each (a Kubernetes gang spread over several).
_EVENT_NODE = """COALESCE(u.node, (SELECT string_agg(p.name, ',' ORDER BY p.first) FROM (
        SELECT part->>'node' AS name, min(ord) AS first
        FROM jsonb_array_elements(CASE WHEN jsonb_typeof(u.placement) = 'array' THEN u.placement ELSE '[]'::jsonb END)
             WITH ORDINALITY AS t(part, ord)
        WHERE COALESCE(part->>'node', '') <> '' GROUP BY 1) p))"""

# The claim of a queued job in one round trip (the hot path of every job): the compare-and-set on the
# dispatch token and the `running` event in one statement, in one transaction, as `claim` writes them. Prepared
# (app.db.Prepared): planning it cost PostgreSQL more than running it, and a primary-key update has no plan to get wrong.
_CLAIM = Prepared(
    "jobservice_claim",
    f"""
    WITH u AS (
        UPDATE jobs SET status = 'running', status_reason = :reason, updated_at = :now, worker_id = :worker,
                        started_at = :now, heartbeat_at = :now
        WHERE id = :id AND dispatch_token = :token AND status = 'queued'
        RETURNING id, retry_count, image, command, env, config, cpu_millis, memory_bytes, gpus, gang_enabled,
                  gang_min_members, timeout_seconds, cluster, node, gpu_indices, placement
    ), e AS (
        INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor, attempt, worker_id, cluster, node, details)
        SELECT u.id, :now, 'queued', 'running', :reason, :worker, u.retry_count, :worker, u.cluster, {_EVENT_NODE},
               CAST(:details AS jsonb)
        FROM u
    )
    SELECT * FROM u
    """,
    {"id": "text", "token": "text", "worker": "text", "now": "timestamptz", "reason": "text", "details": "text"},
)


def _claim_queued(
    session: Session, job_id: str, dispatch_token: str, worker_id: str, now: datetime, claim_id: str | None
) -> ClaimedJob | None:
    """queued -> running in one statement; None when the job is not queued under this token."""
    details = {"dispatch_token": dispatch_token, **({"claim": claim_id} if claim_id else {})}
    # One statement, a transaction of its own (as end()'s _SUCCEED): the update and its event (and the counters'
    # statement triggers) commit together. The GPU type read after it needs no transaction.
    rows = _alone(session, _CLAIM, {
        "id": job_id, "token": dispatch_token, "worker": worker_id, "now": now,
        "reason": f"started by {worker_id}", "details": json.dumps(details),
    })
    if not rows:
        return None
    return _claimed(session, rows[0])


def _alone(session: Session, statement: Prepared, params: dict[str, Any]) -> list[Any]:
    """app.db.run_alone; a session already in a transaction has the statement join it and commits both. A session
    without one is left without one: committing it would begin and commit an empty transaction of its own, a tenth
    of a millisecond of the worker's CPU at every claim and end."""
    if not session.in_transaction():
        return run_alone(session, statement, params)
    with transaction(session):
        return run_alone(session, statement, params)


def _claim_event(session: Session, job_id: str, dispatch_token: str, attempt: int | None = None) -> JobEvent | None:
    """The event of the claim that started this admission's attempt (its details carry the dispatch token)."""
    conditions = [
        JobEvent.job_id == job_id,
        JobEvent.to_status == JobStatus.RUNNING.value,
        JobEvent.details["dispatch_token"].astext == dispatch_token,
    ]
    if attempt is not None:
        conditions.append(JobEvent.attempt == attempt)
    return session.scalars(select(JobEvent).where(*conditions).order_by(JobEvent.id.desc()).limit(1)).first()


def recorded_end(session: Session, job_id: str, dispatch_token: str) -> str | None:
    """How the attempt started by this admission ended, as recorded: the status its running state left for."""
    claimed = _claim_event(session, job_id, dispatch_token)
    if claimed is None:
        return None
    return session.scalar(
        select(JobEvent.to_status)
        .where(JobEvent.job_id == job_id, JobEvent.id > claimed.id, JobEvent.from_status == JobStatus.RUNNING.value,
               JobEvent.to_status != JobStatus.RUNNING.value)  # a takeover is no end
        .order_by(JobEvent.id)
        .limit(1)
    )


def _claimed(session: Session, job: Any) -> ClaimedJob:
    """The attempt a claim (or a takeover) started, from its job: the ORM row, or the claim statement's row, which
    returns the same columns under the same names."""
    return ClaimedJob(
        job_id=job.id,
        attempt=job.retry_count,
        image=job.image,
        command=list(job.command) if job.command else None,
        env=dict(job.env or {}),
        config=dict(job.config or {}),
        cpu_millis=job.cpu_millis,
        memory_bytes=job.memory_bytes,
        gpus=job.gpus,
        members=job.gang_min_members if job.gang_enabled else 1,
        timeout_seconds=job.timeout_seconds,
        cluster=job.cluster or "",
        node=job.node,
        gpu_indices=[int(g) for g in job.gpu_indices or []],
        # The GPU model the scheduler counted for a Kubernetes job's GPUs: the kube-scheduler must not place its
        # members on another model. None without GPUs, on the local cluster, or over nodes of mixed models.
        gpu_type=_gpu_type_of(session, job.gpus, job.cluster, placed_nodes(job)),
        nodes=[str(part["node"]) for part in job.placement or []],
    )


def _gpu_type_of(session: Session, gpus: int, cluster: str | None, placed: str | None) -> str | None:
    names = (placed or "").split(",")
    if not gpus or cluster in (None, LOCAL_CLUSTER) or not any(names):
        return None
    types = set(session.scalars(select(Node.gpu_type).where(Node.cluster == cluster, Node.name.in_(names))))
    return types.pop() if len(types) == 1 else None


def still_running(session: Session, job_id: str, dispatch_token: str, *, heartbeat: bool) -> bool:
    """True while this attempt still owns the job; renews its lease when `heartbeat` is set."""
    with transaction(session):
        if heartbeat:
            renewed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.dispatch_token == dispatch_token)
                .values(heartbeat_at=utcnow())
            )
            return bool(renewed.rowcount)
        status = session.scalar(select(Job.status).where(Job.id == job_id, Job.dispatch_token == dispatch_token))
        return status == JobStatus.RUNNING.value


# A successful end in one round trip (the hot path of every job): the compare-and-set on the dispatch token,
# the `succeeded` event and the scheduler's wake-up (sent at commit), as end_attempt writes them. Prepared, as _CLAIM.
_SUCCEED = Prepared(
    "jobservice_succeed",
    f"""
    WITH u AS (
        UPDATE jobs SET status = 'succeeded', status_reason = :reason, updated_at = :now, completed_at = :now,
                        exit_code = :exit_code, holds_resources = false
        WHERE id = :id AND dispatch_token = :token AND status = 'running'
        RETURNING id, retry_count, worker_id, cluster, node, placement
    ), e AS (
        INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor, attempt, worker_id, cluster, node,
                                exit_code, details)
        SELECT u.id, :now, 'running', 'succeeded', :reason, :actor, u.retry_count, u.worker_id, u.cluster, {_EVENT_NODE},
               :exit_code, CAST(:details AS jsonb)
        FROM u
    )
    SELECT pg_notify(:channel, 'attempt-ended') FROM u
    """,
    {"id": "text", "token": "text", "now": "timestamptz", "reason": "text", "actor": "text", "exit_code": "integer",
     "details": "text", "channel": "text"},
)


def end(
    session: Session,
    settings: Settings,
    job_id: str,
    dispatch_token: str,
    *,
    succeeded: bool,
    retryable: bool,
    reason: str,
    actor: str,
    exit_code: int | None = None,
    details: dict[str, Any] | None = None,
    requeue: bool = False,
) -> str:
    """Record how this attempt ended; returns the job's status afterwards (unchanged if it was cancelled).

    A compare-and-set on the dispatch token, so it is safe to retry: a retry whose earlier try committed
    unacknowledged finds the job no longer running under this token and returns what that try recorded
    (never ending the job twice, nor ending a later attempt).
    """
    if succeeded and not requeue:
        now = utcnow()
        # One statement is a transaction of its own: its update, event, counters (statement triggers) and wake-up
        # commit together or not at all. The fallback below runs in a real transaction.
        ended = _alone(session, _SUCCEED, {
            "id": job_id, "token": dispatch_token, "now": now, "reason": reason, "actor": actor, "exit_code": exit_code,
            "details": json.dumps(details or {}), "channel": SCHEDULER_CHANNEL,
        })
        if ended:
            return JobStatus.SUCCEEDED.value
        # Not running under this token: cancelled or preempted meanwhile, or a retry whose earlier try committed.
    with transaction(session):
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            return "missing"
        if job.status != JobStatus.RUNNING.value or job.dispatch_token != dispatch_token:
            if job.dispatch_token == dispatch_token and job.holds_resources:
                # Cancelled (or preempted) while running: its processes are gone now.
                if job.status == JobStatus.PENDING.value:
                    clear_placement(job)  # preempted: back in the backlog with nothing placed
                job.holds_resources = False
                notify_scheduler(session, "resources-released")
            return recorded_end(session, job_id, dispatch_token) or job.status
        end_attempt(
            session, job, settings, succeeded=succeeded, retryable=retryable, reason=reason, actor=actor,
            exit_code=exit_code, details=details, requeue=requeue,
        )
        return job.status


def register_node(
    session: Session,
    *,
    cluster: str,
    name: str,
    gpu_indices: list[int],
    gpu_type: str | None,
    cpu_millis: int,
    memory_bytes: int,
    slots: int,
    pool: str | None = None,
) -> None:
    now = utcnow()
    values = dict(
        cluster=cluster, name=name, gpu_indices=gpu_indices, gpu_type=gpu_type, cpu_millis=cpu_millis,
        memory_bytes=memory_bytes, slots=slots, ready=True, heartbeat_at=now, started_at=now, pool=pool,
    )
    with transaction(session):
        statement = insert(Node).values(**values)
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[Node.cluster, Node.name],
                set_={k: statement.excluded[k] for k in values if k not in ("cluster", "name")},
            )
        )
        notify_scheduler(session, "node-registered")


def node_heartbeat(session: Session, cluster: str, name: str) -> bool:
    with transaction(session):
        result = session.execute(update(Node).where(Node.cluster == cluster, Node.name == name).values(heartbeat_at=utcnow()))
        return bool(result.rowcount)


def deregister_node(session: Session, cluster: str, name: str) -> None:
    with transaction(session):
        session.execute(delete(Node).where(Node.cluster == cluster, Node.name == name))


def sync_cluster_nodes(session: Session, cluster: str, nodes: list[dict[str, Any]]) -> None:
    """Replace a Kubernetes cluster's node rows with what its API reports now (one transaction)."""
    now = utcnow()
    with transaction(session):
        names = [n["name"] for n in nodes]
        session.execute(delete(Node).where(Node.cluster == cluster, Node.name.not_in(names)))
        for node in nodes:
            values = {**node, "cluster": cluster, "heartbeat_at": now}
            statement = insert(Node).values(**values, started_at=now)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=[Node.cluster, Node.name],
                    set_={k: statement.excluded[k] for k in values if k not in ("cluster", "name")},
                )
            )
        notify_scheduler(session, "inventory")


def orphaned_attempts(session: Session, attempts: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """Of (job id, attempt) pairs found running somewhere, those no running attempt of the job owns."""
    if not attempts:
        return set()
    running = {
        (job_id, attempt)
        for job_id, attempt in session.execute(
            select(Job.id, Job.retry_count).where(
                Job.id.in_([job_id for job_id, _ in attempts]), Job.status == JobStatus.RUNNING.value
            )
        )
    }
    return {pair for pair in attempts if pair not in running}


def attempts_of_ours(session: Session, attempts: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """Of (job id, attempt) pairs found in a cluster, those that are attempts of a job the service knows
    (its current attempt or an earlier one); the others are true orphans."""
    if not attempts:
        return set()
    latest = dict(session.execute(
        select(Job.id, Job.retry_count).where(Job.id.in_({job_id for job_id, _ in attempts}))
    ).all())
    return {(job_id, attempt) for job_id, attempt in attempts if job_id in latest and 0 <= attempt <= latest[job_id]}


def adoptable(session: Session, cluster: str, silent_since: datetime) -> list[tuple[str, str]]:
    """Running jobs of a cluster whose worker stopped watching them: (job id, dispatch token)."""
    rows = session.execute(
        select(Job.id, Job.dispatch_token).where(
            Job.cluster == cluster, Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < silent_since
        )
    )
    return [(job_id, token) for job_id, token in rows if token]


def take_over(session: Session, job_id: str, dispatch_token: str, worker_id: str, silent_since: datetime) -> ClaimedJob | None:
    """A worker adopts a running job whose watcher went silent; only one adopter wins."""
    now = utcnow()
    with transaction(session):
        job = session.get(Job, job_id, with_for_update=True)
        if (
            job is None
            or job.status != JobStatus.RUNNING.value
            or job.dispatch_token != dispatch_token
            or (job.heartbeat_at is not None and job.heartbeat_at >= silent_since)
        ):
            return None
        previous, silent = job.worker_id, (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else None
        job.worker_id = worker_id
        job.heartbeat_at = now
        _record_takeover(session, job, previous, silent, now)
        return _claimed(session, job)


def _record_takeover(session: Session, job: Job, previous: str | None, silent: float | None, at: datetime) -> None:
    """A takeover changes who watches the attempt, not its state: a running -> running event on the timeline
    (no dispatch token in its details, so it is never taken for the attempt's claim)."""
    quiet = f" after {silent:.0f}s of silence" if silent is not None else ""
    session.add(JobEvent(
        job_id=job.id, at=at, from_status=job.status, to_status=job.status,
        reason=f"taken over by worker {job.worker_id} from worker {previous}{quiet}", actor=job.worker_id or "worker",
        attempt=job.retry_count, worker_id=job.worker_id, cluster=job.cluster, node=placed_nodes(job),
        details={"takeover": True, "previous_worker": previous, "silent_seconds": round(silent, 3) if silent is not None else None},
    ))
