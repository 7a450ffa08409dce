"""README's commands under the embedded default (no DATABASE_URL, REDIS_URL or JWT_SECRET_KEY): `flask --app
app db upgrade` joins or starts the data folder's PostgreSQL, `flask --app app tokens create` signs with the
development secret that `jobservice run` uses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from sqlalchemy import create_engine, text

from app.db import sqlalchemy_url
from app.embedded import DEV_SECRET_FILE, local_defaults, start_postgres
from config import Settings

ROOT = Path(__file__).resolve().parent.parent
UNSET = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET_KEY", "JWT_PUBLIC_KEY", "JWT_JWKS_URL")


def flask(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(JOBSERVICE_DATA_DIR=str(data_dir), LOG_LEVEL="WARNING")
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Outside pytest's tmp_path (mode 0700 folders): the embedded PostgreSQL runs as its own system user
    # when the tests run as root, and must reach its folder; conftest's embedded default does the same.
    folder = Path(tempfile.mkdtemp(prefix="jobservice-flask-"))
    folder.chmod(0o755)
    yield folder / "data"
    shutil.rmtree(folder, ignore_errors=True)


def test_flask_commands_work_under_the_embedded_default(data_dir: Path) -> None:
    upgraded = flask(data_dir, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    assert "DATABASE_URL is not set" not in upgraded.stderr

    token = flask(data_dir, "tokens", "create", "alice", "--scope", "jobs:read")
    assert token.returncode == 0, token.stderr[-3000:]
    secret = (data_dir / DEV_SECRET_FILE).read_text().strip()
    claims = jwt.decode(token.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["scope"] == "jobs:read"

    defaults = local_defaults(Settings.from_env({"JOBSERVICE_DATA_DIR": str(data_dir), "DATABASE_URL": "postgresql://elsewhere/db"}))
    assert defaults.jwt_secret_key == secret and defaults.redis_url == "redis://127.0.0.1:6390/0"
    assert defaults.database_url == "postgresql://elsewhere/db"

    # The migrations are in the data folder's database (which stopped with the command, its last user).
    server, url = start_postgres(data_dir)
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0
    finally:
        engine.dispose()
        server.cleanup()
