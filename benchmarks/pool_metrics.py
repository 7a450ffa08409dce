"""The per-pool autoscaling figures and the scheduler's snapshot with a big backlog bound to GPU types and pools.

Loads --nodes nodes (8 GPUs each) in 4 pools (h100, a100, l40s, spot-a100: two pools share the A100 type) and
--pending pending jobs into the empty database at DATABASE_URL: a quarter unbound, a quarter naming a pool, half
naming GPU types (one type or a list). Prints p50/max of app.domain.pools.pool_demand (what a /metrics scrape
adds) and of the scheduler's snapshot load (app.domain.scheduling.load_snapshot, with the head of every demand
class), then deletes what it added.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/jobservice_bench python benchmarks/pool_metrics.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import Database  # noqa: E402
from app.domain import pools, scheduling  # noqa: E402
from app.domain.jobs import utcnow  # noqa: E402
from benchmarks.scheduler_pass import migrate  # noqa: E402
from config import Settings  # noqa: E402

CLUSTER = "bench"


def load(database: Database, pending: int, nodes: int) -> None:
    with database.engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, pool, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at)
            SELECT :cluster, 'node-' || g, '[0,1,2,3,4,5,6,7]'::jsonb,
                   (ARRAY['NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB', 'NVIDIA L40S', 'NVIDIA A100-SXM4-80GB'])[1 + g % 4],
                   (ARRAY['h100', 'a100', 'l40s', 'spot-a100'])[1 + g % 4], 128000, 1099511627776, 16, true, now() + interval '1 day', now()
            FROM generate_series(1, :n) AS g
        """), {"cluster": CLUSTER, "n": nodes})
        conn.execute(text("""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              gpu_types, pool, timeout_seconds, created_at, updated_at, pending_since)
            SELECT 'bench-p' || g, 'owner-' || (g % 20), 'bench', 50, 'high-priority', 'pending', 'submitted', '["true"]'::jsonb,
                   4000, 17179869184, 1 + g % 8,
                   CASE g % 8 WHEN 2 THEN ARRAY['NVIDIA H100 80GB HBM3'] WHEN 3 THEN ARRAY['NVIDIA L40S']
                              WHEN 4 THEN ARRAY['NVIDIA H100 80GB HBM3', 'NVIDIA L40S'] WHEN 5 THEN ARRAY['NVIDIA A100-SXM4-80GB'] END,
                   CASE WHEN g % 8 IN (6, 7) THEN (ARRAY['h100', 'a100', 'l40s', 'spot-a100'])[1 + g % 4] END,
                   3600, now() - g * interval '10 ms', now(), now()
            FROM generate_series(1, :n) AS g
        """), {"n": pending})
        conn.execute(text("ANALYZE jobs"))
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM jobs"))  # the visibility map: the demand sums are index-only scans


def clean(database: Database) -> None:
    with database.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id LIKE 'bench-%'"))
        conn.execute(text("DELETE FROM nodes WHERE cluster = :cluster"), {"cluster": CLUSTER})


def timed(function, repeat: int) -> list[float]:  # type: ignore[no-untyped-def]
    values = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        values.append(time.perf_counter() - started)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    settings = Settings.from_env({"JOB_QUEUES": "high-priority:50-100:1000000,default:0-49:1000000", **os.environ})
    if not settings.database_url:
        sys.exit("set DATABASE_URL to an empty database")
    migrate(settings)
    database = Database(settings.database_url)
    with database.engine.connect() as conn:
        if conn.execute(text("SELECT count(*) FROM jobs")).scalar():
            sys.exit("the database already holds jobs: use an empty one")
    try:
        load(database, args.pending, args.nodes)
        print(f"{args.nodes:,} nodes in 4 pools, {args.pending:,} pending jobs (3/4 bound to a type or pool)")
        with database.session() as session:
            rows = pools.pool_demand(session, settings, utcnow())
            for row in rows:
                print(f"  pool {row.pool:10s} pending jobs {row.pending_jobs:7,}  pending GPUs {row.pending_gpus:8,}  idle GPUs {row.idle_gpus:6,}")
            for name, function in [("pool_demand", lambda: pools.pool_demand(session, settings, utcnow())),
                                   ("load_snapshot", lambda: scheduling.load_snapshot(session, settings, utcnow()))]:
                values = timed(function, args.repeat)
                print(f"  {name:14s} p50 {1000 * statistics.median(values):7.1f} ms   max {1000 * max(values):7.1f} ms")
    finally:
        clean(database)
        database.dispose()


if __name__ == "__main__":
    main()
