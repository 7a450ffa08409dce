"""Drain benchmark: how long a SIGTERMed worker takes to hand its running jobs back, and what they lose.

Starts a real Celery worker (its own node) and the real scheduler loop on DATABASE_URL / REDIS_URL (a
migrated database: the tests' is fine; only this run's jobs and node are touched), fills the worker with
long jobs, sends SIGTERM to the worker's main process and times: the node marked draining, every job back
in the backlog, the worker's exit. It checks that no retry was spent and that each job has its event.

    DATABASE_URL=... REDIS_URL=... python benchmarks/drain.py --jobs 4 --drain-seconds 2 --kill-grace 2
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import select, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import Database  # noqa: E402
from app.domain import jobs  # noqa: E402
from app.domain.callers import LOCAL_ADMIN  # noqa: E402
from app.models import Job, JobEvent  # noqa: E402
from config import Settings  # noqa: E402


def wait(predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--drain-seconds", type=float, default=2.0)
    parser.add_argument("--kill-grace", type=float, default=2.0)
    parser.add_argument("--job-ignores-sigterm", action="store_true", help="the job traps SIGTERM: SIGKILL after the kill grace")
    args = parser.parse_args()

    node = f"bench-drain-{os.getpid()}"
    env = {
        **os.environ, "WORKER_NODE": node, "WORKER_GPU_COUNT": "0", "WORKER_DRAIN_SECONDS": str(args.drain_seconds),
        "KILL_GRACE_SECONDS": str(args.kill_grace), "JOB_HEARTBEAT_SECONDS": "0.5", "SCHEDULER_INTERVAL_SECONDS": "0.5",
        "LOG_LEVEL": "WARNING", "AUTH_ENABLED": "false", "WORKER_WORKDIR": tempfile.mkdtemp(prefix="drain-bench-"),
    }
    settings = Settings.from_env(env)
    database = Database(settings.database_url or "")
    from app.dispatch import CeleryPublisher
    from app.scheduler import Scheduler

    publisher = CeleryPublisher(settings)
    scheduler = Scheduler(settings, Database(settings.database_url or "", pool_size=2), publisher)
    stop = threading.Event()
    threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True).start()
    log = open(Path(env["WORKER_WORKDIR"]) / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "--app", "workers.celery_app", "worker", "--concurrency", str(args.jobs),
         "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle", "--hostname", f"{node}@%h"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def count(sql: str) -> int:
            with database.engine.connect() as conn:
                return int(conn.execute(text(sql), {"node": node}).scalar() or 0)

        wait(lambda: count("SELECT count(*) FROM nodes WHERE name = :node") == 1, 60, "the worker's node")
        body = "trap '' TERM; sleep 600" if args.job_ignores_sigterm else "sleep 600"
        request = jobs.JobRequest(job_type="drain-bench", priority=100, image=None, config={}, resources={}, cpu_millis=1,
                                  memory_bytes=1, gpus=0, command=["sh", "-c", body], max_retries=3)
        with database.session() as session:
            ids = [jobs.submit(session, LOCAL_ADMIN, request, settings).id for _ in range(args.jobs)]
        status_sql = "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = :status"

        def in_status(status: str) -> int:
            with database.engine.connect() as conn:
                return int(conn.execute(text(status_sql), {"ids": ids, "status": status}).scalar() or 0)

        wait(lambda: in_status("running") == len(ids), 60, "every job running")
        sent = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        draining = wait(lambda: count("SELECT count(*) FROM nodes WHERE name = :node AND state = 'draining'") == 1, 30, "draining")
        pending = wait(lambda: in_status("pending") == len(ids), 120, "every job back in the backlog")
        worker.wait(120)
        exited = time.monotonic()
        with database.session() as session:
            retries = sorted(session.scalars(select(Job.retry_count).where(Job.id.in_(ids))))
            drained = session.scalar(
                select(text("count(*)")).select_from(JobEvent)
                .where(JobEvent.job_id.in_(ids), JobEvent.from_status == "running", JobEvent.reason.like("drained from node%"))
            )
            for job_id in ids:
                jobs.cancel(session, LOCAL_ADMIN, job_id)
        print(f"jobs {len(ids)}, WORKER_DRAIN_SECONDS {args.drain_seconds:g}, KILL_GRACE_SECONDS {args.kill_grace:g}, "
              f"job {'ignores' if args.job_ignores_sigterm else 'obeys'} SIGTERM")
        print(f"SIGTERM -> node draining   {draining - sent:7.3f} s")
        print(f"SIGTERM -> all jobs pending {pending - sent:7.3f} s")
        print(f"SIGTERM -> worker exited    {exited - sent:7.3f} s (exit code {worker.returncode})")
        print(f"retry_count after: {retries}; 'drained from node' events: {drained}")
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        stop.set()
        publisher.close()


if __name__ == "__main__":
    main()
