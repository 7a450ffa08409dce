"""Submission side by side: this service (as the Procfile runs it) against plain Celery on the same Redis.

One run, one machine, so the columns compare (this machine is shared: read them as relative):

- this service: `benchmarks/dispatch.py --submit-only`, single POST /jobs/ at --clients clients, then
  POST /jobs/batch in batches of --batch;
- this service's idle dispatch: one job at a time (a worker of concurrency 2), submit commit -> `running`;
- plain Celery 5 with reliable settings (acks_late, prefetch 1, prefork of 2): enqueues/s of a no-op task
  from --clients threads, no-op tasks processed/s, and the idle pickup latency (one task at a time).

    DATABASE_URL=... REDIS_URL=redis://127.0.0.1:6379/2 python benchmarks/side_by_side.py --jobs 3000
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def make_celery(broker: str):  # type: ignore[no-untyped-def]
    from celery import Celery

    app = Celery("plain", broker=broker, backend=None)
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue="plain-bench",
                    task_ignore_result=True, broker_connection_retry_on_startup=True)

    @app.task(name="plain.noop")
    def noop(sent_at: float, key: str | None = None) -> None:
        if key:  # idle pickup: record when the task started, for the sender to read
            import redis

            redis.Redis.from_url(broker).set(key, time.time() - sent_at, ex=60)

    return app


app = make_celery(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))  # the worker imports this module


def service_column(args: argparse.Namespace) -> str:
    lines = []
    for extra in (["--jobs", str(args.jobs), "--clients", str(args.clients)],
                  ["--jobs", str(args.batch * 20), "--clients", "2", "--batch", str(args.batch)]):
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch.py"), "--submit-only", *extra],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
        lines += [line for line in out.splitlines() if line.startswith(("submissions/s", "request latency", "CPU ms"))]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch.py"), "--idle", str(args.idle), "--workers", "1",
                          "--concurrency", "2"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    lines += [line for line in out.splitlines() if line.startswith(("idle dispatch", "  (from the job's created_at"))]
    return "\n".join(lines)


def celery_column(args: argparse.Namespace) -> str:
    import redis

    broker = os.environ["REDIS_URL"]
    client = redis.Redis.from_url(broker)
    client.delete("plain-bench")
    noop = app.tasks["plain.noop"]
    with ThreadPoolExecutor(args.clients) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _i: noop.delay(time.time()), range(args.jobs)))
        enqueue_seconds = time.perf_counter() - started
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "--app", "benchmarks.side_by_side", "worker", "--concurrency", "2",
         "--prefetch-multiplier", "1", "--queues", "plain-bench", "--loglevel", "WARNING", "--without-gossip",
         "--without-mingle", "--hostname", "plain-bench@%h"],
        cwd=ROOT, env=os.environ.copy(), start_new_session=True,
    )
    try:
        started = time.perf_counter()
        while client.llen("plain-bench") > 0:
            time.sleep(0.05)
        drain_seconds = time.perf_counter() - started  # includes the worker's start: a lower bound of its rate
        pickups = []
        run = uuid.uuid4().hex  # keys of this run's own: another run's (kept 60 s) would be read as this one's
        for index in range(args.idle):
            key = f"plain-bench-pickup-{run}-{index}"
            noop.delay(time.time(), key)
            deadline = time.monotonic() + 10
            while (value := client.get(key)) is None and time.monotonic() < deadline:
                time.sleep(0.001)
            if value is not None:
                pickups.append(float(value) * 1000)
            time.sleep(0.05)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(20)
    return (
        f"enqueues/s: {args.jobs / enqueue_seconds:.1f} ({args.clients} threads)\n"
        f"no-op tasks processed/s (worker start included): {args.jobs / drain_seconds:.1f}\n"
        f"idle pickup ms: p50 {statistics.median(pickups):.1f}  p99 {percentile(pickups, 0.99):.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=50, help="one-at-a-time tasks for the idle pickup latency")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        raise SystemExit("set DATABASE_URL and REDIS_URL (both columns use the same Redis)")
    print("== this service (gunicorn as the Procfile runs it)", flush=True)
    service = service_column(args)
    print(service, flush=True)
    print("== plain Celery 5 (acks_late, prefetch 1, prefork of 2), same Redis", flush=True)
    plain = celery_column(args)
    print(plain)
    ours = _p50(service, "idle dispatch")
    theirs = _p50(plain, "idle pickup")
    if ours is not None and theirs:
        print(f"== idle: service p50 / Celery p50 = {ours / theirs:.1f}x (target < 3x; service p99 target < 25 ms)")


def _p50(column: str, prefix: str) -> float | None:
    for line in column.splitlines():
        if line.startswith(prefix):
            return float(line.split("p50 ")[1].split()[0])
    return None


if __name__ == "__main__":
    main()
