"""Kubernetes executor at scale: N concurrently running jobs under one worker process, against the project's
fake API server (run in a process of its own, so that threads and memory measured here are the worker's).

The worker's real code path: each job is a queued row in PostgreSQL (DATABASE_URL, migrated here; the
benchmark's own rows are deleted first), and `--launchers` threads run the Celery task's body
(`SupervisingRunner.run`: claim, create the Job, hand it to the supervisor, return) for all of them. The
process's one supervisor then watches every attempt through the shared informers, renews the leases in
one statement per round, stores the logs and records each end in PostgreSQL.

Prints: Job creates/s (claim + create, through the client-side rate limiter), watches opened (shared
informers: 2 per cluster, whatever N), threads (log followers: one per running member; no thread per job
otherwise), memory per running job (RSS; `--heap`: Python heap by tracemalloc, which slows creates tenfold),
and the time from a pod's end to its end being recorded in PostgreSQL (p50/p99). With `--heap` the heap is split
into the job's own part, its log stream, the log buffers (lines read, not yet stored) and the benchmark's own
bookkeeping, and RSS besides log buffers is printed: the issue's "memory per running job besides log buffers".

    DATABASE_URL=postgresql://... python benchmarks/kubernetes_executor.py --jobs 1000 --hold 40 [--qps 0]

Use a database no test run truncates meanwhile. It is CPU-bound on a small machine (the worker process and the
fake server share the cores): creates/s falls with the machine's load, so compare runs on a quiet machine.
"""
from __future__ import annotations

import argparse
import inspect
import multiprocessing
import os
import secrets
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


class Observer:
    """The pod's last line (its end is hold/2 later) and the time its end was recorded, per job: wraps the
    supervisor's log sink and end report (a class of its own, so that the heap report can set it apart)."""

    def __init__(self, sink: Callable[..., Any], report: Callable[..., Any]) -> None:
        self.real_sink, self.real_report = sink, report
        self.last_line: dict[str, datetime] = {}
        self.recorded: dict[str, datetime] = {}
        self.lock = threading.Lock()

    def sink(self, job_id: str, attempt: int) -> Callable[[list[Any]], None]:
        store = self.real_sink(job_id, attempt)

        def add(lines: list[Any]) -> None:
            with self.lock:
                latest = max(line.at for line in lines)
                if job_id not in self.last_line or self.last_line[job_id] < latest:
                    self.last_line[job_id] = latest
            store(lines)
        return add

    def report(self, job: Any, token: str, outcome: Any) -> str:
        status = self.real_report(job, token, outcome)
        with self.lock:
            self.recorded[job.job_id] = datetime.now(UTC)
        return status


HEAP_FRAMES = 40  # deep enough to see, from a socket read, the log follower method that does it


def _span(code: Any) -> tuple[str, int, int]:
    lines, first = inspect.getsourcelines(code)
    return str(Path(inspect.getsourcefile(code) or "").resolve()), first, first + len(lines) - 1


def heap_parts(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int) -> tuple[dict[str, int], list[str]]:
    """The heap grown between two snapshots, by part: "log buffers" (lines read and not yet stored: a follower's
    partial line and read buffers, the budget's and the flusher's pending lines), "log streams" (the rest of the
    followers: thread objects, connections, responses), "benchmark" (its own bookkeeping), and "per job" (all
    the rest: informer caches, executions, supervision). With the `top` sites of "per job"."""
    from workers import log_budget, supervisor
    from workers.executors.kubernetes import logs as kube_logs

    buffers = [_span(code) for code in (kube_logs._LogFollower._consume, kube_logs._LogFollower._deliver,
                                        log_budget.LogBudget.__call__, supervisor.SupervisedLogs.sink)]
    streams = [_span(kube_logs._LogFollower)]
    bench = [_span(Observer)]

    def within(frame: tracemalloc.Frame, spans: list[tuple[str, int, int]]) -> bool:
        return any(frame.filename == name and first <= frame.lineno <= last for name, first, last in spans)

    parts = {"per job": 0, "log buffers": 0, "log streams": 0, "benchmark": 0}
    sites: dict[str, int] = {}
    for stat in after.compare_to(before, "traceback"):
        frames = list(stat.traceback)
        if any(within(f, buffers) for f in frames):
            parts["log buffers"] += stat.size_diff
        elif any(within(f, streams) for f in frames):
            parts["log streams"] += stat.size_diff
        elif any(within(f, bench) for f in frames):
            parts["benchmark"] += stat.size_diff
        else:
            parts["per job"] += stat.size_diff
            ours = next((f for f in reversed(frames) if str(ROOT) in f.filename and ".venv" not in f.filename), None)
            where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}"
            if ours is not None:
                where += f" <- {Path(ours.filename).relative_to(ROOT)}:{ours.lineno}"
            sites[where] = sites.get(where, 0) + stat.size_diff
    ranked = sorted(sites.items(), key=lambda item: -item[1])[:top]
    return parts, [f"{size / 1024:10.0f} KiB  {where}" for where, size in ranked]


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
    parser.add_argument("--heap", action="store_true", help="measure the Python heap with tracemalloc (slower), "
                        "log buffers apart")
    parser.add_argument("--heap-top", type=int, default=0, help="with --heap: print the N largest allocation sites")
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

    observer = Observer(supervisor.logs.sink, supervisor._report)
    supervisor.logs.sink = observer.sink  # type: ignore[method-assign]
    supervisor._report = observer.report  # type: ignore[method-assign]
    last_line, recorded = observer.last_line, observer.recorded

    threads_before = threading.active_count()
    rss_before = rss_bytes()
    if args.heap:
        tracemalloc.start(HEAP_FRAMES)
        heap_before = tracemalloc.take_snapshot()

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
    stats = supervisor.stats()
    if args.heap:
        heap_running = tracemalloc.take_snapshot()
        tracemalloc.stop()  # the rest runs at full speed

    while len(recorded) < args.jobs and time.monotonic() < started + args.hold * 3 + 120:
        time.sleep(0.2)
    supervisor.stop()  # before the fake server goes: no reconnecting watch or log stream meanwhile
    executor.close()
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
    # Per supervised attempt: every one holds its informer entries, execution and log stream, first line or not.
    supervised = max(1, stats["running"])
    print(f"memory per running job: RSS {(rss_running - rss_before) / supervised / 1024:.1f} KiB "
          f"({supervised} supervised; RSS includes each log follower thread's stack and interpreter state)")
    if args.heap:
        parts, sites = heap_parts(heap_before, heap_running, args.heap_top)
        total = sum(parts.values())
        print(f"Python heap per running job: {total / supervised / 1024:.1f} KiB = "
              + ", ".join(f"{name} {size / supervised / 1024:.1f} KiB" for name, size in parts.items())
              + f"; RSS besides log buffers {(rss_running - rss_before - parts['log buffers']) / supervised / 1024:.1f} KiB")
        if sites:
            print("largest allocation sites of the per-job part (innermost frame <- the project's):")
            print("\n".join(sites))
    print(f"lease rounds (one statement each for all attempts): {supervisor.lease_rounds}; log flushes: {supervisor.logs.flushes}")
    if latencies:
        print(f"pod's end -> end recorded in PostgreSQL: p50 {statistics.median(latencies):.2f}s, "
              f"p99 {latencies[max(0, int(len(latencies) * 0.99) - 1)]:.2f}s (includes reading the last log lines)")


if __name__ == "__main__":
    main()
