"""Dispatch benchmark: submit N jobs of `true` over HTTP and measure submit rate and dispatch latency.

Starts the real stack (gunicorn API, scheduler, Celery workers) against DATABASE_URL/REDIS_URL, or
the embedded PostgreSQL and Redis when they are unset. Dispatch latency is measured from each job's
recorded times: created_at (submit committed) -> the `running` event (a worker claimed it).

    python benchmarks/dispatch.py --jobs 500 --workers 1 --concurrency 4 --clients 8
    python benchmarks/dispatch.py --submit-only --jobs 3000 --clients 16           # POST /jobs/ rate, p50/p99
    python benchmarks/dispatch.py --submit-only --jobs 20000 --clients 2 --batch 1000  # POST /jobs/batch

    python benchmarks/dispatch.py --idle 50 --workers 1 --concurrency 2            # idle dispatch, one job at a time

`--idle N` submits N jobs one at a time, each after the previous one ended and a pause, and prints the
idle dispatch latency: the submit's commit (the job's created_at, set just before its INSERT: an upper
bound) to its `running` event (the worker's claim committed).

With workers, it also prints the steady-state completion rate and a per-job breakdown of a worker slot's
cycle from the jobs' events; `--batch 500 --clients 2` fills the backlog in a second or two, so that the
dispatch path is measured without HTTP submissions competing for the CPU:

    python benchmarks/dispatch.py --jobs 2000 --batch 500 --clients 2 --workers 1 --concurrency 4

`--submit-only` starts no worker (nothing is admitted: no node) and times the submissions alone; the API
runs as the Procfile runs it (gunicorn with config/gunicorn.py: WEB_CONCURRENCY gevent processes, default 2).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import Database  # noqa: E402
from app.embedded import ensure_services  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its live children: how much of the machine it took, which a
    shared, loaded machine changes far less than it changes wall-clock rates."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessCpu:
    ppid: int
    started: int  # clock ticks after boot: tells a reused pid from the process that had it
    own: float  # user + system seconds
    reaped: float  # user + system seconds of the children it has waited for (a worker's job processes)
    cmdline: str

    @property
    def seconds(self) -> float:
        return self.own + self.reaped


def process_cpu() -> dict[int, ProcessCpu]:
    """Every process's CPU time from /proc/<pid>/stat."""
    found: dict[int, ProcessCpu] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        # fields[0] is the state (field 3 of stat(5)): ppid 4, utime 14, stime 15, cutime 16, cstime 17, starttime 22
        own, reaped = int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])
        found[int(entry)] = ProcessCpu(int(fields[1]), int(fields[19]), own / CLOCK_TICKS, reaped / CLOCK_TICKS, command)
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS, sum(values[:8]) / CLOCK_TICKS


def backend_applications(database: Database) -> dict[int, str]:
    """pid -> application_name of this database's sessions (the API, the scheduler, the workers name theirs)."""
    with database.engine.connect() as conn:
        rows = conn.execute(text("SELECT pid, application_name FROM pg_stat_activity WHERE datname = current_database()"))
        return {int(pid): name or "unnamed" for pid, name in rows}


