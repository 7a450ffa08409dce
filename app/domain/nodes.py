"""Nodes as operators see them: cordon, uncordon, drain; and a stopping worker's drain.

A node's `state` says what the scheduler may do with it: `ready` (place jobs), `cordoned` (place nothing
new), `draining` (place nothing new, and stop and requeue what still runs there once `drain_deadline`
passes). The scheduler reads it where it loads nodes for placement (capacity.load_nodes); the workers
read it on their jobs' lease renewals and stop their jobs there (requeue_drained). Every change is one
transaction with its audit row (NodeEvent); the jobs it moves get their own events.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain.errors import NotFound
from app.domain.execution import recorded_end, still_running
from app.domain.jobs import clear_placement, notify_scheduler, record_transition, utcnow
from app.domain.scheduling import ADMISSION_LOCK
from app.domain.states import JobStatus
from app.models import Job, Node, NodeEvent, OutboxMessage


class NodeState(StrEnum):
    READY = "ready"
    CORDONED = "cordoned"
    DRAINING = "draining"


def _placed_on(name: Any) -> Any:
    """Jobs with a member placed on the node `name` (a column or a value): one node locally, any of several on Kubernetes."""
    return Job.placement.op("@>")(func.jsonb_build_array(func.jsonb_build_object("node", name)))


def _exclude_admission(session: Session) -> None:
    """Wait for an admission pass in progress, and keep the next one out until this change commits: a pass
    that read the node as ready before the change must not place a job there after it."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})


def _locked(session: Session, cluster: str, name: str) -> Node:
    _exclude_admission(session)
    node = session.scalars(select(Node).where(Node.cluster == cluster, Node.name == name).with_for_update()).first()
    if node is None:
        raise NotFound(f"Node {cluster}/{name} not found")
    return node


def _set(session: Session, node: Node, target: NodeState, *, actor: str, reason: str, now: datetime,
         deadline: datetime | None = None, details: dict[str, Any] | None = None) -> None:
    session.add(NodeEvent(
        at=now, cluster=node.cluster, node=node.name, from_state=node.state, to_state=target.value, actor=actor,
        reason=reason, details={**(details or {}), **({"drain_deadline": deadline.isoformat()} if deadline else {})},
    ))
    node.state = target.value
    node.state_reason = reason
    node.state_by = actor
    node.state_at = now
    node.drain_deadline = deadline if target is NodeState.DRAINING else None


def change_state(
    session: Session, cluster: str, name: str, target: NodeState, *, actor: str, reason: str | None = None,
    grace_seconds: float | None = None, now: datetime | None = None,
) -> Node:
    """An operator's cordon, uncordon or drain (`grace_seconds`: how long running jobs may still finish)."""
    now = now or utcnow()
    with transaction(session):
        node = _locked(session, cluster, name)
        deadline = now + timedelta(seconds=grace_seconds or 0) if target is NodeState.DRAINING else None
        verb = {NodeState.READY: "uncordoned", NodeState.CORDONED: "cordoned", NodeState.DRAINING: "drained"}[target]
        _set(session, node, target, actor=actor, reason=reason or f"{verb} by {actor}", now=now, deadline=deadline)
        if target is NodeState.DRAINING:
            requeue_unstarted(session, cluster, name, actor=actor, now=now)
        # Uncordoning frees capacity; the others wake the scheduler so that explain and /queues catch up.
        notify_scheduler(session, f"node-{target.value}")
        session.flush()
    return node


def requeue_unstarted(session: Session, cluster: str, name: str, *, actor: str, now: datetime) -> list[str]:
    """Jobs admitted to a draining node that no worker has started yet go back to the backlog at once."""
    jobs = session.scalars(
        select(Job)
        .where(Job.status == JobStatus.QUEUED.value, Job.cluster == cluster, _placed_on(name))
        .with_for_update(skip_locked=True)  # a worker claiming it right now wins; its lease check drains it then
    ).all()
    for job in jobs:
        record_transition(
            session, job, JobStatus.PENDING, reason=f"node {cluster}/{name} draining before the job started; back to the backlog",
            actor=actor, at=now, details={"drained_from": f"{cluster}/{name}"},
        )
        clear_placement(job)
    if jobs:
        # Their tasks are stale (the dispatch token changed): no use sending them.
        session.execute(delete(OutboxMessage).where(OutboxMessage.job_id.in_([j.id for j in jobs])))
    return [j.id for j in jobs]


@dataclass(frozen=True)
class PriorState:
    """An operator's state of a node that its stopping worker keeps for the node's next worker."""

    state: str
    reason: str | None
    by: str | None
    at: datetime | None
    drain_deadline: datetime | None


