"""Where a lone submit's way to `running` goes, step by step (issue 14, idle dispatch).

Runs `benchmarks/dispatch.py --idle N` (the real stack: gunicorn API, scheduler, one Celery worker) with a probe
loaded into each of its processes (a `sitecustomize` module on PYTHONPATH, written to a temporary folder): it wraps
the steps of a submit, of the scheduler's pass and of the worker's claim, and each SQL statement they send, and
writes a wall-clock timestamp at each step's start (`>`) and end (`<`). Each step is then printed as the median,
over the jobs, of its time since the job's created_at (set just before the submit's INSERT), in order:

    DATABASE_URL=... REDIS_URL=... python benchmarks/idle_steps.py --jobs 60

The probes cost a few microseconds each; read the steps' differences, and the plain `dispatch.py --idle` for the figure.
"""
from __future__ import annotations

import argparse
import bisect
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import functools, os, sys, time
_argv = " ".join(getattr(sys, "orig_argv", sys.argv))
_folder = os.environ["IDLE_STEPS_FOLDER"]
_files = {}


def _log(label):
    out = _files.get(os.getpid())
    if out is None:  # per process: a forked pool child writes its own file
        out = _files[os.getpid()] = open(os.path.join(_folder, f"{os.getpid()}.log"), "a", buffering=1)
    out.write(f"{time.time():.6f} {label}\\n")


def _wrap(owner, name, label):
    original = getattr(owner, name)

    @functools.wraps(original)
    def probed(*args, **kwargs):
        _log(label + ">")
        try:
            return original(*args, **kwargs)
        finally:
            _log(label + "<")

    if isinstance(getattr(owner, "__dict__", {}).get(name), staticmethod):
        probed = staticmethod(probed)
    setattr(owner, name, probed)


def _statements():
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    def name(statement):
        words = statement.split()
        return "sql " + " ".join(words[:2])[:40]

    event.listen(Engine, "before_cursor_execute", lambda c, cur, statement, *a: _log(name(statement) + ">"))
    event.listen(Engine, "after_cursor_execute", lambda c, cur, statement, *a: _log(name(statement) + "<"))
    event.listen(Pool, "checkout", lambda *a: _log("pool checkout"))
    event.listen(Engine, "commit", lambda *a: _log("commit"))


if "gunicorn" in _argv:
    import app.domain.jobs as jobs, app.wakeup as wakeup
    _wrap(jobs, "_submit_once", "api submit transaction")
    _wrap(wakeup.SchedulerWaker, "_send", "api waker NOTIFY")
    _statements()
elif "app.cli scheduler" in _argv:
    import app.scheduler as scheduler, app.domain.scheduling as scheduling, app.domain.policy as policy
    _wrap(scheduler.Scheduler, "tick", "scheduler tick")
    _wrap(scheduler, "admit", "scheduler admit")
    _wrap(scheduling, "load_snapshot", "scheduler snapshot")
    _wrap(policy, "decide", "scheduler policy")
    _wrap(scheduling, "_place_all", "scheduler admission write")
    _wrap(scheduler, "publish_only", "scheduler publish")
    for step in ("recover_lost", "requeue_unclaimed", "publish_stale"):
        _wrap(scheduler, step, "scheduler sweep " + step)
    _wrap(scheduler.Scheduler, "_fold_counters", "scheduler sweep fold")
    _wrap(scheduler.Scheduler, "_vacuum_churn", "scheduler sweep vacuum")
    _statements()
elif "celery" in _argv and "worker" in _argv:
    import workers.runner as runner, app.domain.execution as execution
    _wrap(runner.Runner, "run", "worker task")
    _wrap(execution, "claim", "worker claim")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--slow", type=float, default=0.0, metavar="MS",
                        help="also print every step of each job whose way to running took longer than this")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL"):
        raise SystemExit("set DATABASE_URL (and REDIS_URL): the steps are read from the jobs' rows afterwards")
    with tempfile.TemporaryDirectory(prefix="idle-steps-") as folder:
        probe = Path(folder) / "probe"
        probe.mkdir()
        (probe / "sitecustomize.py").write_text(PROBE)
        logs = Path(folder) / "logs"
        logs.mkdir()
        env = {**os.environ, "IDLE_STEPS_FOLDER": str(logs),
               "PYTHONPATH": os.pathsep.join([str(probe), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch.py"), "--idle", str(args.jobs), "--workers", "1",
                              "--concurrency", "2"], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        print("\n".join(line for line in out.splitlines() if line.startswith("idle dispatch")))
        marks = sorted((float(stamp), label) for log in logs.iterdir() for stamp, label in
                       (line.rstrip("\n").split(" ", 1) for line in log.open()))
    engine = create_engine(os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.connect() as conn:
        jobs = conn.execute(text(
            "SELECT extract(epoch FROM j.created_at), extract(epoch FROM r.at), extract(epoch FROM j.completed_at) "
            "FROM jobs j JOIN job_events r ON r.job_id = j.id AND r.to_status = 'running' ORDER BY j.created_at")).all()
    engine.dispose()
    stamps = [stamp for stamp, _ in marks]
    since_created: dict[str, list[float]] = defaultdict(list)
    for created, running, ended in jobs[5:]:  # dispatch.py's warm-up jobs first
        took = (float(running) - float(created)) * 1000
        if args.slow and took > args.slow:
            print(f"a slow job: {took:.1f} ms; every mark from 50 ms before its created_at to its running event:")
            for stamp, label in marks[bisect.bisect_left(stamps, float(created) - 0.05):bisect.bisect_right(stamps, float(running))]:
                print(f"  {(stamp - float(created)) * 1000:8.2f}  {label}")
        since_created["= running event"].append((float(running) - float(created)) * 1000)
        seen = set()
        for stamp, label in marks[bisect.bisect_left(stamps, float(created)):bisect.bisect_right(stamps, float(running))]:
            if label not in seen:  # a step's first mark after this job's created_at
                seen.add(label)
                since_created[label].append((stamp - float(created)) * 1000)
    print(f"ms since the job's created_at, median over {len(jobs) - 5} jobs (a step seen in fewer jobs is marked with its count):")
    for label, values in sorted(since_created.items(), key=lambda item: statistics.median(item[1])):
        count = "" if len(values) >= len(jobs) - 5 else f"  ({len(values)} jobs)"
        print(f"  {statistics.median(values):7.2f}  {label}{count}")


if __name__ == "__main__":
    main()
