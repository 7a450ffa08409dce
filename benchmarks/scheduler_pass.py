"""One admission pass against PostgreSQL with a big backlog and a big fleet: is it still a few tens of ms?

Loads --pending pending jobs (default 100,000; 20 owners, GPU and CPU-only, a few priority levels,
timeouts) and --nodes nodes of 8 GPUs (default 1,000) whose GPUs all but --free of them are held by
running jobs with timeouts, into the empty database at DATABASE_URL (migrated here). The running jobs started
--ran seconds ago at most (spread; default 3,600; at least PREEMPTION_MIN_RUN_SECONDS + 60 ago when positive), so
with preemption on (the default) the pending priority-80 jobs may preempt the priority-50 fleet, as they would in a
fleet that has been running for a while: each pass then also searches for victims, within
PREEMPTION_MAX_PER_MINUTE; `--ran 0`: every running job started just now (nothing may be preempted yet). Then it runs the
scheduler's real admission pass (app.domain.scheduling.admit: lock, fair-share accrual, snapshot with
the per-owner and per-pool pruning, the policy, the writes) --passes times, as the scheduler process runs
it (one SnapshotCache kept between passes; --no-cache: none), and prints where a pass's time goes: the
fair-share accrual, the snapshot's parts (nodes: the one statement that reads the nodes, the facts below and the
jobs holding capacity; holders: decoding those; the backlog's heads; the rest:
queue counts, usage, quotas, weights), the policy, and the rest of the pass (lock, locking and writing the
admissions, the next wake-up). The first pass (nothing cached) is shown apart, and so are the rows each pass decoded
again (holders and backlog rows not known in their version) and the nodes it recomputed (a node whose holders changed;
every node when one changed). As the scheduler process, it
freezes what startup made out of the garbage collector's full collections before the first pass (--no-freeze:
not). It deletes everything it added when it ends. `--submit-each-pass --pending 0 --nodes 2 --free 2`: the idle pass
of a submit (one job submitted to an idle fleet before each pass, ended after it).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/jobservice_bench python benchmarks/scheduler_pass.py
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from unittest import mock

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import Database  # noqa: E402
from app.domain import fairshare, policy, scheduling  # noqa: E402
from app.domain.jobs import utcnow  # noqa: E402
from config import Settings  # noqa: E402

CLUSTER = "bench"


def migrate(settings: Settings) -> None:
    from flask_migrate import upgrade

    from app import create_app

    with create_app(settings.with_overrides(auth_enabled=False)).app_context():
        upgrade()


def load(database: Database, pending: int, nodes: int, free: int, ran: float = 0.0, min_ran: float = 0.0) -> None:
    with database.engine.begin() as conn:
        started = time.perf_counter()
        conn.execute(text("""
            INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at)
            SELECT :cluster, 'node-' || g, '[0,1,2,3,4,5,6,7]'::jsonb, 'H100', 128000, 1099511627776, 16, true, now() + interval '1 day', now()
            FROM generate_series(1, :n) AS g
        """), {"cluster": CLUSTER, "n": nodes})
        # Every node but `free` runs one 8-GPU job with a timeout (ends spread over the next 4 hours) that
        # also takes nearly all its CPU: the fleet is saturated, as it is when a backlog builds up. Each started
        # between min_ran and ran seconds ago (ran 0: now), its timeout lengthened by as much.
        conn.execute(text("""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              timeout_seconds, created_at, updated_at, pending_since, queued_at, started_at, heartbeat_at,
                              cluster, node, placement, holds_resources, dispatch_token)
            SELECT 'bench-r' || g, 'owner-' || (g % 20), 'bench', 50, 'high-priority', 'running', 'running', '["true"]'::jsonb,
                   126000, 68719476736, 8, 600 + (g * 13) % 14400 + s.ago, now(), now(), now(), now(), now() - s.ago * interval '1 s',
                   now() + interval '1 day',
                   :cluster, 'node-' || g, jsonb_build_array(jsonb_build_object('node', 'node-' || g, 'members', 1, 'gpu_indices', '[]'::jsonb)),
                   true, 't'
            FROM generate_series(1, :n) AS g
            CROSS JOIN LATERAL (SELECT CASE WHEN :ran > 0 THEN :min_ran + (g * 7919) % GREATEST(1, :ran - :min_ran) ELSE 0 END AS ago) AS s
        """), {"cluster": CLUSTER, "n": nodes - free, "ran": int(ran), "min_ran": int(min_ran)})
        conn.execute(text("""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              timeout_seconds, created_at, updated_at, pending_since)
            SELECT 'bench-p' || g, 'owner-' || (g % 20), 'bench', s.priority,
                   CASE WHEN s.priority >= 50 THEN 'high-priority' ELSE 'default' END, 'pending', 'submitted', '["true"]'::jsonb,
                   CASE WHEN g % 3 = 0 THEN 4000 ELSE 8000 END, 17179869184, CASE g % 3 WHEN 0 THEN 0 WHEN 1 THEN 1 ELSE 8 END,
                   60 + (g * 7) % 7200, now() - g * interval '10 ms', now(), now()
            FROM (SELECT g, (ARRAY[20, 50, 50, 80])[1 + g % 4] AS priority FROM generate_series(1, :n) AS g) AS s
        """), {"n": pending})
        conn.execute(text("ANALYZE jobs"))
        print(f"loaded {nodes:,} nodes ({free} free), {nodes - free:,} running and {pending:,} pending jobs "
              f"in {time.perf_counter() - started:.1f}s", flush=True)


def submit(database: Database, number: int) -> None:
    """One 1-GPU job submitted (as the API inserts it) before a pass."""
    with database.engine.begin() as conn:
        conn.execute(text("""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              timeout_seconds, created_at, updated_at, pending_since)
            VALUES ('bench-s' || :n, 'owner-1', 'bench', 50, 'high-priority', 'pending', 'submitted', '["true"]'::jsonb,
                    1000, 1073741824, 1, 600, now(), now(), now())
        """), {"n": number})


def end(database: Database, number: int) -> None:
    """The submitted job ends after its pass (releasing what it holds), so the next pass finds the fleet idle again."""
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'succeeded', holds_resources = false, completed_at = now() "
                          "WHERE id = 'bench-s' || :n"), {"n": number})


def clean(database: Database) -> None:
    with database.engine.begin() as conn:
        conn.execute(text("DELETE FROM outbox WHERE job_id LIKE 'bench-%'"))
        conn.execute(text("DELETE FROM job_events WHERE job_id LIKE 'bench-%'"))
        conn.execute(text("DELETE FROM jobs WHERE id LIKE 'bench-%'"))
        conn.execute(text("DELETE FROM nodes WHERE cluster = :cluster"), {"cluster": CLUSTER})
        conn.execute(text("DELETE FROM fair_share_usage WHERE owner LIKE 'owner-%'"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--free", type=int, default=2, help="nodes with nothing running")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--ran", type=float, default=3600.0,
                        help="the running jobs started up to this many seconds ago (0: just now, so none may be preempted yet)")
    parser.add_argument("--no-cache", action="store_true", help="no SnapshotCache: every pass decodes every row")
    parser.add_argument("--submit-each-pass", action="store_true",
                        help="submit one 1-GPU job before each pass and end it after (the idle pass of a submit: "
                             "use with --pending 0 --nodes 2 --free 2)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave startup's objects in the garbage collector's full collections (the scheduler freezes them)")
    args = parser.parse_args()
    # Queue limits far above the fleet: the pass must cope with the backlog itself, not with a full queue.
    settings = Settings.from_env({"JOB_QUEUES": "high-priority:50-100:1000000,default:0-49:1000000", **os.environ})
    if not settings.database_url:
        sys.exit("set DATABASE_URL to an empty database")
    migrate(settings)
    database = Database(settings.database_url)
    with database.engine.connect() as conn:
        if conn.execute(text("SELECT count(*) FROM jobs")).scalar():
            sys.exit("the database already holds jobs: use an empty one")
    parts = {"accrue": (fairshare, "accrue"), "nodes": (scheduling, "_load_nodes"), "holders": (scheduling, "_load_holders"),
             "backlog": (scheduling, "_load_backlog"), "snapshot": (scheduling, "load_snapshot"), "policy": (policy, "decide")}
    timings: dict[str, list[float]] = {name: [] for name in [*parts, "pass"]}
    reread: dict[str, list[int]] = {"holders decoded": [], "nodes recomputed": [], "backlog decoded": []}

    def timed(name: str, function):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name].append(time.perf_counter() - started)
        return wrapper

    try:
        min_ran = settings.preemption_min_run_seconds + 60 if args.ran > 0 else 0.0
        load(database, args.pending, args.nodes, args.free, max(args.ran, min_ran + 1) if args.ran > 0 else 0.0, min_ran)
        admitted = decisions = preempted = 0
        if not args.no_freeze:
            from app.scheduler import freeze_startup_objects

            freeze_startup_objects()  # as the scheduler process does before its first pass
        cache = None if args.no_cache else scheduling.SnapshotCache()
        with contextlib.ExitStack() as patches:
            for name, (module, attribute) in parts.items():
                patches.enter_context(mock.patch.object(module, attribute, timed(name, getattr(module, attribute))))
            for number in range(args.passes):
                if args.submit_each_pass:
                    submit(database, number)
                with database.session() as session:
                    started = time.perf_counter()
                    result = scheduling.admit(session, settings, utcnow() + timedelta(seconds=number), cache=cache)
                    timings["pass"].append(time.perf_counter() - started)
                if args.submit_each_pass:
                    end(database, number)
                if cache is not None:
                    reread["holders decoded"].append(cache.decoded_holders)
                    reread["nodes recomputed"].append(cache.recomputed_nodes)
                    reread["backlog decoded"].append(cache.decoded_backlog)
                admitted += len(result.admitted)
                preempted += len(result.preempted)
                decisions += len(result.plan.decisions) if result.plan else 0
        print(f"{args.passes} passes ({'no cache' if cache is None else 'one SnapshotCache, as the scheduler'}): {admitted} jobs admitted, "
              f"{preempted} preempted, {decisions / args.passes:,.0f} decisions per pass (the backlog the policy sees after pruning per "
              f"owner and per pool; preemption {'on' if settings.preemption_enabled else 'off'}, running jobs started "
              f"{'up to %.0fs ago' % args.ran if args.ran > 0 else 'just now'}; startup's objects "
              f"{'not ' if args.no_freeze else ''}frozen out of full garbage collections)")
        n = len(timings["pass"])
        timings["snapshot, other"] = [timings["snapshot"][i] - timings["nodes"][i] - timings["holders"][i] - timings["backlog"][i]
                                      for i in range(n)]
        accrued = timings["accrue"] + [0.0] * (n - len(timings["accrue"]))
        timings["pass, other"] = [timings["pass"][i] - timings["snapshot"][i] - timings["policy"][i] - accrued[i] for i in range(n)]
        print("  (first: the first pass, nothing cached yet; p50 and max over the others)")
        for name in ("accrue", "snapshot", "nodes", "holders", "backlog", "snapshot, other", "policy", "pass, other", "pass"):
            values = timings[name]
            rest = values[1:] or values
            label = f"  {name}" if name in ("nodes", "holders", "backlog", "snapshot, other") else name
            print(f"  {label:17s} first {1000 * values[0]:7.1f} ms   p50 {1000 * statistics.median(rest):7.1f} ms   max {1000 * max(rest):7.1f} ms")
        for name, values in reread.items():  # rows the snapshot decoded again (not known in their version)
            if values:
                rest = values[1:] or values
                print(f"  {name:17s} first {values[0]:7d}      p50 {statistics.median(rest):7.0f}      max {max(rest):7d}")
    finally:
        clean(database)
        database.dispose()


if __name__ == "__main__":
    main()