def drain_for_shutdown(session: Session, cluster: str, name: str, *, actor: str, grace_seconds: float) -> PriorState | None:
    """A worker stopping (SIGTERM): nothing new is placed on its node; its running jobs get `grace_seconds`.

    Returns the operator's state the node had (cordoned, draining), to be put back when the worker leaves.
    """
    now = utcnow()
    with transaction(session):
        _exclude_admission(session)
        node = session.scalars(select(Node).where(Node.cluster == cluster, Node.name == name).with_for_update()).first()
        if node is None:
            return None
        prior = None
        if node.state != NodeState.READY.value:
            prior = PriorState(node.state, node.state_reason, node.state_by, node.state_at, node.drain_deadline)
        deadline = now + timedelta(seconds=grace_seconds)
        if node.drain_deadline is not None and node.drain_deadline < deadline:
            deadline = node.drain_deadline  # an operator's drain that ends sooner still does
        _set(session, node, NodeState.DRAINING, actor=actor, reason=f"worker {actor} stopping", now=now, deadline=deadline,
             details={"shutdown": True, "prior": _prior_json(prior)})
        requeue_unstarted(session, cluster, name, actor=actor, now=now)
        notify_scheduler(session, "node-draining")
    return prior


def leave_after_shutdown(session: Session, cluster: str, name: str, *, actor: str, prior: PriorState | None) -> None:
    """The stopped worker's node leaves the registry; an operator's cordon or drain stays on its row."""
    now = utcnow()
    with transaction(session):
        if prior is None:
            session.execute(delete(Node).where(Node.cluster == cluster, Node.name == name))
            return
        node = session.scalars(select(Node).where(Node.cluster == cluster, Node.name == name).with_for_update()).first()
        if node is None:
            return
        session.add(NodeEvent(
            at=now, cluster=cluster, node=name, from_state=node.state, to_state=prior.state, actor=actor,
            reason=f"worker {actor} stopped; the state set by {prior.by} is kept", details={},
        ))
        node.state, node.state_reason, node.state_by, node.state_at = prior.state, prior.reason, prior.by, prior.at
        node.drain_deadline = prior.drain_deadline


def _prior_json(prior: PriorState | None) -> dict[str, Any] | None:
    if prior is None:
        return None
    return {
        "state": prior.state, "reason": prior.reason, "by": prior.by,
        "at": prior.at.isoformat() if prior.at else None,
        "drain_deadline": prior.drain_deadline.isoformat() if prior.drain_deadline else None,
    }


def recover_shutdown_drain(session: Session, cluster: str, name: str, *, actor: str) -> bool:
    """A worker joining a node that a stopping worker left draining (it was killed mid-drain): the node is
    ready again, or back to the operator's state it had before. True when something was undone."""
    now = utcnow()
    with transaction(session):
        node = session.scalars(select(Node).where(Node.cluster == cluster, Node.name == name).with_for_update()).first()
        if node is None or node.state != NodeState.DRAINING.value:
            return False
        last = session.scalars(
            select(NodeEvent).where(NodeEvent.cluster == cluster, NodeEvent.node == name).order_by(NodeEvent.id.desc()).limit(1)
        ).first()
        if last is None or not last.details.get("shutdown"):
            return False
        prior = last.details.get("prior")
        target = NodeState(prior["state"]) if prior else NodeState.READY
        session.add(NodeEvent(
            at=now, cluster=cluster, node=name, from_state=node.state, to_state=target.value, actor=actor,
            reason=f"worker {actor} started on a node its stopped worker left draining", details={},
        ))
        node.state = target.value
        node.state_reason = prior["reason"] if prior else None
        node.state_by = prior["by"] if prior else None
        node.state_at = datetime.fromisoformat(prior["at"]) if prior and prior["at"] else now
        node.drain_deadline = datetime.fromisoformat(prior["drain_deadline"]) if prior and prior["drain_deadline"] else None
        notify_scheduler(session, "node-ready")
        return True


def drain_deadline(session: Session, job_id: str, dispatch_token: str) -> datetime | None:
    """When the job's attempt must stop because a node it runs on drains; None when none does."""
    return session.scalar(
        select(func.min(Node.drain_deadline))
        .select_from(Job)
        .join(Node, (Node.cluster == Job.cluster) & _placed_on(Node.name))
        .where(Job.id == job_id, Job.dispatch_token == dispatch_token, Node.state == NodeState.DRAINING.value)
    )


