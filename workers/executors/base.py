"""The executor interface: how a worker runs a job, whatever runs it (local processes, Kubernetes).

Executors import neither `app` nor Celery: they take a plain `JobSpec`, push log lines to a sink,
and report a plain `Outcome`. The worker task turns outcomes into state transitions.
"""
from __future__ import annotations

import dataclasses
import socket
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
    gpu_type: str | None = None  # the GPU model of the nodes it was placed on (Kubernetes: a node selector)
    # Where member 0 accepts the torch.distributed rendezvous; set by the executor that knows the network.
    master_addr: str | None = None
    master_port: int | None = None

    def with_rendezvous(self, master_addr: str, master_port: int) -> JobSpec:
        return dataclasses.replace(self, master_addr=master_addr, master_port=master_port)

    def base_environment(self, rank: int) -> dict[str, str]:
        """What every member sees besides the job's own `env`.

        With a rendezvous, also what torch.distributed (`init_process_group("env://")`) and `torchrun`
        expect, one member per node: WORLD_SIZE members, RANK = NODE_RANK = the member's rank, LOCAL_RANK 0
        (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE afresh for the processes it starts).
        """
        import json

        env = {
            "JOB_ID": self.job_id,
            "JOB_CONFIG": json.dumps(self.config),
            "JOB_RANK": str(rank),
            "JOB_WORLD_SIZE": str(self.members),
            "JOB_ATTEMPT": str(self.attempt),
        }
        if self.master_addr is not None and self.master_port is not None:
            env.update({
                "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port),
                "WORLD_SIZE": str(self.members),
                "RANK": str(rank),
                "NODE_RANK": str(rank),
                "LOCAL_RANK": "0",
                "LOCAL_WORLD_SIZE": "1",
            })
        return env


# The per-member variables, which differ between members of one gang.
RANK_VARIABLES = ("JOB_RANK", "RANK", "NODE_RANK")
DEFAULT_MASTER_PORT = 29500  # torch.distributed's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a local gang's rendezvous (member 0 binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class EndKind(StrEnum):
    EXITED = "exited"  # the process/container ended by itself (exit code tells success)
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LAUNCH_FAILED = "launch_failed"  # could not start at all (no command, bad image): retrying will not help
    LOST = "lost"  # the execution disappeared (pod evicted, node gone)
    UNPLACED = "unplaced"  # not every member could start in time: requeue whole, without spending a retry
    DRAINED = "drained"  # stopped because its node drains (worker stopping, operator): requeue, no retry spent


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
