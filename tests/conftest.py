"""Test fixtures: real PostgreSQL and Redis, the API served over real HTTP.

DATABASE_URL / REDIS_URL point the tests at running servers (CI uses the machine's); without them
the embedded PostgreSQL and Redis are started, as `jobservice run` does.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from werkzeug.serving import make_server

from app import create_app
from app import db as app_db
from app.db import Database
from app.embedded import ensure_services
from config import Settings

TABLES = ("job_log_lines", "job_events", "outbox", "jobs", "nodes", "node_events", "job_counts", "job_count_deltas", "job_stats", "job_stat_buckets",
          "job_stats_deltas", "scheduler_heartbeats", "fair_share_usage", "scheduler_state", "idempotency_keys", "quotas", "quota_changes",
          "fair_share_weights", "fair_share_weight_changes")
TEST_JWT_SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_token(
    sub: str | None,
    scopes: str | list[str] | None = "jobs:read jobs:write",
    *,
    key: Any = TEST_JWT_SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
    expires_in: int = 600,
    **claims: Any,
) -> str:
    """A signed JWT as an identity provider would issue it; `claims` add or override (None drops one)."""
    import time

    import jwt

    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "nbf": now, "exp": now + expires_in, "scope": scopes, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=algorithm, headers=headers)


@pytest.fixture(autouse=True)
def prepared_statements_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statements prepared once per database session for the whole run, as within a minute of service: the session-wide
    pools outlive PREPARED_MAX_AGE_SECONDS, and tests count the round trips of a pass or a submit. The re-preparation
    itself is tested in test_db_resilience.py."""
    monkeypatch.setattr(app_db, "PREPARED_MAX_AGE_SECONDS", float("inf"))


@pytest.fixture(scope="session")
def backing_services() -> Iterator[tuple[str, str]]:
    data_dir = tempfile.mkdtemp(prefix="jobservice-test-")
    services = ensure_services(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"), data_dir, free_port())
    assert services.database_url and services.redis_url
    yield services.database_url, services.redis_url
    services.stop()


@pytest.fixture(scope="session")
def service_env(backing_services: tuple[str, str]) -> dict[str, str]:
    """The environment every process of the service under test gets (API, scheduler, workers)."""
    database_url, redis_url = backing_services
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "AUTH_ENABLED": "false",
        "JWT_SECRET_KEY": TEST_JWT_SECRET,
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "WARNING",
        "RATELIMIT_ENABLED": "false",
    }


@pytest.fixture(scope="session")
def settings(service_env: dict[str, str]) -> Settings:
    return Settings.from_env(service_env)


@pytest.fixture(scope="session")
def database(settings: Settings) -> Iterator[Database]:
    db = Database(settings.database_url or "")
    with db.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    from flask_migrate import upgrade

    app = create_app(settings)
    with app.app_context():
        upgrade()
    yield db
    db.dispose()


@pytest.fixture(autouse=True)
def clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with empty tables and an empty Redis database."""
    if "database" in request.fixturenames or "api" in request.fixturenames:
        db: Database = request.getfixturevalue("database")
        for attempt in range(5):
            try:
                with db.engine.begin() as conn:
                    conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
                break
            except OperationalError as exc:
                # The live server's stream poller reads several tables in one transaction: PostgreSQL may
                # pick the TRUNCATE as a deadlock's victim. Anything else is a real failure.
                if "deadlock detected" not in str(exc) or attempt == 4:
                    raise
        settings: Settings = request.getfixturevalue("settings")
        client = redis.Redis.from_url(settings.redis_url or "")
        client.flushdb()
        client.close()
    yield


class LiveServer:
    """The app served over real HTTP by werkzeug's threaded server, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.app.extensions["jobservice.database"].dispose()


