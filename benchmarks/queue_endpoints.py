"""Queue and metrics endpoints with a million pending jobs: p50/p99 latency over real HTTP.

Loads --jobs pending jobs (default 1,000,000) with their submit events, plus --history finished jobs
spread over the last 23 hours (each with its pending/queued/running/end events, so the 24 h metrics
have real work to add up), with INSERT ... SELECT generate_series into the database at DATABASE_URL.
Then it starts the API (gunicorn, gthread) and times each endpoint from a client over HTTP, one
request at a time. It refuses a database that already holds jobs, and deletes everything it added
when it ends (jobs, events, roll-ups, its node), even when interrupted.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/jobservice_bench6 python benchmarks/queue_endpoints.py

The API runs without REDIS_URL, so the submit-latency histogram (Redis) is neither written nor read.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import Database  # noqa: E402
from app.domain import counters  # noqa: E402
from app.domain.stats import PendingEntry, encode_cursor  # noqa: E402
from config import Settings  # noqa: E402

BENCH_NODE = "bench-node"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def queue_case(settings: Settings, column: str) -> str:
    """The SQL that maps a priority to its queue, from the same settings the API uses."""
    arms = " ".join(f"WHEN {column} BETWEEN {q.min_priority} AND {q.max_priority} THEN '{q.name}'" for q in settings.queues)
    return f"CASE {arms} END"


def load(database: Database, settings: Settings, prefix: str, jobs: int, history: int) -> None:
    queue = queue_case(settings, "s.priority")
    with database.engine.begin() as conn:
        started = time.perf_counter()
        # Pending, submitted over the last 23 hours: half at one priority (10, as when most callers keep a
        # default; the worst case for ranking inside a level), the other half spread over 0..99.
        conn.execute(text(f"""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes,
                              created_at, updated_at, pending_since)
            SELECT :prefix || 'p' || s.g, 'bench', 'bench', s.priority, {queue}, 'pending', 'submitted', '["true"]'::jsonb,
                   1000, 1073741824, s.at, s.at, s.at
            FROM (SELECT g, CASE WHEN g % 2 = 0 THEN 10 ELSE (g * 37) % 100 END AS priority, now() - interval '23 hours' + g * (interval '23 hours' / :n) AS at
                  FROM generate_series(1, :n) AS g) AS s
        """), {"prefix": prefix, "n": jobs})
        conn.execute(text("""
            INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor)
            SELECT id, created_at, NULL, 'pending', 'submitted', 'bench' FROM jobs
            WHERE owner = 'bench' AND status = 'pending' AND id LIKE :prefix || 'p%' ORDER BY created_at
        """), {"prefix": prefix})
        print(f"loaded {jobs:,} pending jobs and their submit events in {time.perf_counter() - started:.1f}s", flush=True)
        if history:
            started = time.perf_counter()
            # Finished: dispatch 5..300 ms, execution 1 s..10 min (skewed short), 1 in 10 failed.
            conn.execute(text(f"""
                INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command,
                                  created_at, updated_at, pending_since, started_at, completed_at, exit_code)
                SELECT :prefix || 'h' || s.g, 'bench', 'bench', s.priority, {queue},
                       CASE WHEN s.g % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 'bench', '["true"]'::jsonb,
                       s.at, s.at, s.at, s.at + s.dispatch, s.at + s.dispatch + s.run, CASE WHEN s.g % 10 = 0 THEN 1 ELSE 0 END
                FROM (SELECT g, (g * 53) % 100 AS priority,
                             now() - interval '23 hours' + g * (interval '23 hours' / :n) AS at,
                             interval '5 ms' + ((g::bigint * 7919) % 295) * interval '1 ms' AS dispatch,
                             interval '1 s' + power((g::bigint * 104729) % 1000 / 1000.0, 3) * interval '600 s' AS run
                      FROM generate_series(1, :n) AS g) AS s
            """), {"prefix": prefix, "n": history})
            conn.execute(text("""
                INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor, exit_code)
                SELECT j.id, e.at, e.from_status, e.to_status, 'bench', 'bench', e.exit_code
                FROM jobs j
                CROSS JOIN LATERAL (VALUES
                    (1, j.created_at, NULL, 'pending', NULL),
                    (2, j.started_at - interval '2 ms', 'pending', 'queued', NULL),
                    (3, j.started_at, 'queued', 'running', NULL),
                    (4, j.completed_at, 'running', j.status, j.exit_code)
                ) AS e(seq, at, from_status, to_status, exit_code)
                WHERE j.owner = 'bench' AND j.id LIKE :prefix || 'h%'
                ORDER BY j.id, e.seq
            """), {"prefix": prefix})
            print(f"loaded {history:,} finished jobs with 4 events each in {time.perf_counter() - started:.1f}s", flush=True)
        # A live node far into the future, so that explain replays a real admission walk.
        conn.execute(text("""
            INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, heartbeat_at)
            VALUES ('local', :name, '[0, 1, 2, 3]'::jsonb, 64000, 274877906944, 8, now() + interval '1 day')
        """), {"name": BENCH_NODE})
    with database.session() as session:
        counters.fold(session)  # what the scheduler does every sweep
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        started = time.perf_counter()
        # What autovacuum does soon after a bulk load (the delta tables are tuned to be vacuumed early).
        for table in ("jobs", "job_events", "job_count_deltas", "job_counts", "job_stats_deltas", "job_stats", "job_stat_buckets"):
            conn.execute(text(f"VACUUM ANALYZE {table}"))
        print(f"vacuum analyze in {time.perf_counter() - started:.1f}s", flush=True)


def cleanup(database: Database, prefix: str, extra_ids: list[str]) -> None:
    started = time.perf_counter()
    with database.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE owner = 'bench' AND id LIKE :prefix || '%'"), {"prefix": prefix})
        if extra_ids:
            conn.execute(text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": extra_ids})
        conn.execute(text("DELETE FROM nodes WHERE cluster = 'local' AND name = :name"), {"name": BENCH_NODE})
        # The roll-ups were empty when we started (checked), so all of them are ours.
        conn.execute(text("DELETE FROM job_stats"))
        conn.execute(text("DELETE FROM job_stat_buckets"))
        conn.execute(text("DELETE FROM job_stats_deltas"))
    with database.session() as session:
        counters.fold(session)
    with database.engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM jobs")).scalar()
    print(f"cleaned up in {time.perf_counter() - started:.1f}s; jobs left in the database: {left}", flush=True)


def measure(name: str, call: Callable[[], requests.Response], n: int, results: list[tuple[str, float, float, int]]) -> None:
    for _ in range(min(10, n)):
        response = call()
        assert response.status_code in (200, 201), (name, response.status_code, response.text[:500])
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code in (200, 201), (name, response.status_code, response.text[:500])
    results.append((name, percentile(times, 0.5), percentile(times, 0.99), n))
    print(f"{name:58s} p50 {percentile(times, 0.5):8.2f} ms   p99 {percentile(times, 0.99):8.2f} ms   (n={n})", flush=True)


def sql_ms(database: Database, statement: str, params: dict[str, object], n: int = 5) -> tuple[float, float]:
    times = []
    with database.engine.connect() as conn:
        for _ in range(n):
            started = time.perf_counter()
            conn.execute(text(statement), params).all()
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


OLD_QUEUE_POSITION = """
    SELECT count(*) FROM jobs WHERE status = 'pending' AND queue = :queue
      AND (priority > :priority OR (priority = :priority AND (created_at < :created_at OR (created_at = :created_at AND id < :id))))
