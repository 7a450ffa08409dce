"""Where a single POST /jobs/ spends its CPU: the API's Python (per step) and its PostgreSQL backend.

Runs the real app in this process (Flask's test client: no gunicorn, no gevent, one submit at a time) against
DATABASE_URL, so the CPU of each submit is measured without the noise of 16 clients on 2 shared cores:

- this process's CPU per submit (time.process_time), with authentication and rate limiting off (as
  benchmarks/dispatch.py runs) and then each on (a real HS256 token; the limiter's counters in REDIS_URL);
- the PostgreSQL backends' CPU per submit, from /proc/<pid>/stat of the sessions of this database;
- a cProfile of the submits, grouped into the steps of a submit (cumulative ms per submit).

HTTP parsing and the response's socket writes are gunicorn's: see `dispatch.py --submit-only --py-spy DIR`.

    DATABASE_URL=... REDIS_URL=... python benchmarks/submit_breakdown.py --submits 2000
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import Settings  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BODY = {"job_type": "bench", "command": ["true"], "priority": 10, "resources": {"cpu": "1m", "memory": "1Mi"}}
# (label, functions whose cumulative time is that step): the steps of one submit, outermost first.
STEPS = [
    ("whole request (Flask, in process)", ["app.py:wsgi_app"]),
    ("  before_request hooks (guards, auth, limiter, request id)", ["app.py:preprocess_request"]),
    ("  body parse + marshmallow load (webargs)", ["core.py:parse"]),
    ("  domain submit (transaction)", ["jobs.py:submit"]),
    ("    insert + reads round trip (SQLAlchemy + psycopg2)", ["jobs.py:insert_pending"]),
    ("    commit", ["session.py:commit"]),
    ("  response (dump, jsonify, after_request)", ["jobs.py:_created", "app.py:process_response"]),
    ("  teardown (session close, contexts)", ["ctx.py:pop"]),
]


def backend_cpu(database: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to `database` (this machine's server)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            if not command.startswith("postgres:") or f" {database} " not in command:
                continue
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def run(client, submits: int, headers: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps(BODY)
    for _ in range(submits):
        response = client.post("/api/v1/jobs/", data=body, headers={"Content-Type": "application/json", **headers})
        if response.status_code != 201:
            raise SystemExit(f"HTTP {response.status_code}: {response.data[:300]!r}")


FOLD_EVERY = 500  # submits: about what the scheduler's fold (every SCHEDULER_INTERVAL_SECONDS, 2 s) lets pile up


def fold(app) -> None:  # type: ignore[no-untyped-def]
    """Fold the counters' deltas, as the scheduler does: a submit's position read adds up the unfolded ones, so
    without it each measurement would read more of them than the last (and than the running service does)."""
    from app.domain import counters

    with app.extensions["jobservice.database"].session() as session:
        counters.fold(session)


def measure(label: str, app, submits: int, headers: dict[str, str], database: str) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    run(client, 100, headers)  # warm: connections, prepared statements, caches
    cpu = pg = seconds = 0.0
    for done in range(0, submits, FOLD_EVERY):
        fold(app)  # outside the measured window: the scheduler's work
        pg_before, cpu_before = backend_cpu(database), time.process_time()
        started = time.perf_counter()
        run(client, min(FOLD_EVERY, submits - done), headers)
        seconds += time.perf_counter() - started
        cpu += time.process_time() - cpu_before
        pg += backend_cpu(database) - pg_before
    cpu, pg = cpu * 1000 / submits, pg * 1000 / submits
    print(f"{label:<44} API process {cpu:5.2f} ms  PostgreSQL {pg:5.2f} ms  wall {seconds * 1000 / submits:5.2f} ms per submit")


def make_app(overrides: dict[str, str]):  # type: ignore[no-untyped-def]
    from app import create_app

    env = {**os.environ, "LOG_LEVEL": "WARNING", "JOB_QUEUES": "high-priority:50-100:1000,default:0-49:1000", **overrides}
    return create_app(Settings.from_env(env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=2000)
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL") or not os.environ.get("REDIS_URL"):
        raise SystemExit("set DATABASE_URL and REDIS_URL")
    # The schema first (a fresh database has none), as dispatch.py does.
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, check=True, capture_output=True)
    plain = make_app({"AUTH_ENABLED": "false", "RATELIMIT_ENABLED": "false"})
    database = plain.extensions["jobservice.database"]
    with database.engine.begin() as conn:
        conn.execute(text("TRUNCATE job_log_lines, job_events, outbox, jobs, nodes CASCADE"))
    name = database.engine.url.database or ""
    print(f"{args.submits} submits one at a time, load {open('/proc/loadavg').read().split()[0]}")
    measure("auth off, rate limit off (as dispatch.py)", plain, args.submits, {}, name)

    from app.api.auth import mint_token

    secret = "submit-breakdown-secret-of-at-least-32-bytes"
    authed = make_app({"AUTH_ENABLED": "true", "RATELIMIT_ENABLED": "false", "JWT_SECRET_KEY": secret})
    token = mint_token(Settings.from_env({**os.environ, "JWT_SECRET_KEY": secret}), "bench", ["jobs:read", "jobs:write"], 3600)
    bearer = {"Authorization": f"Bearer {token}"}
    measure("auth on (HS256 JWT), rate limit off", authed, args.submits, bearer, name)
    limited = make_app({"AUTH_ENABLED": "true", "RATELIMIT_ENABLED": "true", "JWT_SECRET_KEY": secret,
                        "RATELIMIT_SUBMIT": "1000000/minute"})
    measure("auth on, rate limit on (Redis)", limited, args.submits, bearer, name)

    fold(plain)
    profiler = cProfile.Profile(time.process_time)  # CPU, not the waits on PostgreSQL
    client = plain.test_client()
    profiler.enable()
    run(client, args.submits, {})
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    print("cProfile (CPU clock), auth and rate limit off, cumulative CPU ms per submit (profiler overhead included: read as shares):")
    for label, needles in STEPS:
        total = 0.0
        for (filename, line, function), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
            key = f"{Path(filename).name}:{line}({function})"
            short = f"{Path(filename).name}:{function}"
            if any(needle in (key, short) for needle in needles):
                total += cumulative
        print(f"  {label:<58} {total * 1000 / args.submits:6.3f}")


if __name__ == "__main__":
    main()
