"""Capacity: what each node has, what the admitted jobs hold, and whether a request fits.

A node is registered (and kept alive by heartbeats) by whatever runs jobs on it: a local worker
for its host, the Kubernetes inventory for a cluster's nodes. A job holds its resources from
admission (`queued`) until it ends, so capacity is never promised twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain.quantities import format_bytes, format_millis
from app.models import Job, Node

LOCAL_CLUSTER = "local"


@dataclass
class NodeCapacity:
    cluster: str
    name: str
    gpu_indices: list[int]
    gpu_type: str | None
    cpu_millis: int
    memory_bytes: int
    slots: int
    used_gpus: set[int] = field(default_factory=set)
    used_cpu_millis: int = 0
    used_memory_bytes: int = 0
    used_slots: int = 0

    @property
    def free_gpus(self) -> list[int]:
        return [g for g in self.gpu_indices if g not in self.used_gpus]

    def shortfall(self, cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> str | None:
        """Why the request does not fit in what is free now, or None when it fits."""
        if self.used_slots + 1 > self.slots:
            return "SLOTS"
        if gpus * members > len(self.free_gpus):
            return "GPUS"
        if self.used_cpu_millis + cpu_millis * members > self.cpu_millis:
            return "CPU"
        if self.used_memory_bytes + memory_bytes * members > self.memory_bytes:
            return "MEMORY"
        return None

    def reserve(self, cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> list[int]:
        chosen = self.free_gpus[: gpus * members]
        self.used_gpus.update(chosen)
        self.used_cpu_millis += cpu_millis * members
        self.used_memory_bytes += memory_bytes * members
        self.used_slots += 1
        return chosen


def load_nodes(session: Session, *, alive_since: datetime | None = None) -> list[NodeCapacity]:
    """Nodes (alive ones when `alive_since` is given) with what admitted jobs hold on each."""
    query = select(Node).where(Node.ready.is_(True))
    if alive_since is not None:
        query = query.where(Node.heartbeat_at >= alive_since)
    nodes = {
        (n.cluster, n.name): NodeCapacity(
            n.cluster, n.name, sorted(int(g) for g in n.gpu_indices), n.gpu_type, n.cpu_millis, n.memory_bytes, n.slots
        )
        for n in session.scalars(query)
    }
    members = func.greatest(1, func.coalesce(Job.gang_min_members, 1))
    held = session.execute(
        select(Job.cluster, Job.node, Job.gpu_indices, Job.cpu_millis, Job.memory_bytes, Job.gang_enabled, members).where(
            Job.holds_resources.is_(True)
        )
    )
    for cluster, node_name, gpu_indices, cpu, memory, gang, count in held:
        node = nodes.get((cluster, node_name))
        if node is None:
            continue
        count = count if gang else 1
        node.used_gpus.update(int(g) for g in (gpu_indices or []))
        node.used_cpu_millis += cpu * count
        node.used_memory_bytes += memory * count
        node.used_slots += 1
    return list(nodes.values())


def best_fit(nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> NodeCapacity | None:
    """The fitting node that leaves the fewest GPUs free (keeps whole nodes free for big jobs)."""
    fitting = [n for n in nodes if n.shortfall(cpu_millis, memory_bytes, gpus, members) is None]
    if not fitting:
        return None
    return min(fitting, key=lambda n: (len(n.free_gpus) - gpus * members, n.used_slots, n.name))


def why_never_fits(session: Session, cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> str | None:
    """Why no known node could ever run the request, even empty; None if one could (or none is known)."""
    nodes = load_nodes(session)
    if not nodes:
        return None
    for node in nodes:
        if (
            gpus * members <= len(node.gpu_indices)
            and cpu_millis * members <= node.cpu_millis
            and memory_bytes * members <= node.memory_bytes
        ):
            return None
    biggest = max(nodes, key=lambda n: (len(n.gpu_indices), n.cpu_millis, n.memory_bytes))
    return (
        f"needs {gpus * members} GPU(s), {format_millis(cpu_millis * members)} CPU and "
        f"{format_bytes(memory_bytes * members)} memory on one node; the largest node ({biggest.cluster}/{biggest.name}) "
        f"has {len(biggest.gpu_indices)} GPU(s), {format_millis(biggest.cpu_millis)} CPU, "
        f"{format_bytes(biggest.memory_bytes)} memory"
    )


def node_alive_since(now: datetime, lease_seconds: float) -> datetime:
    return now - timedelta(seconds=lease_seconds)