"""
ADMIT_CANDIDATES = """
    SELECT id FROM jobs WHERE status = 'pending' AND (not_before IS NULL OR not_before <= now())
    ORDER BY priority DESC, created_at, id LIMIT 500
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000, help="pending jobs to load")
    parser.add_argument("--history", type=int, default=100_000, help="finished jobs over the last 23 hours")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per endpoint")
    args = parser.parse_args()
    settings = Settings.from_env()
    if not settings.database_url:
        sys.exit("set DATABASE_URL to a database of its own, e.g. postgresql://postgres@127.0.0.1:5432/jobservice_bench6")
    env = {
        **{k: v for k, v in os.environ.items() if k != "REDIS_URL"},
        "AUTH_ENABLED": "false", "RATELIMIT_ENABLED": "false", "LOG_LEVEL": "WARNING",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    database = Database(settings.database_url)
    with database.engine.connect() as conn:
        existing = conn.execute(text("SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM job_stats)")).scalar()
    if existing:
        sys.exit("this database already holds jobs or roll-ups: give the benchmark a database of its own")

    prefix = f"bench-{secrets.token_hex(3)}-"
    submitted: list[str] = []
    server: subprocess.Popen[bytes] | None = None
    try:
        load(database, settings, prefix, args.jobs, args.history)
        port = free_port()
        server = subprocess.Popen(
            ["gunicorn", "--worker-class", "gthread", "--workers", "1", "--threads", "4", "--bind", f"127.0.0.1:{port}",
             "--log-level", "warning", "app:create_app()"],
            env=env, cwd=ROOT, start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        http = requests.Session()
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get(f"{base}/api/v1/health/live", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)

        default = settings.queue_for_priority(0).name
        with database.engine.connect() as conn:
            first = conn.execute(text(
                "SELECT id FROM jobs WHERE status = 'pending' AND queue = :q ORDER BY priority DESC, created_at, id LIMIT 1"), {"q": default}).scalar()
            depth = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'pending' AND queue = :q"), {"q": default}).scalar()
            # Setup only (not timed): a job in the middle of the default queue, and the middle of its priority level.
            middle = conn.execute(text(
                "SELECT id, priority, created_at FROM jobs WHERE status = 'pending' AND queue = :q "
                "ORDER BY priority DESC, created_at, id OFFSET :k LIMIT 1"), {"q": default, "k": depth // 2}).one()
            last = conn.execute(text(
                "SELECT id, priority, created_at FROM jobs WHERE status = 'pending' AND queue = :q "
                "ORDER BY priority, created_at DESC, id DESC LIMIT 1"), {"q": default}).one()
        deep_cursor = encode_cursor(PendingEntry(middle.id, middle.priority, middle.created_at, middle.created_at, None))
        print(f"\nqueue {default}: {depth:,} pending; timing {args.requests} requests per endpoint over HTTP\n", flush=True)

        results: list[tuple[str, float, float, int]] = []
        url = f"{base}/api/v1"
        measure("GET /api/v1/queues/", lambda: http.get(f"{url}/queues/"), args.requests, results)
        measure(f"GET /api/v1/queues/{default} (first page of 50)", lambda: http.get(f"{url}/queues/{default}"), args.requests, results)
        measure(f"GET /api/v1/queues/{default}?after=<middle>&limit=100",
                lambda: http.get(f"{url}/queues/{default}", params={"after": deep_cursor, "limit": 100}), args.requests, results)
        measure("GET /api/v1/metrics/", lambda: http.get(f"{url}/metrics/"), args.requests, results)
        measure("GET /metrics (Prometheus)", lambda: http.get(f"{base}/metrics"), args.requests, results)
        measure("GET /api/v1/jobs/{first}/explain", lambda: http.get(f"{url}/jobs/{first}/explain"), args.requests, results)
        measure("GET /api/v1/jobs/{middle}/explain", lambda: http.get(f"{url}/jobs/{middle.id}/explain"), args.requests, results)
        measure("GET /api/v1/jobs/{middle} (queue_position)", lambda: http.get(f"{url}/jobs/{middle.id}"), args.requests, results)
        measure("GET /api/v1/jobs/{last} (queue_position)", lambda: http.get(f"{url}/jobs/{last.id}"), args.requests, results)
        measure("GET /api/v1/jobs/?status=pending (list with total, admin)", lambda: http.get(f"{url}/jobs/", params={"status": "pending"}), args.requests, results)
        measure("GET /api/v1/jobs/{middle}/events", lambda: http.get(f"{url}/jobs/{middle.id}/events"), args.requests, results)

        def submit() -> requests.Response:
            response = http.post(f"{url}/jobs/", json={"job_type": "bench", "priority": 0, "command": ["true"],
                                                        "resources": {"cpu": "100m", "memory": "64Mi"}})
            if response.status_code == 201:
                submitted.append(response.json()["id"])
            return response

        measure("POST /api/v1/jobs/ (lands last: queue_position ~ depth)", submit, min(args.requests, 100), results)

        print("\nThe same figures straight from PostgreSQL (median / max of 5, ms):")
        for label, row in (("middle", middle), ("last", last)):
            params = {"queue": default, "priority": row.priority, "created_at": row.created_at, "id": row.id}
            old = sql_ms(database, OLD_QUEUE_POSITION, params)
            with database.session() as session:
                started = time.perf_counter()
                for _ in range(5):
                    counters.pending_position(session, default, row.priority, row.created_at, row.id)
                new = (time.perf_counter() - started) * 1000 / 5
            print(f"  queue_position of the {label} job: previous COUNT(*) query {old[0]:.1f} / {old[1]:.1f}; "
                  f"counters.pending_position {new:.1f} (mean)")
        admit = sql_ms(database, ADMIT_CANDIDATES, {}, 3)
        print(f"  scheduler's candidate query (admit(), ORDER BY over every queue): {admit[0]:.1f} / {admit[1]:.1f}")
        listing = sql_ms(database, "SELECT count(*) FROM jobs WHERE priority >= 0", {}, 3)
        print(f"  COUNT(*) of every job, what GET /jobs/'s total costs a non-admin with as many jobs (admins read the counters): {listing[0]:.1f} / {listing[1]:.1f}")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        cleanup(database, prefix, submitted)
        database.dispose()


if __name__ == "__main__":
    main()
