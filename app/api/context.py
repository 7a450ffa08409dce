"""Per-request access to the database session and settings."""
from __future__ import annotations

from typing import Any

from flask import Flask, current_app, g, request
from sqlalchemy.orm import Session

from app.api import strictjson
from app.db import Database
from app.wakeup import SchedulerWaker
from config import Settings


def database() -> Database:
    return current_app.extensions["jobservice.database"]


def settings() -> Settings:
    return current_app.config["JOBSERVICE_SETTINGS"]


def session() -> Session:
    if "db_session" not in g:
        g.db_session = database().sessions()
    return g.db_session


def json_body() -> Any:
    """The request's body through app.api.strictjson, parsed once per request (the limiter's cost, the
    arguments parser and an Idempotency-Key's fingerprint all read it); raises strictjson.JsonRejected."""
    if "json_body" not in g:
        g.json_body = strictjson.loads(request.get_data(cache=True))
    return g.json_body


def scheduler_waker() -> SchedulerWaker:
    return current_app.extensions["jobservice.scheduler_waker"]


def register(app: Flask, db: Database) -> None:
    app.extensions["jobservice.database"] = db
    app.extensions["jobservice.scheduler_waker"] = SchedulerWaker(db.engine)

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        s = g.pop("db_session", None)
        if s is not None:
            s.close()