def lease_check(session: Session, job_id: str, dispatch_token: str, *, heartbeat: bool) -> tuple[bool, datetime | None]:
    """A running attempt's periodic check: (still owns the job, when its draining node wants it stopped)."""
    if not still_running(session, job_id, dispatch_token, heartbeat=heartbeat):
        return False, None
    return True, drain_deadline(session, job_id, dispatch_token)


def requeue_drained(
    session: Session, job_id: str, dispatch_token: str, *, actor: str, reason: str,
    exit_code: int | None = None, details: dict[str, Any] | None = None,
) -> str:
    """running -> pending: the attempt was stopped because its node drained. It does not spend a retry and
    waits for no backoff. A compare-and-set on the dispatch token, so a retried report never moves it twice."""
    with transaction(session):
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            return "missing"
        if job.status != JobStatus.RUNNING.value or job.dispatch_token != dispatch_token:
            if job.dispatch_token == dispatch_token and job.holds_resources:
                job.holds_resources = False  # cancelled while it was being drained: its processes are gone now
                notify_scheduler(session, "resources-released")
            return recorded_end(session, job_id, dispatch_token) or job.status
        job.exit_code = exit_code
        record_transition(
            session, job, JobStatus.PENDING, reason=reason, actor=actor, exit_code=exit_code,
            details={**(details or {}), "drained_from": f"{job.cluster}/{job.node or '*'}", "retry_spent": False},
        )
        job.not_before = None
        clear_placement(job)
        notify_scheduler(session, "drained")
        return job.status


# --- Reading ---------------------------------------------------------------------------------------


@dataclass
class NodeJob:
    id: str
    status: str
    owner: str
    priority: int
    started_at: datetime | None


@dataclass
class NodeSummary:
    cluster: str
    name: str
    state: str
    state_reason: str | None
    state_by: str | None
    state_at: datetime | None
    drain_deadline: datetime | None
    alive: bool
    heartbeat_at: datetime
    gpu_type: str | None
    gpu_total: int
    slots: int
    jobs: list[NodeJob] = field(default_factory=list)


def list_nodes(session: Session, now: datetime, node_lease_seconds: float, *, cluster: str | None = None, name: str | None = None) -> list[NodeSummary]:
    """Every registered node with its state and the jobs that hold resources on it (queued, running, stopping)."""
    query = select(Node).order_by(Node.cluster, Node.name)
    if cluster is not None:
        query = query.where(Node.cluster == cluster)
    if name is not None:
        query = query.where(Node.name == name)
    alive_since = now - timedelta(seconds=node_lease_seconds)
    nodes = {
        (n.cluster, n.name): NodeSummary(
            n.cluster, n.name, n.state, n.state_reason, n.state_by, n.state_at, n.drain_deadline,
            n.heartbeat_at >= alive_since, n.heartbeat_at, n.gpu_type, len(n.gpu_indices), n.slots,
        )
        for n in session.scalars(query)
    }
    if not nodes:
        return []
    held = select(Job.id, Job.status, Job.owner, Job.priority, Job.started_at, Job.cluster, Job.placement).where(Job.holds_resources)
    if cluster is not None:
        held = held.where(Job.cluster == cluster)
    if name is not None:
        held = held.where(_placed_on(name))
    for job_id, status, owner, priority, started_at, job_cluster, placement in session.execute(held.order_by(Job.id)):
        for part in placement or []:
            node = nodes.get((job_cluster, part.get("node")))
            if node is not None:
                node.jobs.append(NodeJob(job_id, status, owner, priority, started_at))
    return list(nodes.values())


def node_states(session: Session) -> dict[tuple[str, str], str]:
    return {(c, n): s for c, n, s in session.execute(select(Node.cluster, Node.name, Node.state))}


def audit(session: Session, cluster: str, name: str, limit: int = 20) -> list[NodeEvent]:
    """The node's latest state changes, newest first."""
    return list(session.scalars(
        select(NodeEvent).where(NodeEvent.cluster == cluster, NodeEvent.node == name).order_by(NodeEvent.id.desc()).limit(limit)
    ))



def why_unschedulable(session: Session, alive_since: datetime) -> str | None:
    """When every live node is cordoned or draining: which, by whom and why (explain's NO_NODES message)."""
    held = session.scalars(
        select(Node).where(Node.heartbeat_at >= alive_since, Node.ready.is_(True), Node.state != NodeState.READY.value)
        .order_by(Node.cluster, Node.name).limit(5)
    ).all()
    if not held:
        return None
    named = "; ".join(f"{n.cluster}/{n.name} {n.state} by {n.state_by or 'unknown'}" + (f" ({n.state_reason})" if n.state_reason else "") for n in held)
    return f"No schedulable node: every live node is cordoned or draining: {named}"
