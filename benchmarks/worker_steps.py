"""Where a worker's pool process spends its CPU per job: the Runner's steps, timed in-process.

Runs `Runner.run` (the body of the Celery task) for N admitted jobs of `true`, one after another, in this
process, against DATABASE_URL, with the worker's own settings (WORKER_CGROUP etc. from the environment),
and prints the CPU (this process: every thread) and wall time per job of each step. Celery's own part
(message decode, ack, the pool's pipe) is not in it: `dispatch.py --py-spy` shows that one.

    DATABASE_URL=postgresql://... python benchmarks/worker_steps.py --jobs 500

The database is migrated and its jobs tables truncated first: use a database of its own.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from app.domain import execution, jobs, scheduling  # noqa: E402
from app.domain.callers import LOCAL_ADMIN  # noqa: E402
from app.domain.capacity import LOCAL_CLUSTER  # noqa: E402
from app.models import Job  # noqa: E402
from config import Settings  # noqa: E402

cpu: dict[str, float] = defaultdict(float)
wall: dict[str, float] = defaultdict(float)
_active: list[str] = []


def timed(step: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, its CPU and wall time added to `step` (nested steps count in the outer one only)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _active:
            return function(*args, **kwargs)
        _active.append(step)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            cpu[step] += time.process_time() - cpu0
            wall[step] += time.perf_counter() - wall0
            _active.pop()
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--profile", metavar="FILE", default="",
                        help="also profile the timed jobs with cProfile (CPU time of this thread) into FILE")
    args = parser.parse_args()
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    os.environ.setdefault("WORKER_NODE", "steps-0")
    from workers.context import worker_context
    from workers import runner as runner_module
    from workers.executors import local, containment

    context = worker_context()
    database, settings = context.database, context.settings
    with database.engine.begin() as conn:
        conn.execute(text("TRUNCATE job_log_lines, job_events, outbox, jobs, nodes CASCADE"))
    with database.session() as s:
        execution.register_node(s, cluster=LOCAL_CLUSTER, name=settings.worker_node, gpu_indices=[], gpu_type=None,
                                cpu_millis=10**6, memory_bytes=2**40, slots=args.jobs + args.warmup)
    total = args.jobs + args.warmup
    request = jobs.JobRequest(job_type="t", priority=5, image=None, config={}, resources={}, cpu_millis=1,
                              memory_bytes=1000, gpus=0, command=["true"], max_retries=0)
    with database.session() as s:
        ids = [jobs.submit(s, LOCAL_ADMIN, request, Settings.from_env()).id for _ in range(total)]
    def admitted() -> list[tuple[str, str]]:
        """The next jobs the scheduler admits (a pass admits a bounded number): (id, dispatch token)."""
        with database.session() as s:
            admitted_ids = scheduling.admit(s, settings).admitted
            return list(s.query(Job.id, Job.dispatch_token).filter(Job.id.in_(admitted_ids)).order_by(Job.id))

    # The steps, wrapped where the Runner calls them.
    execution.claim = timed("claim transaction", execution.claim)
    execution.end = timed("end transaction", execution.end)
    local.LocalExecutor.launch = timed("launch: folder, cgroup, port", local.LocalExecutor.launch)
    local.LocalExecution._spawn = timed("spawn (env, cgroup leaf, Popen, readers)", local.LocalExecution._spawn)
    local.LocalExecution._finish = timed("finish (kill_all, join readers, rmdir)", local.LocalExecution._finish)
    local.LocalExecution.wait = timed("wait for exit (select)", local.LocalExecution.wait)
    runner_module.LogWriter.close = timed("log writer close", runner_module.LogWriter.close)
    runner_module.LogBudget.close = timed("log budget close", runner_module.LogBudget.close)
    runner_module.Lease.stop = timed("lease stop", runner_module.Lease.stop)
    run = context.runner.run

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile(time.thread_time)
    def backend_cpu() -> float:
        """CPU seconds of this process's PostgreSQL sessions (local server: their /proc entries)."""
        with database.engine.connect() as conn:
            pids = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = :name"),
                                {"name": database.application_name}).scalars().all()
        used = 0
        for pid in pids:
            try:
                fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
            except OSError:
                continue
            used += int(fields[11]) + int(fields[12])
        return used / os.sysconf("SC_CLK_TCK")

    done = 0
    cpu_all = wall_all = job_cpu = 0.0
    backend0 = 0.0
    while done < total:
        batch = admitted()
        assert batch, f"nothing admitted after {done} of {total}"
        for job_id, token in batch:
            timing = done >= args.warmup
            if done == args.warmup:
                cpu.clear(), wall.clear()
                backend0 = backend_cpu()
                if profiler is not None:
                    profiler.enable()
            cpu0, wall0, children0 = time.process_time(), time.perf_counter(), os.times()
            result = run(job_id, token)
            assert result == "succeeded", result
            if timing:
                children = os.times()
                cpu_all += time.process_time() - cpu0
                wall_all += time.perf_counter() - wall0
                job_cpu += (children.children_user + children.children_system) - (children0.children_user + children0.children_system)
            done += 1
    backend = backend_cpu() - backend0
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    n = args.jobs
    print(f"{n} jobs of `true`, one at a time; cgroup: {context.runner.executor.jobs_cgroup}")
    print(f"{'step':<44} {'CPU ms/job':>10} {'wall ms/job':>11}")
    for step in sorted(cpu, key=lambda k: -cpu[k]):
        print(f"{step:<44} {cpu[step] * 1000 / n:10.3f} {wall[step] * 1000 / n:11.3f}")
    rest_cpu = cpu_all - sum(cpu.values())
    rest_wall = wall_all - sum(wall.values())
    print(f"{'other (Runner, threads, logging)':<44} {rest_cpu * 1000 / n:10.3f} {rest_wall * 1000 / n:11.3f}")
    print(f"{'all, this process':<44} {cpu_all * 1000 / n:10.3f} {wall_all * 1000 / n:11.3f}")
    print(f"{'job processes (reaped children)':<44} {job_cpu * 1000 / n:10.3f}")
    print(f"{'its PostgreSQL sessions (claim, end, logs)':<44} {backend * 1000 / n:10.3f}")
    print(f"load {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
