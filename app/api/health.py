"""Liveness and readiness probes (no authentication)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, current_app
from flask.views import MethodView
from sqlalchemy import text

from app.api import Blueprint
from app.api.context import database, settings

blp = Blueprint("health", __name__, url_prefix="/api/v1/health", description="Probes")

ReadinessCheck = Callable[[], str]  # returns "ok", "error" or "disabled"


def check_database() -> str:
    try:
        with database().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception:  # noqa: BLE001 - any failure means not ready
        return "error"


def check_redis() -> str:
    url = settings().redis_url
    if not url:
        return "error"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return "ok" if client.ping() else "error"
        finally:
            client.close()
    except Exception:  # noqa: BLE001
        return "error"


def check_scheduler() -> str:
    """Degraded when no scheduler has completed a pass in SCHEDULER_HEALTH_INTERVALS intervals."""
    from app.domain import liveness

    config = settings()
    try:
        with database().session() as session:
            return liveness.status(session, config.scheduler_health_intervals * config.scheduler_interval_seconds)
    except Exception:  # noqa: BLE001 - an unreadable state means we cannot vouch for the scheduler
        return "error"


def kubernetes_checks(app: Flask) -> dict[str, ReadinessCheck]:
    """One `kubernetes/<name>` check per configured cluster; `kubernetes` sums them up."""
    from app.api.clusters import cluster_clients_of
    from app.kube import check_cluster

    registry = cluster_clients_of(app)

    def for_cluster(name: str) -> ReadinessCheck:
        def check() -> str:
            try:
                return check_cluster(registry.client(name), timeout=3.0)
            except Exception:  # noqa: BLE001 - a bad kubeconfig means not ready, not a 500
                return "error"

        return check

    return {f"kubernetes/{name}": for_cluster(name) for name in registry.names}


def register_check(app: Flask, name: str, check: ReadinessCheck) -> None:
    app.extensions.setdefault("jobservice.readiness", {})[name] = check


def readiness() -> tuple[dict[str, Any], int]:
    checks = {name: check() for name, check in current_app.extensions["jobservice.readiness"].items()}
    clusters = [result for name, result in checks.items() if name.startswith("kubernetes/")]
    checks["kubernetes"] = ("ok" if all(r == "ok" for r in clusters) else "error") if clusters else "disabled"
    healthy = all(result in ("ok", "disabled", "unknown") for result in checks.values())
    return {"status": "ok" if healthy else "degraded", "checks": checks}, 200 if healthy else 503


@blp.route("/live")
class Live(MethodView):
    def get(self) -> dict[str, str]:
        """The process is up"""
        return {"status": "ok"}


@blp.route("/ready")
class Ready(MethodView):
    def get(self) -> tuple[dict[str, Any], int]:
        """Database, Redis and Kubernetes are reachable; a scheduler passed recently"""
        return readiness()


def register(app: Flask) -> None:
    register_check(app, "database", check_database)
    register_check(app, "redis", check_redis)
    register_check(app, "scheduler", check_scheduler)
    for name, check in kubernetes_checks(app).items():
        register_check(app, name, check)
    # Kubernetes probes conventionally hit the root paths; serve both.
    app.add_url_rule("/health/live", "health_live_root", lambda: {"status": "ok"})
    app.add_url_rule("/health/ready", "health_ready_root", readiness)
