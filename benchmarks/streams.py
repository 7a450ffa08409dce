"""Stream benchmark: do 1,000 open follow streams starve the API?

Boots the API as the Procfile does (`gunicorn --config python:config.gunicorn`) on DATABASE_URL/REDIS_URL
(or the embedded servers when unset), submits a few pending jobs per caller (no scheduler runs, so they
stay pending and their streams stay open), then times `/health/live` and `GET /api/v1/jobs/` one request
after another, first with no stream open and then with `--followers` open `logs`/`events` streams, while
`--log-rate` log lines per second are written to the followed jobs. Followers are spread over `--callers`
callers, so the per-caller cap (STREAMS_PER_CALLER, default 20) holds as configured. At the end it cancels
its jobs and times how long every follower takes to receive `event: end`.

Every connection goes to 127.0.0.1; the whole run stops by itself after `--max-seconds`. The jobs it made
are left cancelled, owned by callers named `bench-stream-*`.

    python benchmarks/streams.py --followers 1000 --callers 50 --requests 300
"""
from __future__ import annotations

import argparse
import os
import secrets
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import jwt
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.db import Database  # noqa: E402
from app.domain import logs  # noqa: E402
from app.embedded import ensure_services  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token(secret: str, sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 3600, "scope": "jobs:read jobs:write"}, secret, algorithm="HS256")


