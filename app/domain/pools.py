"""Worker pools: the demand only one pool can serve and the capacity idle in each, for autoscalers.

A pool is what a worker serves (WORKER_POOL, recorded on its node rows). A pending job bound to a pool
(`resources.pool`) is that pool's demand, whether or not the pool has a node now (an autoscaler may
start its first worker). A job bound only to GPU types is the demand of the one pool whose known nodes
have those types; when several pools could serve it, none is told to grow for it. Jobs bound to
neither can run anywhere and are no pool's demand.

Read at scrape time: the backlog bound to a type or pool is summed by demand class through the
covering partial index ix_jobs_pending_demand (unbound jobs are never read), the nodes are few.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.domain import capacity
from config import Settings

_DEMAND = text(
    """
    SELECT pool, gpu_types, count(*) AS jobs,
           sum(gpus::bigint * CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END) AS gpus
    FROM jobs WHERE status = 'pending' AND (pool IS NOT NULL OR gpu_types IS NOT NULL)
    GROUP BY pool, gpu_types
    """
)


@dataclass(frozen=True)
class PoolDemand:
    pool: str
    pending_jobs: int  # pending jobs only this pool can serve
    pending_gpus: int  # the GPUs they ask for (all members of a gang)
    idle_gpus: int  # free GPUs on its live, ready nodes
    gpus: int  # all GPUs of its live, ready nodes (busy = gpus - idle_gpus)
    nodes: int  # its live, ready nodes


def serving_pools(known: list[capacity.NodeCapacity], gpu_types: tuple[str, ...], pool: str | None) -> set[str]:
    """The pools that could run a job bound to `gpu_types` / `pool`, from the nodes known now."""
    if pool is not None:
        return {pool}
    return {n.pool for n in known if n.pool is not None and n.serves(gpu_types, None)}


def pool_demand(session: Session, settings: Settings, now: datetime) -> list[PoolDemand]:
    """Per pool (every pool with a known node, and the configured JOB_POOLS): demand and idle capacity."""
    known = capacity.load_nodes(session, ready_only=False)
    live = capacity.load_nodes(session, alive_since=capacity.node_alive_since(now, settings.node_lease_seconds))
    jobs: dict[str, int] = defaultdict(int)
    gpus: dict[str, int] = defaultdict(int)
    for row in session.execute(_DEMAND):
        pools = serving_pools(known, tuple(row.gpu_types or ()), row.pool)
        if len(pools) == 1:
            (pool,) = pools
            jobs[pool] += int(row.jobs)
            gpus[pool] += int(row.gpus or 0)
    idle: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    for node in live:
        if node.pool is not None:
            idle[node.pool] += node.gpus_free_count
            total[node.pool] += len(node.gpu_indices)
            count[node.pool] += 1
    names = {n.pool for n in known if n.pool is not None} | set(settings.job_pools) | set(jobs)
    return [PoolDemand(name, jobs[name], gpus[name], idle[name], total[name], count[name]) for name in sorted(names)]
