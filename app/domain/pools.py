"""Worker pools: the demand only one pool can serve and the capacity idle in each, for autoscalers.

A pool is what a worker serves (WORKER_POOL, recorded on its node rows). A pending job bound to a pool
(`resources.pool`) is that pool's demand, whether or not the pool has a node now (an autoscaler may
start its first worker). A job bound only to GPU types is the demand of the one pool whose known nodes
have those types; when several pools could serve it, none is told to grow for it. Jobs bound to
neither can run anywhere and are no pool's demand.

Read at scrape time without reading the backlog: triggers on `jobs` (migration h12_gpu_type) append
per-transaction deltas per demand class (pool, GPU types) to `pool_demand_deltas`, the scheduler folds them
into `pool_demand` (`fold`), and a reader adds both up in one statement, as app.domain.counters does.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain import capacity
from config import Settings

# Demand classes with pending jobs: '' / '{}' stand for "no pool" / "any type".
DEMAND_CLASSES_SQL = """
    SELECT pool, gpu_types, sum(jobs) AS jobs, sum(gpus) AS gpus FROM (
        SELECT pool, gpu_types, jobs, gpus FROM pool_demand
        UNION ALL
        SELECT pool, gpu_types, jobs, gpus FROM pool_demand_deltas
    ) AS d GROUP BY pool, gpu_types HAVING sum(jobs) <> 0
"""
_DEMAND = text(DEMAND_CLASSES_SQL)
_FOLD = text(
    """
    WITH moved AS (DELETE FROM pool_demand_deltas RETURNING pool, gpu_types, jobs, gpus)
    INSERT INTO pool_demand (pool, gpu_types, jobs, gpus)
    SELECT pool, gpu_types, sum(jobs), sum(gpus) FROM moved GROUP BY pool, gpu_types
    ON CONFLICT (pool, gpu_types) DO UPDATE SET jobs = pool_demand.jobs + EXCLUDED.jobs, gpus = pool_demand.gpus + EXCLUDED.gpus
    """
)
FOLD_LOCK = 7_311_012  # one folder at a time (concurrent upserts of the same classes could deadlock)


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
        pools = serving_pools(known, tuple(row.gpu_types or ()), row.pool or None)
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


def fold(session: Session) -> int:
    """Move the demand deltas into `pool_demand` (the scheduler, every sweep); classes that emptied are dropped."""
    with transaction(session):
        if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": FOLD_LOCK}):
            return 0
        moved = session.execute(_FOLD).rowcount
        session.execute(text("DELETE FROM pool_demand WHERE jobs = 0 AND gpus = 0"))
        return moved