class Followers:
    """Raw sockets in one selector loop (one thread): each sends a follow request and reads whatever comes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.pending: list[tuple[str, str]] = []
        self.status: dict[socket.socket, int | None] = {}
        self.ended: dict[socket.socket, float] = {}
        self.rows = 0
        self.closed = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def open(self, path: str, bearer: str) -> None:
        with self.lock:
            self.pending.append((path, bearer))

    def _connect(self, path: str, bearer: str) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {bearer}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        sock.setblocking(False)
        with self.lock:
            self.status[sock] = None
        self.selector.register(sock, selectors.EVENT_READ)

    def _loop(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                todo, self.pending = self.pending, []
            for path, bearer in todo:
                self._connect(path, bearer)
            if not self.selector.get_map():
                time.sleep(0.01)
                continue
            for key, _ in self.selector.select(timeout=0.01):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                with self.lock:
                    if not data:
                        self.selector.unregister(sock)
                        self.closed += 1
                        continue
                    if self.status[sock] is None:  # type: ignore[index]
                        self.status[sock] = int(data.split(b" ", 2)[1])  # type: ignore[index]
                    self.rows += data.count(b"\nid: ") + data.startswith(b"id: ")
                    if b"event: end" in data:
                        self.ended[sock] = time.monotonic()  # type: ignore[index]

    def statuses(self) -> dict[int | None, int]:
        with self.lock:
            counts: dict[int | None, int] = {}
            for status in self.status.values():
                counts[status] = counts.get(status, 0) + 1
            return counts

    def answered(self) -> int:
        with self.lock:
            return sum(1 for status in self.status.values() if status is not None)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in list(self.status):
            sock.close()


def time_requests(session: requests.Session, url: str, count: int, headers: dict[str, str], timeout: float) -> tuple[list[float], int]:
    """Sequential GETs; a request that fails or takes longer than `timeout` counts as an error (at `timeout`)."""
    latencies, errors = [], 0
    for _ in range(count):
        started = time.perf_counter()
        try:
            ok = session.get(url, headers=headers, timeout=timeout).status_code == 200
        except requests.RequestException:
            ok = False
        latencies.append((time.perf_counter() - started) * 1000)
        errors += not ok
    return latencies, errors


def figures(name: str, latencies: list[float], errors: int) -> str:
    return (
        f"{name:<22} p50 {percentile(latencies, 0.5):7.1f} ms   p99 {percentile(latencies, 0.99):7.1f} ms   "
        f"max {max(latencies):7.1f} ms   errors {errors}/{len(latencies)}"
    )


def worker_rss_mib(master: int) -> float:
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return sum(int(v) for v in out.split()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=50, help="followers are spread over this many callers")
    parser.add_argument("--jobs-per-caller", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300, help="timed requests per endpoint and phase")
    parser.add_argument("--log-rate", type=float, default=50.0, help="log lines per second written to followed jobs while loaded")
    parser.add_argument("--open-rate", type=float, default=250.0, help="streams opened per second")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="a timed request slower than this counts as an error")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="the whole run stops by itself after this")
    args = parser.parse_args()
    if not 0 < args.followers <= 5000 or not 0 < args.callers <= args.followers or args.requests < 1:
        raise SystemExit("--followers 1..5000, --callers 1..followers, --requests >= 1")
    run_deadline = time.monotonic() + args.max_seconds

    data_dir = tempfile.mkdtemp(prefix="jobservice-bench-")
    services = ensure_services(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"), data_dir, free_port())
    port = free_port()
    secret = secrets.token_hex(32)
    env = {
        **os.environ,
        "DATABASE_URL": services.database_url or "",
        "REDIS_URL": services.redis_url or "",
        "AUTH_ENABLED": "true",
        "JWT_SECRET_KEY": secret,
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        # The timed client sends a few hundred requests a second: well past the per-minute rate limits,
        # which are not what this measures. The stream caps stay as configured.
        "RATELIMIT_SUBMIT": "1000000/minute",
        "RATELIMIT_LIST": "1000000/minute",
        "RATELIMIT_DEFAULT": "1000000/minute",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    database = Database(env["DATABASE_URL"], pool_size=2)
    web_command = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")).split(":", 1)[1]
    server = subprocess.Popen(["sh", "-c", f"exec {web_command.strip()}"], env=env, cwd=ROOT, start_new_session=True)
    followers: Followers | None = None
    stop_writer = threading.Event()
    base = f"http://127.0.0.1:{port}"
    callers = [f"bench-stream-{secrets.token_hex(3)}-{i}" for i in range(args.callers)]
    bearers = {sub: token(secret, sub) for sub in callers}
    jobs: dict[str, list[str]] = {}
    try:
        while True:
            try:
                if requests.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > run_deadline:
                raise SystemExit("the API did not come up")
            time.sleep(0.2)

        session = requests.Session()
        for sub in callers:
            auth = {"Authorization": f"Bearer {bearers[sub]}"}
            for _ in range(args.jobs_per_caller):
                response = session.post(f"{base}/api/v1/jobs/", json={"job_type": "bench", "image": "busybox:1"}, headers=auth, timeout=30)
                if response.status_code != 201:
                    raise SystemExit(f"submit refused: {response.status_code} {response.text}")
                jobs.setdefault(sub, []).append(response.json()["id"])
        probe = {"Authorization": f"Bearer {bearers[callers[0]]}"}

        print(f"API: {web_command.strip()} (WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', '2')}), "
              f"{len(callers)} callers x {args.jobs_per_caller} pending jobs")
        idle = {
            "/health/live": time_requests(session, f"{base}/health/live", args.requests, {}, args.request_timeout),
            "GET /api/v1/jobs/": time_requests(session, f"{base}/api/v1/jobs/", args.requests, probe, args.request_timeout),
        }
        rss_idle = worker_rss_mib(server.pid)

        followers = Followers(port)
        opened_at = time.monotonic()
        for index in range(args.followers):
            sub = callers[index % len(callers)]
            job_id = jobs[sub][(index // len(callers)) % len(jobs[sub])]
            kind = "logs" if index % 2 else "events"
            followers.open(f"/api/v1/jobs/{job_id}/{kind}?follow=true", bearers[sub])
            time.sleep(max(0.0, opened_at + (index + 1) / args.open_rate - time.monotonic()))
        # A server that serves a stream per thread never answers those beyond its threads: go on without them.
        answer_deadline = min(run_deadline, time.monotonic() + 30)
        while followers.answered() < args.followers and time.monotonic() < answer_deadline:
            time.sleep(0.1)
        open_seconds = time.monotonic() - opened_at
        statuses = followers.statuses()

        followed = [job_id for ids in jobs.values() for job_id in ids]

        def write_logs() -> None:
            sent = 0
            started = time.monotonic()
            with database.session() as s:
                while not stop_writer.is_set() and time.monotonic() < run_deadline:
                    job_id = followed[sent % len(followed)]
                    logs.append(s, job_id, 0, [(datetime.now(timezone.utc), "stdout", 0, f"bench line {sent}")])
                    sent += 1
                    time.sleep(max(0.0, started + sent / args.log_rate - time.monotonic()))

        writer = threading.Thread(target=write_logs, daemon=True)
        rows_before = followers.rows
        loaded_started = time.monotonic()
        writer.start()
        loaded = {
            "/health/live": time_requests(session, f"{base}/health/live", args.requests, {}, args.request_timeout),
            "GET /api/v1/jobs/": time_requests(session, f"{base}/api/v1/jobs/", args.requests, probe, args.request_timeout),
        }
        loaded_seconds = time.monotonic() - loaded_started
        stop_writer.set()
        writer.join(5)
        rows_streamed = followers.rows - rows_before
        rss_loaded = worker_rss_mib(server.pid)
        try:
            refused = session.get(f"{base}/api/v1/jobs/{jobs[callers[0]][0]}/events?follow=true", headers=probe, timeout=args.request_timeout, stream=True)
        except requests.RequestException as exc:
            refused = requests.Response()
            refused.status_code, refused._content = 0, str(exc).encode()
        refused_text = "(a stream)" if refused.status_code == 200 else refused.text[:90]
        refused.close()

        cancel_started = time.monotonic()
        cancel_errors = 0
        for sub, ids in jobs.items():
            for job_id in ids:
                try:
                    session.delete(f"{base}/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {bearers[sub]}"}, timeout=args.request_timeout)
                except requests.RequestException:
                    cancel_errors += 1
        while len(followers.ended) < followers.statuses().get(200, 0) and time.monotonic() < min(run_deadline, cancel_started + 60):
            time.sleep(0.1)
        ends = sorted(t - cancel_started for t in followers.ended.values())
        streaming = followers.statuses().get(200, 0)

        print(f"streams opened: {args.followers} in {open_seconds:.1f} s; answers {dict(sorted(statuses.items(), key=str))}")
        print(f"one more stream of a caller already at its cap: {refused.status_code} {refused_text}")
        print("with 0 open streams:")
        for name, (latencies, errors) in idle.items():
            print("  " + figures(name, latencies, errors))
        print(f"with {statuses.get(200, 0)} open streams ({args.log_rate:.0f} log lines/s written to their jobs):")
        for name, (latencies, errors) in loaded.items():
            print("  " + figures(name, latencies, errors))
        print(f"rows delivered to followers while timing: {rows_streamed} ({rows_streamed / loaded_seconds:.0f}/s)")
        print(f"API workers' RSS: {rss_idle:.0f} MiB idle, {rss_loaded:.0f} MiB with the streams open")
        print(f"cancels that failed or timed out: {cancel_errors}")
        if ends:
            print(f"`event: end` after cancelling every job: {len(ends)}/{streaming} followers, "
                  f"median {statistics.median(ends):.2f} s, last {ends[-1]:.2f} s after the first cancel")
    finally:
        stop_writer.set()
        if followers is not None:
            followers.close()
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        database.dispose()
        services.stop()


if __name__ == "__main__":
    main()
