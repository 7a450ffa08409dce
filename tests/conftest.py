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
from werkzeug.serving import make_server

from app import create_app
from app.db import Database
from app.embedded import ensure_services
from config import Settings

TABLES = ("job_log_lines", "job_events", "outbox", "jobs", "nodes")
TEST_JWT_SECRET = "test-secret-that-is-long-enough-for-hs256-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        with db.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
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
