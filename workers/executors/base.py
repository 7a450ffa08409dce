"""The executor interface: how a worker runs a job, whatever runs it (local processes, Kubernetes).

Executors import neither `app` nor Celery: they take a plain `JobSpec`, push log lines to a sink,
and report a plain `Outcome`. The worker task turns outcomes into state transitions.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    attempt: int
    image: str | None
    command: list[str] | None
    env: dict[str, str]
    config: dict[str, Any]
    cpu_millis: int
    memory_bytes: int
    gpus: int  # per member
    members: int  # gang size; 1 for a plain job
    timeout_seconds: int | None
    cluster: str
    node: str | None
    gpu_indices: list[int] = field(default_factory=list)  # host GPUs reserved for all members (local executor)
    nodes: list[str] = field(default_factory=list)  # every node of the placement (a spread Kubernetes gang)

    def base_environment(self, rank: int) -> dict[str, str]:
        """What every member sees besides the job's own `env`."""
        import json

        return {
            "JOB_ID": self.job_id,
            "JOB_CONFIG": json.dumps(self.config),
            "JOB_RANK": str(rank),
            "JOB_WORLD_SIZE": str(self.members),
            "JOB_ATTEMPT": str(self.attempt),
        }


class EndKind(StrEnum):
    EXITED = "exited"  # the process/container ended by itself (exit code tells success)
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LAUNCH_FAILED = "launch_failed"  # could not start at all (no command, bad image): retrying will not help
    LOST = "lost"  # the execution disappeared (pod evicted, node gone)
    UNPLACED = "unplaced"  # not every member could start in time: requeue whole, without spending a retry


@dataclass(frozen=True)
class Outcome:
    kind: EndKind
    reason: str
    exit_code: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.kind == EndKind.EXITED and self.exit_code == 0

    @property
    def retryable(self) -> bool:
        """Failures worth another attempt under the retry policy; timeouts and cancels never are."""
        return not self.succeeded and self.kind in (EndKind.EXITED, EndKind.LOST)


@dataclass(frozen=True)
class LogLine:
    at: datetime
    stream: str  # "stdout" | "stderr"
    line: str
    member: int = 0


LogSink = Callable[[list[LogLine]], None]


class Execution(Protocol):
    """A launched job. Methods are called from the worker's monitoring loop."""

    def poll(self) -> Outcome | None:
        """The outcome once everything has ended, else None. Enforces the job's timeout."""

    def cancel(self, kind: EndKind = EndKind.CANCELLED, reason: str = "cancelled") -> None:
        """Stop every member; idempotent. The next poll() reports `kind` once all have ended."""


class Executor(Protocol):
    name: str

    def launch(self, spec: JobSpec, logs: LogSink) -> Execution:
        """Start all members of the job together (or none); log lines go to `logs` as produced."""
