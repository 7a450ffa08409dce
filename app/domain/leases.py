"""Leases of many running attempts at once: what a worker process that supervises hundreds of Kubernetes
attempts renews in one statement per round, instead of one transaction (and one thread) per attempt.

Same meaning as `nodes.lease_check` for each attempt: still owns its job (status running under its dispatch
token; the lease renewed when `heartbeat` is set), and when a draining node it runs on wants it stopped.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain.jobs import utcnow
from app.domain.nodes import NodeState, _placed_on
from app.domain.states import JobStatus
from app.models import Job, Node

# A round renews at most this many attempts per statement (bind parameters stay well under PostgreSQL's limit).
CHUNK = 2000


def check_many(session: Session, attempts: Sequence[tuple[str, str]], *, heartbeat: bool) -> dict[str, datetime | None]:
    """{job id: drain deadline or None} for every (job id, dispatch token) that still owns its job; an
    attempt absent from the answer no longer does (cancelled, preempted, taken over, ended)."""
    owned: dict[str, datetime | None] = {}
    for start in range(0, len(attempts), CHUNK):
        chunk = list(attempts[start:start + CHUNK])
        if not chunk:
            continue
        mine = tuple_(Job.id, Job.dispatch_token).in_(chunk)
        with transaction(session):
            if heartbeat:
                ids = session.scalars(
                    update(Job).where(mine, Job.status == JobStatus.RUNNING.value)
                    .values(heartbeat_at=utcnow()).returning(Job.id)
                ).all()
            else:
                ids = session.scalars(select(Job.id).where(mine, Job.status == JobStatus.RUNNING.value)).all()
            found: dict[str, datetime | None] = dict.fromkeys(ids)
            if found:
                draining = session.execute(
                    select(Job.id, func.min(Node.drain_deadline))
                    .select_from(Job)
                    .join(Node, (Node.cluster == Job.cluster) & _placed_on(Node.name))
                    .where(Job.id.in_(list(found)), Node.state == NodeState.DRAINING.value)
                    .group_by(Job.id)
                )
                for job_id, deadline in draining:
                    found[job_id] = deadline
        owned.update(found)
    return owned
