"""Job states and the transitions allowed between them: the one place that decides."""
from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    PENDING = "pending"  # in the backlog (PostgreSQL), waiting for admission
    QUEUED = "queued"  # admitted and placed; its task is on a broker queue
    RUNNING = "running"  # claimed by a worker
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ALL_STATES: tuple[str, ...] = tuple(s.value for s in JobStatus)
TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})

ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    # queued -> pending: the placement was lost (its node died) and the job goes back to the backlog.
    JobStatus.QUEUED: frozenset(
        {JobStatus.RUNNING, JobStatus.PENDING, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    # running -> pending: a retry after a failure, or a worker that died mid-job.
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PENDING}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(current: str, target: str) -> bool:
    return JobStatus(target) in ALLOWED_TRANSITIONS[JobStatus(current)]


def sources_of(target: JobStatus) -> tuple[str, ...]:
    """Every state from which `target` may be reached: the WHERE clause of a compare-and-set."""
    return tuple(s.value for s, targets in ALLOWED_TRANSITIONS.items() if target in targets)