def cpu_per_job(before: dict[int, ProcessCpu], after: dict[int, ProcessCpu], machine_before: tuple[float, float],
                machine_after: tuple[float, float], roots: dict[str, int], database_name: str, jobs: int,
                seconds: float, applications: dict[int, str] | None = None) -> None:
    """CPU ms per completed job for every process of the run, grouped, and how busy the whole machine was.

    A process that ended within the window is counted only through the parent that reaped it; a PostgreSQL
    backend that ended is lost (the benchmark's sessions are pooled: they live through the window)."""
    def group_of(pid: int) -> str:
        seen = set()
        walk = pid
        while walk in after and walk not in seen:
            seen.add(walk)
            for name, root in roots.items():
                if walk == root:
                    return name
            walk = after[walk].ppid
        command = after[pid].cmdline
        if command.startswith("postgres:"):
            if f" {database_name} " not in command:
                return "PostgreSQL, other"
            return f"PostgreSQL backends of {database_name}: {(applications or {}).get(pid, 'ended or unnamed')}"
        if command.startswith("redis-server"):
            return "Redis"
        return "other processes (not this benchmark's)"

    used: dict[str, float] = {}
    worker_parts: dict[str, float] = {}  # a worker's time: its main process, its pool processes, the jobs they ran
    worker_roots = {root for name, root in roots.items() if name.startswith("worker")}
    for pid, now in after.items():
        earlier = before.get(pid)
        if earlier is None or earlier.started != now.started:
            earlier = ProcessCpu(0, 0, 0.0, 0.0, "")
        delta = now.seconds - earlier.seconds
        if delta > 0:
            group = group_of(pid)
            used[group] = used.get(group, 0.0) + delta
            if group.startswith("worker"):
                part = "main process" if pid in worker_roots else "pool processes"
                worker_parts[part] = worker_parts.get(part, 0.0) + now.own - earlier.own
                worker_parts["job processes (reaped)"] = worker_parts.get("job processes (reaped)", 0.0) + now.reaped - earlier.reaped
    busy = machine_after[0] - machine_before[0]
    total = machine_after[1] - machine_before[1]
    print(f"CPU per job over {seconds:.1f} s ({jobs} jobs), from /proc/<pid>/stat deltas:")
    for name, value in sorted(used.items(), key=lambda item: -item[1]):
        print(f"  {name:<60} {value * 1000 / jobs:7.2f} ms/job  {value / seconds:5.2f} cores")
    print(f"  {'all processes':<60} {sum(used.values()) * 1000 / jobs:7.2f} ms/job")
    print("  workers: " + ", ".join(f"{part} {value * 1000 / jobs:.2f}" for part, value in worker_parts.items()) + " ms/job")
    print(f"machine: {busy / total * 100:.0f}% busy ({busy / seconds:.2f} of {total / seconds:.2f} cores), "
          f"load {open('/proc/loadavg').read().split()[0]}")