class ApiClient:
    """requests against the live server, with paths relative to /api/v1."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url
        self.http = requests.Session()
        self.http.headers.update(headers or {})

    def url(self, path: str) -> str:
        return path if path.startswith("http") else f"{self.base_url}/api/v1{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self.http.request(method, self.url(path), **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def submit(self, **fields: Any) -> dict[str, Any]:
        body = {"job_type": "inference", "image": "busybox:1", **fields}
        response = self.post("/jobs/", json=body)
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="session")
def live_server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    server = LiveServer(settings)
    yield server
    server.stop()


@pytest.fixture
def api(live_server: LiveServer) -> ApiClient:
    return ApiClient(live_server.url)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Slow end-to-end modules last, so quick failures show first.
    items.sort(key=lambda item: 1 if "e2e" in Path(str(item.fspath)).name else 0)


# --- Real workers and a real scheduler, for end-to-end tests -------------------------------------

FAST_TIMINGS = {
    "SCHEDULER_INTERVAL_SECONDS": "0.5",
    "OUTBOX_REPUBLISH_AFTER_SECONDS": "2",
    "JOB_HEARTBEAT_SECONDS": "0.5",
    "JOB_LEASE_SECONDS": "3",
    "NODE_LEASE_SECONDS": "6",
    "RETRY_BACKOFF_BASE_SECONDS": "0.5",
    "KILL_GRACE_SECONDS": "2",
}


class WorkerProcess:
    """`celery --app workers.celery_app worker` as a subprocess in its own process group."""

    def __init__(self, env: dict[str, str], node: str, concurrency: int, workdir: str) -> None:
        import subprocess
        import sys

        self.node = node
        self.log_path = Path(workdir) / f"worker-{node}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "--app", "workers.celery_app", "worker", "--loglevel", "INFO",
             "--concurrency", str(concurrency), "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
             "--hostname", f"{node}@%h"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )

    def kill(self) -> None:
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def e2e_env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **service_env, **FAST_TIMINGS, "WORKER_WORKDIR": str(tmp_path / "work"), "LOG_LEVEL": "INFO"}


@pytest.fixture
def start_worker(e2e_env: dict[str, str], database: Database, tmp_path: Path) -> Iterator[Any]:
    """start_worker(node, concurrency=2, gpus=0, **env) -> WorkerProcess, once its node has registered."""
    import time

    workers: list[WorkerProcess] = []

    def start(node: str = "node-a", concurrency: int = 2, gpus: int = 0, registers: str | None = None, **extra_env: str) -> WorkerProcess:
        """`registers`: the node row to wait for (a Kubernetes worker registers its cluster's nodes)."""
        env = {**e2e_env, "WORKER_NODE": node, "WORKER_GPU_COUNT": str(gpus), **extra_env}
        worker = WorkerProcess(env, node, concurrency, str(tmp_path))
        workers.append(worker)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with database.engine.connect() as conn:
                if conn.execute(text("SELECT 1 FROM nodes WHERE name = :n"), {"n": registers or node}).first():
                    return worker
            if worker.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker {node} did not register:\n{worker.log_path.read_text()[-3000:]}")

    yield start
    for worker in workers:
        worker.kill()


@pytest.fixture
def e2e_settings(e2e_env: dict[str, str]) -> Settings:
    return Settings.from_env(e2e_env)


@pytest.fixture
def start_scheduler(e2e_env: dict[str, str], database: Database) -> Iterator[Any]:
    """start_scheduler(**env) -> Scheduler: the real scheduler loop in a thread (same code as `jobservice scheduler`)."""
    from app.dispatch import CeleryPublisher
    from app.scheduler import SCHEDULER_APPLICATION, Scheduler

    running: list[tuple[Any, threading.Event, threading.Thread, Any]] = []

    def start(**extra_env: str) -> Scheduler:
        settings = Settings.from_env({**e2e_env, **extra_env})
        publisher = CeleryPublisher(settings)
        instance = Scheduler(settings, Database(settings.database_url or "", pool_size=2, application_name=SCHEDULER_APPLICATION), publisher)
        stop = threading.Event()
        thread = threading.Thread(target=instance.run_forever, args=(stop,), daemon=True)
        thread.start()
        running.append((instance, stop, thread, publisher))
        return instance

    yield start
    for instance, stop, thread, publisher in running:
        stop.set()
        thread.join(10)
        publisher.close()
        instance.database.dispose()


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1, message: str = "condition") -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def wait_for_status(api: ApiClient, job_id: str, statuses: set[str] | str, timeout: float = 30.0) -> dict[str, Any]:
    wanted = {statuses} if isinstance(statuses, str) else statuses
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = api.get(f"/jobs/{job_id}").json()
        return last if last["status"] in wanted else None

    try:
        return wait_for(reached, timeout, message=f"{job_id} to reach {wanted}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last}") from None
