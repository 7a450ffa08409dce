"""Kubernetes executor at scale: N concurrently running jobs under one worker process, against the project's
fake API server (run in a process of its own, so that threads and memory measured here are the worker's).

The worker's real code path: each job is a queued row in PostgreSQL (DATABASE_URL, migrated here; the
benchmark's own rows are deleted first), and `--launchers` threads run the Celery task's body
(`SupervisingRunner.run`: claim, create the Job, hand it to the supervisor, return) for all of them. The
process's one supervisor then watches every attempt through the shared informers, renews the leases in
one statement per round, stores the logs and records each end in PostgreSQL.

Prints: Job creates/s (claim + create, through the client-side rate limiter), watches opened (shared
informers: 2 per cluster, whatever N), threads (log followers: one per running member; no thread per job
otherwise), memory per running job (RSS; `--heap`: Python heap by tracemalloc, which slows everything),
and the time from a pod's end to its end being recorded in PostgreSQL (p50/p99).

    DATABASE_URL=postgresql://... python benchmarks/kubernetes_executor.py --jobs 1000 --hold 40 [--qps 0]

Use a database no test run truncates meanwhile. It is CPU-bound on a small machine (the worker process and the
fake server share the cores): creates/s falls with the machine's load, so compare runs on a quiet machine.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import statistics
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLUSTER = "bench"
PREFIX = "kbench-"


def serve(queue: multiprocessing.Queue, nodes: int, hold: float, done: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    from tests.k8s_fake import FakeKubernetes, FakeNode, Script

    with FakeKubernetes([FakeNode(f"node-{i}", gpus=0, cpu_millis=1_000_000, memory_bytes=2**42) for i in range(nodes)],
                        step=0.05) as fake:
        # "started", then "finished" hold/2 later, then the container exits hold/2 after that.
        fake.scripts["bench/hold"] = Script(lines=["started", "finished"], line_interval=hold / 2)
        queue.put(fake.url)
        done.wait()
        queue.put(sum(1 for r in fake.requests if r.query.get("watch") == "true"))


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=40.0, help="seconds each job runs (all must be running at once)")
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--qps", type=float, default=0.0, help="client-side QPS (0: unlimited)")
    parser.add_argument("--launchers", type=int, default=16, help="threads running the launch task (Celery's pool)")
    parser.add_argument("--heap", action="store_true", help="measure the Python heap with tracemalloc (slower)")
    args = parser.parse_args()

    from kubernetes import client
    from sqlalchemy import text

    from app import logs
    from app.db import Database
    from app.kube import RateLimitedApiClient, TokenBucket, tune_configuration
    from benchmarks.scheduler_pass import migrate
    from config import Settings
    from workers.executors.kubernetes import KubernetesExecutor, RetryPolicy, Timings
    from workers.supervisor import SupervisingRunner

    settings = Settings.from_env({**os.environ, "KUBERNETES_MAX_SUPERVISED": str(args.jobs)})
    if not settings.database_url:
        sys.exit("set DATABASE_URL (the benchmark migrates it and deletes its own kbench- rows)")
    migrate(settings)
    logs.configure(os.environ.get("BENCH_LOG_LEVEL", "WARNING"), "text")  # not a line per job (after the app's setup)
    database = Database(settings.database_url, pool_size=5, application_name="jobservice-worker/bench")
    tokens = {f"{PREFIX}{i:05d}": secrets.token_hex(8) for i in range(args.jobs)}
    with database.engine.begin() as conn:
        conn.execute(text(f"DELETE FROM job_log_lines WHERE job_id LIKE '{PREFIX}%'"))
        conn.execute(text(f"DELETE FROM job_events WHERE job_id LIKE '{PREFIX}%'"))
        conn.execute(text(f"DELETE FROM jobs WHERE id LIKE '{PREFIX}%'"))
        conn.execute(text("""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, image, cpu_millis, memory_bytes,
                              cluster, node, placement, holds_resources, dispatch_token, queued_at)
            SELECT t.id, 'bench', 'bench', 10, 'default', 'queued', 'bench/hold', 10, 1048576, :cluster,
                   'node-' || (row_number() OVER () % :nodes),
                   jsonb_build_array(jsonb_build_object('node', 'node-' || (row_number() OVER () % :nodes), 'members', 1)),
                   true, t.token, now()
            FROM unnest(CAST(:ids AS text[]), CAST(:tokens AS text[])) AS t(id, token)
        """), {"cluster": CLUSTER, "nodes": args.nodes, "ids": list(tokens), "tokens": list(tokens.values())})

    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    done = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(queue, args.nodes, args.hold, done), daemon=True)
    server.start()
    url = queue.get(timeout=60)

    configuration = tune_configuration(client.Configuration(host=url), pool_maxsize=args.jobs + 64)
    api = RateLimitedApiClient(configuration, TokenBucket(args.qps, max(1, int(args.qps * 2))))
    executor = KubernetesExecutor(api, "bench", CLUSTER, timings=Timings(gang_start_timeout_seconds=600, log_drain_seconds=5),
                                  retry=RetryPolicy(base_delay=0.2))
    runner = SupervisingRunner(settings, database, executor, worker_id="worker-bench")
    supervisor = runner.supervisor

    # The pod's last line (its end is hold/2 later) and the time its end was recorded, per job.
    last_line: dict[str, datetime] = {}
    recorded: dict[str, datetime] = {}
    lock = threading.Lock()
    real_sink, real_report = supervisor.logs.sink, supervisor._report

    def sink(job_id: str, attempt: int):  # type: ignore[no-untyped-def]
        store = real_sink(job_id, attempt)

        def add(lines):  # type: ignore[no-untyped-def]
            with lock:
                last_line[job_id] = max([line.at for line in lines] + ([last_line[job_id]] if job_id in last_line else []))
            store(lines)
        return add

    def report(job, token, outcome):  # type: ignore[no-untyped-def]
        status = real_report(job, token, outcome)
        with lock:
            recorded[job.job_id] = datetime.now(UTC)
        return status

    supervisor.logs.sink = sink  # type: ignore[method-assign]
    supervisor._report = report  # type: ignore[method-assign]

    threads_before = threading.active_count()
    rss_before = rss_bytes()
    if args.heap:
        tracemalloc.start()
    heap_before = tracemalloc.get_traced_memory()[0] if args.heap else 0

    started = time.monotonic()
    with ThreadPoolExecutor(args.launchers) as pool:
        answers = list(pool.map(lambda pair: runner.run(*pair), tokens.items()))
    create_seconds = time.monotonic() - started
    jobs, pods = executor.informers()

    # All running: every attempt's first line has arrived.
    deadline = started + args.hold
    while len(last_line) < args.jobs and time.monotonic() < deadline:
        time.sleep(0.1)
    running = len(last_line)
    threads_running = threading.active_count()
    rss_running = rss_bytes()
    heap_running = tracemalloc.get_traced_memory()[0] if args.heap else 0
    stats = supervisor.stats()

    while len(recorded) < args.jobs and time.monotonic() < started + args.hold * 3 + 120:
        time.sleep(0.2)
    done.set()
    watches = queue.get(timeout=30)
    with database.engine.connect() as conn:
        statuses = dict(conn.execute(text(f"SELECT status, count(*) FROM jobs WHERE id LIKE '{PREFIX}%' GROUP BY status")).all())
        stored = conn.execute(text(f"SELECT count(*) FROM job_log_lines WHERE job_id LIKE '{PREFIX}%'")).scalar()

    latencies = sorted((recorded[j] - last_line[j]).total_seconds() - args.hold / 2 for j in recorded if j in last_line)
    print(f"jobs: {args.jobs}, launch answers: {dict((a, answers.count(a)) for a in set(answers))}, "
          f"running at once: {running}, supervised then: {stats['running']}, recorded: {statuses}, log lines stored: {stored}")
    print(f"Job creates/s: {args.jobs / create_seconds:.0f} ({create_seconds:.1f}s for {args.jobs}: claim + create, "
          f"{args.launchers} launcher threads, qps {args.qps or 'unlimited'})")
    print(f"watches opened (incl. resumes): {watches}; informers: jobs {jobs.lists} lists, pods {pods.lists} lists")
    print(f"threads: {threads_before} before, {threads_running} with {running} running (log followers: one per member; "
          f"the launch threads are idle again)")
    print(f"memory per running job: RSS {(rss_running - rss_before) / max(1, running) / 1024:.1f} KiB"
          + (f", Python heap {(heap_running - heap_before) / max(1, running) / 1024:.1f} KiB" if args.heap else ""))
    print(f"lease rounds (one statement each for all attempts): {supervisor.lease_rounds}; log flushes: {supervisor.logs.flushes}")
    if latencies:
        print(f"pod's end -> end recorded in PostgreSQL: p50 {statistics.median(latencies):.2f}s, "
              f"p99 {latencies[max(0, int(len(latencies) * 0.99) - 1)]:.2f}s (includes reading the last log lines)")
    supervisor.stop()
    executor.close()


if __name__ == "__main__":
    main()
