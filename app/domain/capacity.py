"""Capacity: what each node has, what the admitted jobs hold, and whether a request fits.

A node is registered (and kept alive by heartbeats) by whatever runs jobs on it: a local worker
for its host, the Kubernetes inventory for a cluster's nodes. A job holds its resources from
admission (`queued`) until it ends, so capacity is never promised twice.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from collections.abc import Sequence
from typing import Any

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
    used_anonymous_gpus: int = 0  # held by count only: on Kubernetes the device plugin picks the GPUs
    pool: str | None = None  # the worker pool serving the node (WORKER_POOL)

    @property
    def free_gpus(self) -> list[int]:
        free = [g for g in self.gpu_indices if g not in self.used_gpus]
        return free[: max(0, len(free) - self.used_anonymous_gpus)]

    @property
    def gpus_free_count(self) -> int:
        # The scheduler asks this for every node many times a pass: count without building the list.
        if not self.used_gpus:
            return max(0, len(self.gpu_indices) - self.used_anonymous_gpus)
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
        if gpus * members > self.gpus_free_count:
            return "GPUS"
        if self.used_cpu_millis + cpu_millis * members > self.cpu_millis:
            return "CPU"
        if self.used_memory_bytes + memory_bytes * members > self.memory_bytes:
            return "MEMORY"
        return None

    def copy(self) -> "NodeCapacity":
        """A copy whose holdings change apart from this one's. The scheduler copies every node every pass:
        this is several times quicker than dataclasses.replace (which validates and calls __init__)."""
        clone = object.__new__(NodeCapacity)
        clone.__dict__.update(self.__dict__)
        clone.used_gpus = set(self.used_gpus)
        return clone

    def emptied(self) -> "NodeCapacity":
        """The same node with nothing held on it."""
        return NodeCapacity(self.cluster, self.name, self.gpu_indices, self.gpu_type, self.cpu_millis, self.memory_bytes, self.slots,
                            pool=self.pool)

    def serves(self, gpu_types: Sequence[str] = (), pool: str | None = None) -> bool:
        """Whether a job asking for one of `gpu_types` (any when empty) in `pool` (any when None) may run here."""
        return (pool is None or self.pool == pool) and (
            not gpu_types or (self.gpu_type is not None and gpu_type_key(self.gpu_type) in {gpu_type_key(t) for t in gpu_types})
        )

    def reserve(self, cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> list[int]:
        chosen = self.free_gpus[: gpus * members]
        self.used_gpus.update(chosen)
        self.used_cpu_millis += cpu_millis * members
        self.used_memory_bytes += memory_bytes * members
        self.used_slots += 1
        return chosen


@functools.lru_cache(maxsize=4096)
def gpu_type_key(name: str) -> str:
    """A GPU model name compared loosely: nvidia-smi says `NVIDIA H100 80GB HBM3`, GPU feature discovery's
    node label `NVIDIA-H100-80GB-HBM3`; case and runs of spaces, '-' and '_' do not matter."""
    return re.sub(r"[\s_-]+", "-", name.strip().lower())


def load_nodes(
    session: Session, *, alive_since: datetime | None = None, ready_only: bool = True, holders: list[Any] | None = None
) -> list[NodeCapacity]:
    """Nodes (alive ones when `alive_since` is given) with what admitted jobs hold on each.

    `holders`, when given, receives the rows of the jobs holding resources (the scheduler's running attempts).
    """
    # Plain rows, not ORM objects: the scheduler reads every node on every pass.
    nodes = {(n.cluster, n.name): node_of(n) for n in session.execute(_nodes_query(ready_only, alive_since))}
    held = session.execute(
        # Plain `holds_resources`, not IS TRUE: only this form uses the partial index ix_jobs_holding_node.
        select(Job.cluster, Job.placement, Job.cpu_millis, Job.memory_bytes, Job.gpus, Job.id, func.coalesce(Job.tenant, Job.owner).label("owner"), Job.status,
               Job.queued_at, Job.started_at, Job.timeout_seconds, Job.priority, Job.preemptible, Job.queue).where(Job.holds_resources)
    )
    for row in held:
        if holders is not None:
            holders.append(row)
        hold(nodes, holding_of(row.cluster, row.placement, row.cpu_millis, row.memory_bytes, row.gpus))
    return list(nodes.values())


NODE_COLUMNS = (Node.cluster, Node.name, Node.gpu_indices, Node.gpu_type, Node.cpu_millis, Node.memory_bytes, Node.slots, Node.pool)


def _nodes_query(ready_only: bool, alive_since: datetime | None) -> Any:
    query = select(*NODE_COLUMNS)
    if ready_only:
        query = query.where(Node.ready.is_(True))
    if alive_since is not None:
        # Placement's view: live nodes that are neither cordoned nor draining (app.domain.nodes).
        query = query.where(Node.heartbeat_at >= alive_since, Node.state == "ready")
    return query


def node_of(row: Any) -> NodeCapacity:
    """A node row (NODE_COLUMNS) as the capacity it offers, nothing held."""
    cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, pool = row
    return NodeCapacity(cluster, name, sorted(int(g) for g in gpu_indices), gpu_type, cpu_millis, memory_bytes, slots, pool=pool)


# What one admitted job holds on one node: (cluster, node), GPU indices it names, GPUs held by count only (Kubernetes:
# the device plugin picks them), CPU millis, memory bytes, worker slots.
Holding = tuple[tuple[tuple[str, str], tuple[int, ...], int, int, int, int], ...]


def holding_of(cluster: str | None, placement: list[Any] | None, cpu_millis: int, memory_bytes: int, gpus: int) -> Holding:
    """A job's placement (jobs.placement) as what it holds on each node."""
    parts = []
    for index, part in enumerate(placement or []):
        members = int(part["members"])
        indices = tuple(int(g) for g in part.get("gpu_indices") or [])
        parts.append(((cluster, part["node"]), indices, 0 if indices else gpus * members, cpu_millis * members,
                      memory_bytes * members, 1 if index == 0 else 0))  # one worker slot runs the whole job
    return tuple(parts)


def hold(nodes: dict[tuple[str, str], NodeCapacity], holding: Holding) -> None:
    """Deduct what a job holds from the nodes it is placed on (nodes not listed are not live: ignored)."""
    for key, indices, anonymous, cpu, memory, slot in holding:
        node = nodes.get(key)
        if node is None:
            continue
        if indices:
            node.used_gpus.update(indices)
        node.used_anonymous_gpus += anonymous
        node.used_cpu_millis += cpu
        node.used_memory_bytes += memory
        node.used_slots += slot


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
    return min(fitting, key=lambda n: (n.gpus_free_count - gpus * members, n.used_slots, n.name))


def place(
    nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int, *, has_command: bool = True,
    elsewhere: bool | None = None, gpu_types: Sequence[str] = (), pool: str | None = None,
) -> Placement | None:
    """Reserve room for every member at once, or nothing: a gang starts whole or not at all.

    `gpu_types` (acceptable GPU models in order of preference; empty: any) and `pool` (None: any) restrict
    the nodes; the first type with room wins, so a job waits for its preferred type only when none fits.
    """
    if elsewhere is None:
        elsewhere = any(n.cluster != LOCAL_CLUSTER for n in nodes)
    if pool is not None:
        nodes = [n for n in nodes if n.pool == pool]
    if not gpu_types:
        return _place_any(nodes, cpu_millis, memory_bytes, gpus, members, has_command=has_command, elsewhere=elsewhere)
    for gpu_type in gpu_types:
        placement = _place_any([n for n in nodes if n.serves((gpu_type,))], cpu_millis, memory_bytes, gpus, members,
                               has_command=has_command, elsewhere=elsewhere)
        if placement is not None:
            return placement
    return None


def place_member(node: NodeCapacity, cpu_millis: int, memory_bytes: int, gpus: int) -> Placement:
    """What place([node], ...) does for one member on a node known to serve the job and to hold it now (a free worker
    slot, enough GPUs, CPU and memory): local nodes reserve GPU indices, other clusters' GPUs are held by count. The
    scheduler's preemption phase places many single jobs on nodes it already picked; this skips listing and sorting."""
    if node.cluster == LOCAL_CLUSTER:
        indices = node.reserve(cpu_millis, memory_bytes, gpus, 1)
        return Placement(node.cluster, ((node.name, 1, tuple(indices)),))
    node.hold_member(cpu_millis, memory_bytes, gpus, slot=True)
    return Placement(node.cluster, ((node.name, 1, ()),))


def _place_any(
    nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int, *, has_command: bool,
    elsewhere: bool,
) -> Placement | None:
    """place() over nodes that all serve the job.

    The local executor starts a gang's processes on one host, so local members share a node.
    Kubernetes schedules each member's pod on its own, so there members may spread over nodes.
    The local executor cannot run an image: a job without a command goes to Kubernetes when there is one.
    `elsewhere`: whether the fleet has other clusters than `local`, when `nodes` is only a prefiltered part of it.
    """
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
    """Best-fit each member in turn (the node left with the fewest free GPUs); commit only if all fit.

    Member by member, the best-fit node stays the best fit until it is full, so this fills nodes in
    best-fit order, counting how many members each holds, without copying the nodes.
    """
    def room(node: NodeCapacity, taken: int) -> int:
        """Members that still fit on `node` beyond `taken` already put there."""
        limits = []
        if gpus:
            limits.append(node.gpus_free_count // gpus - taken)
        if cpu_millis:
            limits.append((node.cpu_millis - node.used_cpu_millis) // cpu_millis - taken)
        if memory_bytes:
            limits.append((node.memory_bytes - node.used_memory_bytes) // memory_bytes - taken)
        return max(0, min(limits)) if limits else members

    def key(node: NodeCapacity, taken: int) -> tuple[int, str]:
        return (node.gpus_free_count - gpus * (taken + 1), node.name)

    # Only the first member takes the job's worker slot.
    first = [n for n in nodes if n.used_slots + 1 <= n.slots and room(n, 0) >= 1]
    if not first:
        return None
    counts: dict[str, int] = {}
    start = min(first, key=lambda n: key(n, 0))
    counts[start.name] = 1
    left = members - 1
    if left:
        ranked = sorted(((key(n, counts.get(n.name, 0)), n) for n in nodes), key=lambda e: e[0])
        for _, node in ranked:
            take = min(room(node, counts.get(node.name, 0)), left)
            if take > 0:
                counts[node.name] = counts.get(node.name, 0) + take
                left -= take
                if not left:
                    break
        if left:
            return None
    by_name = {n.name: n for n in nodes}
    for index, (name, count) in enumerate(counts.items()):
        by_name[name].hold_member(cpu_millis * count, memory_bytes * count, gpus * count, slot=index == 0)
    return tuple((name, count, ()) for name, count in counts.items())


def why_never_fits(
    session: Session, cpu_millis: int, memory_bytes: int, gpus: int, members: int, *, has_command: bool = True,
    gpu_types: Sequence[str] = (), pool: str | None = None, scalable_pools: Sequence[str] = (),
) -> str | None:
    """Why no known node could ever run the request, even empty; None if one could (or none is known).

    Every known node counts, ready or not, alive or not: a node that is NotReady for a moment (or a
    worker restarting) must not turn a valid job away. A job bound to GPU types or a pool counts only the
    nodes that serve it; a pool of `scalable_pools` (JOB_POOLS) with no node known may get its first later.
    A job that fits none of the nodes live now waits, and the scheduler lets it block nobody.
    """
    return never_fits(
        load_nodes(session, ready_only=False), cpu_millis, memory_bytes, gpus, members, has_command=has_command,
        gpu_types=gpu_types, pool=pool, scalable_pools=scalable_pools,
    )


def never_fits(
    nodes: list[NodeCapacity], cpu_millis: int, memory_bytes: int, gpus: int, members: int, *, has_command: bool = True,
    gpu_types: Sequence[str] = (), pool: str | None = None, scalable_pools: Sequence[str] = (),
) -> str | None:
    """why_never_fits on nodes already read (what they hold is ignored): a submit reads them with its INSERT."""
    empty = [n.emptied() for n in nodes]
    if not nodes or place(empty, cpu_millis, memory_bytes, gpus, members, has_command=has_command,
                          gpu_types=gpu_types, pool=pool) is not None:
        return None
    serving = [n for n in nodes if n.serves(gpu_types, pool)]
    if not serving:
        if pool is not None and pool in scalable_pools and not any(n.pool == pool for n in nodes):
            return None  # a pool scaled to zero (JOB_POOLS): its first worker is yet to come
        return f"no known node {describe_constraint(gpu_types, pool)}"
    nodes = serving
    biggest = max(nodes, key=lambda n: (len(n.gpu_indices), n.cpu_millis, n.memory_bytes))
    return (
        f"needs {gpus * members} GPU(s), {format_millis(cpu_millis * members)} CPU and "
        f"{format_bytes(memory_bytes * members)} memory in all; the largest node ({biggest.cluster}/{biggest.name}) "
        f"has {len(biggest.gpu_indices)} GPU(s), {format_millis(biggest.cpu_millis)} CPU, "
        f"{format_bytes(biggest.memory_bytes)} memory"
    )


def describe_constraint(gpu_types: Sequence[str], pool: str | None) -> str:
    """'has GPU type H100 or A100 in pool p', for messages about jobs restricted to some nodes."""
    parts = []
    if gpu_types:
        parts.append("has GPU type " + " or ".join(gpu_types))
    if pool is not None:
        parts.append(f"is in pool {pool}")
    return " and ".join(parts) or "serves it"


MAX_MEMBERS = 100_000  # far beyond any fleet; rows beyond it can only be corrupt or hostile


def malformed(cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> str | None:
    """What makes a stored request impossible to reason about (negative amounts would create capacity)."""
    if min(cpu_millis, memory_bytes, gpus) < 0:
        return f"negative resources (cpu {cpu_millis}m, memory {memory_bytes} bytes, {gpus} GPUs)"
    if not 1 <= members <= MAX_MEMBERS:
        return f"gang of {members} members (1 to {MAX_MEMBERS})"
    return None


def node_alive_since(now: datetime, lease_seconds: float) -> datetime:
    return now - timedelta(seconds=lease_seconds)
