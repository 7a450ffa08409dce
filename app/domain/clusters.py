"""Clusters as users see them: the local worker hosts from the node registry, Kubernetes clusters from
their live inventory, each with the jobs of this service running there."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain.capacity import LOCAL_CLUSTER, load_nodes
from app.domain.quantities import format_bytes, format_millis
from app.domain.states import JobStatus
from app.models import Job, Node


@dataclass(frozen=True)
class NodeView:
    name: str
    ready: bool
    gpu_total: int
    gpu_available: int
    gpu_type: str | None
    cpu_millis: int
    cpu_available_millis: int
    memory_bytes: int
    memory_available_bytes: int
    state: str = "ready"  # an operator's cordon or drain (app.domain.nodes)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": "ready" if self.ready else "not_ready",
            "state": self.state,
            "gpus": {"total": self.gpu_total, "available": self.gpu_available, "type": self.gpu_type},
            "cpu": {"total": format_millis(self.cpu_millis), "available": format_millis(self.cpu_available_millis)},
            "memory": {"total": format_bytes(self.memory_bytes), "available": format_bytes(self.memory_available_bytes)},
        }


@dataclass(frozen=True)
class ClusterView:
    name: str
    kind: str  # "local" | "kubernetes"
    reachable: bool
    nodes: list[NodeView] = field(default_factory=list)
    max_jobs: int = 0
    running_jobs: int = 0

    @property
    def status(self) -> str:
        if not self.reachable:
            return "unreachable"
        ready = [n for n in self.nodes if n.ready]
        if not ready:
            return "unavailable"
        return "healthy" if len(ready) == len(self.nodes) else "degraded"

    def summary(self) -> dict[str, object]:
        ready = [n for n in self.nodes if n.ready]
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "total_nodes": len(self.nodes),
            "available_gpus": sum(n.gpu_available for n in ready),
            "total_gpus": sum(n.gpu_total for n in self.nodes),
            "running_jobs": self.running_jobs,
            "cordoned_nodes": sum(1 for n in self.nodes if n.state == "cordoned"),
            "draining_nodes": sum(1 for n in self.nodes if n.state == "draining"),
        }

    def detail(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "status": self.status,
            "nodes": [n.as_dict() for n in self.nodes],
            "capacity": {"max_jobs": self.max_jobs, "current_jobs": self.running_jobs},
        }


def running_jobs_by_cluster(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Job.cluster, func.count()).where(Job.status == JobStatus.RUNNING.value).group_by(Job.cluster)
    )
    return {cluster: count for cluster, count in rows if cluster}


def local_cluster(session: Session, now: datetime, node_lease_seconds: float, running: int) -> ClusterView:
    """The worker hosts: a node is ready while its worker heartbeats; free capacity net of admitted jobs."""
    alive_since = now - timedelta(seconds=node_lease_seconds)
    capacity = {n.name: n for n in load_nodes(session) if n.cluster == LOCAL_CLUSTER}
    nodes = []
    slots = 0
    for row in session.scalars(select(Node).where(Node.cluster == LOCAL_CLUSTER).order_by(Node.name)):
        ready = row.ready and row.heartbeat_at >= alive_since
        held = capacity[row.name]
        slots += row.slots if ready else 0
        nodes.append(
            NodeView(
                name=row.name, ready=ready, gpu_total=len(row.gpu_indices), gpu_available=len(held.free_gpus),
                gpu_type=row.gpu_type, cpu_millis=row.cpu_millis,
                cpu_available_millis=max(0, row.cpu_millis - held.used_cpu_millis),
                memory_bytes=row.memory_bytes, memory_available_bytes=max(0, row.memory_bytes - held.used_memory_bytes),
                state=row.state,
            )
        )
    return ClusterView(LOCAL_CLUSTER, "local", True, nodes, slots, running)


def kubernetes_cluster(name: str, inventory: list | None, running: int, states: dict[str, str] | None = None) -> ClusterView:  # type: ignore[type-arg]
    """From the live inventory (app.kube.read_inventory); None when the API server could not be read.
    `states`: the operators' node states of the registry, by node name."""
    if inventory is None:
        return ClusterView(name, "kubernetes", False, [], 0, running)
    nodes = [
        NodeView(
            name=n.name, ready=n.ready and n.schedulable, gpu_total=n.gpu_total, gpu_available=n.gpu_free,
            gpu_type=n.gpu_type, cpu_millis=n.cpu_millis, cpu_available_millis=n.cpu_free_millis,
            memory_bytes=n.memory_bytes, memory_available_bytes=n.memory_free_bytes,
            state=(states or {}).get(n.name, "ready"),
        )
        for n in sorted(inventory, key=lambda n: n.name)
    ]
    max_jobs = sum(n.pods_allocatable for n in inventory if n.ready and n.schedulable)
    return ClusterView(name, "kubernetes", True, nodes, max_jobs, running)
