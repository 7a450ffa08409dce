"""The Job Service API: an application factory that runs a list of init steps."""
from __future__ import annotations

import logging
import time

from flask import Flask, g, request
from flask.wrappers import Response

from app import logs
from app.api import Api
from app.db import Database
from config import Settings, flask_config

log = logging.getLogger("jobservice.api")
API_RETRIED_PING_IDLE_AFTER_SECONDS = 1.0  # as the workers (workers.context): a pooled connection idle longer is pinged


def create_app(settings: Settings | None = None) -> Flask:
    if settings is None:
        from app.embedded import local_defaults

        settings = local_defaults(Settings.from_env())
    if not settings.database_url:
        raise RuntimeError(
            "DATABASE_URL is not set: run `jobservice run`, which starts the embedded PostgreSQL and Redis, "
            "or point DATABASE_URL and REDIS_URL at your servers"
        )
    logs.configure(settings.log_level, settings.log_format)
    app = Flask(__name__)
    app.config.update(flask_config(settings))
    # `/api/v1/jobs` is `/api/v1/jobs/`: answer it, never with werkzeug's HTML 308 redirect.
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False

    from app.api import auth, clusters, context, errors, fairness, guards, health, jobs, logs as job_logs, ratelimit
    from app.api import docs, metrics, nodes, openapi, prometheus, queues, quotas, streams, timeline

    # Submits retry a transaction that meets a dead connection before its commit: they skip the pre-ping of a
    # connection in use a moment ago (a round trip per submit); every other request keeps it.
    context.register(app, Database(settings.database_url, application_name="jobservice-api",
                                   retried_ping_idle_after=API_RETRIED_PING_IDLE_AFTER_SECONDS))
    streams.register(app)
    _register_access_log(app)
    errors.register(app)
    guards.register(app)  # before auth: a NUL in a header is refused before anything reads it
    clusters.register(app)
    auth.register(app)  # before the limiter: it keys on the caller this sets
    ratelimit.register(app)
    api = Api(app)
    # Bounds that come from settings (app.api.schemas.SettingRange) are read while the document is built.
    with app.app_context():
        api.register_blueprint(jobs.blp)
        api.register_blueprint(job_logs.blp)
        api.register_blueprint(health.blp)
        api.register_blueprint(clusters.blp)
        api.register_blueprint(nodes.blp)
        api.register_blueprint(queues.blp)
        api.register_blueprint(metrics.blp)
        api.register_blueprint(timeline.blp)
        api.register_blueprint(fairness.blp)
        api.register_blueprint(quotas.blp)
        api.register_blueprint(prometheus.blp)  # GET /metrics, at the root: Prometheus' default path
    openapi.complete(api)
    docs.register(app)
    health.register(app)
    _register_cli(app)
    return app


def _register_access_log(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _log_request(response: Response) -> Response:
        elapsed_ms = (time.perf_counter() - g.get("request_started", time.perf_counter())) * 1000
        log.info(
            "%s %s %s %.1fms",
            request.method,
            request.path,
            response.status_code,
            elapsed_ms,
            extra={"request_id": g.get("request_id")},
        )
        return response


def _register_cli(app: Flask) -> None:
    from flask_migrate import Migrate

    # env.py reads the URL and metadata itself; Flask-Migrate supplies the `flask db` commands.
    Migrate(directory=_migrations_dir()).init_app(app)


def _migrations_dir() -> str:
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")