def start_profilers(folder: str, processes: list[subprocess.Popen]) -> list[subprocess.Popen]:
    """py-spy on the API (its gunicorn workers), the scheduler and each worker with its pool processes, until
    stop_profilers."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    names = ["api", "scheduler", *(f"worker{index}" for index in range(len(processes) - 2))]
    return [
        subprocess.Popen([spy, "record", "--format", "raw", "--rate", "200", "--nonblocking", "--subprocesses",
                          "--output", str(Path(folder) / f"{name}.txt"), "--pid", str(process.pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, process in zip(names, processes)
    ]


def stop_profilers(profilers: list[subprocess.Popen]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for profiler in profilers:
        profiler.wait(30)


def stage_breakdown(database: Database) -> None:
    """Where a worker slot's time goes per job, from the jobs' recorded events (steady state: the middle 80%
    of the jobs by claim time). Event times are taken when each step begins: the admission pass's start,
    the claim's, the end report's."""
    with database.engine.connect() as conn:
        rows = conn.execute(text(
            """
            SELECT j.id, extract(epoch FROM q.at), extract(epoch FROM r.at), r.worker_id, extract(epoch FROM s.at)
            FROM jobs j
            JOIN LATERAL (SELECT at FROM job_events WHERE job_id = j.id AND to_status = 'queued' ORDER BY id DESC LIMIT 1) q ON true
            JOIN LATERAL (SELECT at, worker_id FROM job_events WHERE job_id = j.id AND to_status = 'running' ORDER BY id DESC LIMIT 1) r ON true
            JOIN LATERAL (SELECT at FROM job_events WHERE job_id = j.id AND to_status = 'succeeded' ORDER BY id DESC LIMIT 1) s ON true
            """
        )).all()
    if len(rows) < 20:
        return
    rows = sorted(rows, key=lambda r: r[2])
    cut = len(rows) // 10
    steady = {r[0] for r in rows[cut:len(rows) - cut]}
    by_worker: dict[str, list] = {}
    for row in rows:
        by_worker.setdefault(row[3], []).append(row)
    reaction, cycle = [], []
    for runs in by_worker.values():
        for before, after in zip(runs, runs[1:]):
            if before[0] in steady:
                reaction.append((after[1] - before[4]) * 1000)
                cycle.append((after[2] - before[2]) * 1000)
    middle = [r for r in rows if r[0] in steady]
    span = max(r[4] for r in middle) - min(r[4] for r in middle)

    def line(name: str, values: list[float]) -> str:
        return f"  {name:<58} mean {statistics.fmean(values):7.1f}  p50 {percentile(values, 0.5):7.1f}  p90 {percentile(values, 0.9):7.1f}"

    print(f"steady-state completions/s (middle 80% of the jobs): {len(middle) / span:.1f}" if span > 0 else "")
    print("per-job breakdown, ms (a worker slot's cycle):")
    print(line("admission pass start -> claim start (pass, publish, broker)", [(r[2] - r[1]) * 1000 for r in middle]))
    print(line("claim start -> end report start (claim, process, exit seen)", [(r[4] - r[2]) * 1000 for r in middle]))
    print(line("end report start -> next admission on that slot (end, wake-up)", reaction))
    print(line("one slot's cycle, claim to next claim", cycle))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (nodes)")
    parser.add_argument("--concurrency", type=int, default=4, help="prefork processes per worker")
    parser.add_argument("--clients", type=int, default=8, help="concurrent HTTP submitters")
    parser.add_argument("--rate", type=float, default=0.0, help="cap on submissions per second (0: as fast as possible)")
    parser.add_argument("--submit-only", action="store_true", help="no workers: time the submissions alone")
    parser.add_argument("--batch", type=int, default=0, help="submit through POST /jobs/batch, this many jobs a request")
    parser.add_argument("--warmup", type=int, default=200, help="submissions before the timed run (connections, caches)")
    parser.add_argument("--idle", type=int, default=0, help="instead: this many jobs one at a time, idle dispatch latency")
    parser.add_argument("--pool", default="", help="the workers' Celery pool (--pool), as the worker chooses it when empty")
    parser.add_argument("--py-spy", metavar="FOLDER", default="",
                        help="record the API, the scheduler and the workers with py-spy while the jobs run (collapsed stacks here)")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="jobservice-bench-")
    services = ensure_services(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"), data_dir, free_port())
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url or "",
        "REDIS_URL": services.redis_url or "",
        "AUTH_ENABLED": "false",
        "RATELIMIT_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
        "WORKER_CPU": "1000",  # `true` needs no capacity: let the slots be the only limit
        "WORKER_WORKDIR": str(Path(data_dir) / "work"),
        "JOB_QUEUES": "high-priority:50-100:1000,default:0-49:1000",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    database = Database(env["DATABASE_URL"])
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    with database.engine.begin() as conn:
        conn.execute(text("TRUNCATE job_log_lines, job_events, outbox, jobs, nodes CASCADE"))

    processes = [
        subprocess.Popen(
            # The Procfile's web line (gevent workers, WEB_CONCURRENCY processes), on this benchmark's port.
            [sys.executable, "-m", "gunicorn", "--config", "python:config.gunicorn", "--bind", f"127.0.0.1:{port}",
             "--log-level", "warning"],
            env=env, cwd=ROOT, start_new_session=True,
        ),
        subprocess.Popen([sys.executable, "-m", "app.cli", "scheduler"], env=env, cwd=ROOT, start_new_session=True),
    ]
    for index in range(0 if args.submit_only else args.workers):
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "celery", "--app", "workers.celery_app", "worker", "--loglevel", "WARNING",
                 "--concurrency", str(args.concurrency), "--prefetch-multiplier", "1", "--without-gossip",
                 "--without-mingle", "--hostname", f"bench{index}@%h", *(["--pool", args.pool] if args.pool else [])],
                env={**env, "WORKER_NODE": f"bench-{index}"}, cwd=ROOT, start_new_session=True,
            )
        )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            with database.engine.connect() as conn:
                nodes = conn.execute(text("SELECT count(*) FROM nodes")).scalar()
            try:
                ready = requests.get(f"{base}/health/ready", timeout=2).status_code == 200
            except requests.RequestException:
                ready = False
            if ready and nodes == (0 if args.submit_only else args.workers):
                break
            if time.monotonic() > deadline:
                raise SystemExit("the stack did not come up within 60 s")
            time.sleep(0.2)

        local = threading.local()
        body = {"job_type": "bench", "command": ["true"], "priority": 10, "resources": {"cpu": "1m", "memory": "1Mi"}}
        latencies_ms: list[float] = []

        # http.client on a kept-alive connection per thread: `requests` cost the load generator ~3x the CPU per
        # request, taken from the same 2 cores as the service it measures.
        single = json.dumps(body).encode()
        batch = json.dumps({"jobs": [body] * args.batch}).encode() if args.batch else b""
        headers = {"Content-Type": "application/json"}

        def thread_connection() -> http.client.HTTPConnection:
            if not hasattr(local, "connection"):
                local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            return local.connection

        def submit(index: int) -> list[str]:
            if args.rate:
                time.sleep(max(0.0, started + index / args.rate - time.perf_counter()))
            begun = time.perf_counter()
            connection = thread_connection()
            connection.request("POST", "/api/v1/jobs/batch" if args.batch else "/api/v1/jobs/", body=batch or single,
                               headers=headers)
            response = connection.getresponse()
            data = response.read()
            latencies_ms.append((time.perf_counter() - begun) * 1000)
            if response.status != 201:
                raise SystemExit(f"HTTP {response.status}: {data[:300]!r}")
            answer = json.loads(data)
            return [job["id"] for job in answer["jobs"]] if args.batch else [answer["id"]]

        if args.idle:
            idle_dispatch(args, submit, database)
            return
        requests_needed = -(-args.jobs // args.batch) if args.batch else args.jobs
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:  # warm-up: connections, imports, plans
            warm = [i for chunk in pool.map(submit, range(args.warmup if not args.batch else 2)) for i in chunk]
        latencies_ms.clear()
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            # Fresh statistics, as autovacuum keeps them (it may be off on a test server): without them the
            # planner takes the emptied tables for empty and picks scans that grow with the backlog.
            conn.execute(text("ANALYZE jobs; ANALYZE job_events; ANALYZE job_count_deltas"))
        cpu_before = [cpu_seconds(process.pid) for process in processes[:2]]
        client_before = time.process_time()
        processes_before, machine_before = process_cpu(), machine_cpu()
        profilers = start_profilers(args.py_spy, processes) if args.py_spy else []
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            ids = [i for chunk in pool.map(submit, range(requests_needed)) for i in chunk]
        submit_seconds = time.perf_counter() - started
        cpu_used = [cpu_seconds(process.pid) - before for process, before in zip(processes[:2], cpu_before)]
        client_cpu = time.process_time() - client_before
        print(f"jobs: {len(ids)}  requests: {requests_needed}  HTTP clients: {args.clients}  "
              f"API: {os.environ.get('WEB_CONCURRENCY', '2')} gevent processes")
        print(f"submissions/s (jobs): {len(ids) / submit_seconds:.1f}  ({submit_seconds:.2f} s)  requests/s: "
              f"{requests_needed / submit_seconds:.1f}")
        print(f"request latency ms: p50 {percentile(latencies_ms, 0.5):.1f}  p99 {percentile(latencies_ms, 0.99):.1f}  "
              f"max {max(latencies_ms):.1f}")
        print(f"CPU ms per job: API processes {cpu_used[0] * 1000 / len(ids):.2f}  scheduler {cpu_used[1] * 1000 / len(ids):.2f}  "
              f"load generator {client_cpu * 1000 / len(ids):.2f}  "
              f"(API {cpu_used[0] / submit_seconds:.2f} cores, scheduler {cpu_used[1] / submit_seconds:.2f} cores)")
        if args.submit_only:
            stop_profilers(profilers)
            roots = {"API (gunicorn)": processes[0].pid, "scheduler": processes[1].pid, "benchmark itself": os.getpid()}
            cpu_per_job(processes_before, process_cpu(), machine_before, machine_cpu(), roots,
                        database.engine.url.database or "", len(ids), submit_seconds, backend_applications(database))
            return
        ids += warm

        deadline = time.monotonic() + 600
        while True:
            with database.engine.connect() as conn:
                left = conn.execute(text("SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled')")).scalar()
            if not left:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{left} jobs still unfinished after 600 s")
            time.sleep(0.2)
        total_seconds = time.perf_counter() - started
        processes_after, machine_after = process_cpu(), machine_cpu()
        stop_profilers(profilers)

        with database.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT extract(epoch FROM e.at - j.created_at) * 1000 FROM jobs j "
                    "JOIN job_events e ON e.job_id = j.id AND e.to_status = 'running'"
                )
            ).scalars().all()
            failed = conn.execute(text("SELECT count(*) FROM jobs WHERE status <> 'succeeded'")).scalar()
        latencies = [float(v) for v in rows]
        print(f"workers: {args.workers} x {args.concurrency} processes")
        print(f"completed/s (submit to last finish): {len(ids) / total_seconds:.1f}")
        print(
            f"dispatch latency submitted->running ms: p50 {percentile(latencies, 0.5):.1f}  "
            f"p99 {percentile(latencies, 0.99):.1f}  mean {statistics.fmean(latencies):.1f}  max {max(latencies):.1f}"
        )
        print(f"not succeeded: {failed}")
        stage_breakdown(database)
        roots = {"API (gunicorn)": processes[0].pid, "scheduler": processes[1].pid, "benchmark itself": os.getpid(),
                 **{f"worker {index} (Celery, its pool and jobs)": process.pid for index, process in enumerate(processes[2:])}}
        cpu_per_job(processes_before, processes_after, machine_before, machine_after, roots, database.engine.url.database or "",
                    len(ids), total_seconds, backend_applications(database))
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        database.dispose()
        services.stop()


def idle_dispatch(args: argparse.Namespace, submit, database: Database) -> None:  # type: ignore[no-untyped-def]
    """One job at a time on an idle stack: submit, wait until it ended, pause, again."""
    def wait_ended(job_id: str) -> None:
        deadline = time.monotonic() + 30
        with database.engine.connect() as conn:
            while time.monotonic() < deadline:
                status = conn.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}).scalar()
                conn.rollback()
                if status in ("succeeded", "failed", "cancelled"):
                    return
                time.sleep(0.01)
        raise SystemExit(f"{job_id} did not end within 30 s")

    for _ in range(5):  # warm-up: the worker's first task, the scheduler's first pass, connections
        wait_ended(submit(0)[0])
    ids = []
    answered: dict[str, float] = {}
    for _ in range(args.idle):
        time.sleep(0.1)  # idle: the scheduler and the worker are waiting when the submit lands
        ids.append(submit(0)[0])
        answered[ids[-1]] = time.time()  # the same host's clock as the database's
        wait_ended(ids[-1])
    with database.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT j.id, extract(epoch FROM j.created_at), extract(epoch FROM e.at) FROM jobs j "
                 "JOIN job_events e ON e.job_id = j.id AND e.to_status = 'running' WHERE j.id = ANY(:ids)"),
            {"ids": ids}).all()
    # The submit's commit lies between the job's created_at (set just before its INSERT: this figure is an upper bound,
    # and the one the target is read against) and the client's receipt of the answer (sent after the commit: a lower
    # bound of what follows the commit).
    latencies = [(float(running) - float(created)) * 1000 for _, created, running in rows]
    after_answer = [(float(running) - answered[job_id]) * 1000 for job_id, _, running in rows]
    print(f"idle dispatch ms (submit commit -> running, {len(latencies)} jobs one at a time): "
          f"p50 {percentile(latencies, 0.5):.1f}  p99 {percentile(latencies, 0.99):.1f}  max {max(latencies):.1f}")
    print(f"  (from the job's created_at, just before the submit's INSERT; from the client's receipt of the answer, after "
          f"its commit: p50 {percentile(after_answer, 0.5):.1f}  p99 {percentile(after_answer, 0.99):.1f})")


if __name__ == "__main__":
    main()
