"""Capacity: what each node has, what the admitted jobs hold, and whether a request fits.

A node is registered (and kept alive by heartbeats) by whatever runs jobs on it: a local worker
for its host, the Kubernetes inventory for a cluster's nodes. A job holds its resources from
admission (`queued`) until it ends, so capacity is never promised twice.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
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
    used_anonymous_gpus: int = 0  # held by count only: on Kubernetes the device plugin picks the GPUs

    @property
    def free_gpus(self) -> list[int]:
        free = [g for g in self.gpu_indices if g not in self.used_gpus]
        return free[: max(0, len(free) - self.used_anonymous_gpus)]

    @property
    def gpus_free_count(self) -> int:
        return len(self.free_gpus)

    def member_shortfall(self, cpu_millis: int, memory_bytes: int, gpus: int, *, slot: bool) -> str | None:
        """Why one more member does not fit now (the first member also needs a worker slot)."""
        if slot and self.used_slots + 1 > self.slots:
            return "SLOTS"
        if gpus > self.gpus_free_count:
            return "GPUS"
        if self.used_cpu_millis + cpu_millis > self.cpu_millis:
            return "CPU"
        if self.used_memory_bytes + memory_bytes > self.memory_bytes:
            return "MEMORY"
        return None

    def hold_member(self, cpu_millis: int, memory_bytes: int, gpus: int, *, slot: bool) -> None:
        self.used_anonymous_gpus += gpus
        self.used_cpu_millis += cpu_millis
        self.used_memory_bytes += memory_bytes
        self.used_slots += 1 if slot else 0

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

    def emptied(self) -> "NodeCapacity":
        """The same node with nothing held on it."""
        return NodeCapacity(self.cluster, self.name, self.gpu_indices, self.gpu_type, self.cpu_millis, self.memory_bytes, self.slots)

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
        # Placement's view: live nodes that are neither cordoned nor draining (app.domain.nodes).
        query = query.where(Node.heartbeat_at >= alive_since, Node.state == "ready")
    nodes = {
        (n.cluster, n.name): NodeCapacity(
            n.cluster, n.name, sorted(int(g) for g in n.gpu_indices), n.gpu_type, n.cpu_millis, n.memory_bytes, n.slots
        )
        for n in session.scalars(query)
    }
    held = session.execute(
        # Plain `holds_resources`, not IS TRUE: only this form uses the partial index ix_jobs_holding_node.
        select(Job.cluster, Job.placement, Job.cpu_millis, Job.memory_bytes, Job.gpus).where(Job.holds_resources)
    )
    for cluster, placement, cpu, memory, gpus in held:
        for index, part in enumerate(placement or []):
            node = nodes.get((cluster, part["node"]))
            if node is None:
                continue
            members = int(part["members"])
            node.used_gpus.update(int(g) for g in part.get("gpu_indices") or [])
            node.used_anonymous_gpus += 0 if part.get("gpu_indices") else gpus * members
            node.used_cpu_millis += cpu * members
            node.used_memory_bytes += memory * members
            node.used_slots += 1 if index == 0 else 0  # one worker slot runs the whole job
    return list(nodes.values())


@dataclass(frozen=True)
class Placement:
    """Where a job's members go: one node for the local executor, possibly several on Kubernetes."""

    cluster: str
    parts: tuple[tuple[str, int, tuple[int, ...]], ...]  # (node, members, GPU indices when assigned by us)

    @property
    def node(self) -> str | None:
        return self.parts[0][0] if len(self.parts) == 1 else None

    @property
    def gpu_indices(self) -> list[int]:
        return [g for _, _, gpus in self.parts for g in gpus]

    def as_json(self) -> list[dict[str, object]]:
        return [{"node": node, "members": members, "gpu_indices": list(gpus)} for node, members, gpus in self.parts]


def best_fit(nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> NodeCapacity | None:
    """The fitting node that leaves the fewest GPUs free (keeps whole nodes free for big jobs)."""
    fitting = [n for n in nodes if n.shortfall(cpu_millis, memory_bytes, gpus, members) is None]
    if not fitting:
        return None
    return min(fitting, key=lambda n: (len(n.free_gpus) - gpus * members, n.used_slots, n.name))


def place(
    nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int, *, has_command: bool = True
) -> Placement | None:
    """Reserve room for every member at once, or nothing: a gang starts whole or not at all.

    The local executor starts a gang's processes on one host, so local members share a node.
    Kubernetes schedules each member's pod on its own, so there members may spread over nodes.
    The local executor cannot run an image: a job without a command goes to Kubernetes when there is one.
    """
    elsewhere = any(n.cluster != LOCAL_CLUSTER for n in nodes)
    local = [n for n in nodes if n.cluster == LOCAL_CLUSTER and (has_command or not elsewhere)]
    node = best_fit(local, cpu_millis, memory_bytes, gpus, members)
    if node is not None:
        indices = node.reserve(cpu_millis, memory_bytes, gpus, members)
        return Placement(node.cluster, ((node.name, members, tuple(indices)),))
    for cluster in sorted({n.cluster for n in nodes} - {LOCAL_CLUSTER}):
        parts = _spread([n for n in nodes if n.cluster == cluster], cpu_millis, memory_bytes, gpus, members)
        if parts is not None:
            return Placement(cluster, parts)
    return None


def _spread(nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> tuple[tuple[str, int, tuple[int, ...]], ...] | None:
    """Best-fit each member in turn onto a copy of the nodes; commit the reservations only if all fit."""
    trial = {n.name: dataclasses.replace(n, used_gpus=set(n.used_gpus)) for n in nodes}
    counts: dict[str, int] = {}
    for member in range(members):
        # Only the first member takes the job's worker slot.
        candidates = [n for n in trial.values() if n.member_shortfall(cpu_millis, memory_bytes, gpus, slot=member == 0) is None]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda n: (n.gpus_free_count - gpus, n.name))
        chosen.hold_member(cpu_millis, memory_bytes, gpus, slot=member == 0)
        counts[chosen.name] = counts.get(chosen.name, 0) + 1
    for original in nodes:
        replica = trial[original.name]
        original.used_anonymous_gpus = replica.used_anonymous_gpus
        original.used_cpu_millis = replica.used_cpu_millis
        original.used_memory_bytes = replica.used_memory_bytes
        original.used_slots = replica.used_slots
    return tuple((name, count, ()) for name, count in counts.items())


def why_never_fits(
    session: Session, cpu_millis: int, memory_bytes: int, gpus: int, members: int, *, has_command: bool = True
) -> str | None:
    """Why no known node could ever run the request, even empty; None if one could (or none is known)."""
    nodes = load_nodes(session)
    empty = [n.emptied() for n in nodes]
    if not nodes or place(empty, cpu_millis, memory_bytes, gpus, members, has_command=has_command) is not None:
        return None
    biggest = max(nodes, key=lambda n: (len(n.gpu_indices), n.cpu_millis, n.memory_bytes))
    return (
        f"needs {gpus * members} GPU(s), {format_millis(cpu_millis * members)} CPU and "
        f"{format_bytes(memory_bytes * members)} memory in all; the largest node ({biggest.cluster}/{biggest.name}) "
        f"has {len(biggest.gpu_indices)} GPU(s), {format_millis(biggest.cpu_millis)} CPU, "
        f"{format_bytes(biggest.memory_bytes)} memory"
    )


def node_alive_since(now: datetime, lease_seconds: float) -> datetime:
    return now - timedelta(seconds=lease_seconds)
