"""A job's logs: the last lines as text, or a live server-sent event stream that resumes and ends with the job."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import marshmallow as ma
from flask import Response, request
from flask.views import MethodView
from marshmallow import validate

from app.api import Blueprint
from app.api.context import database, session
from app.api.identity import require_scope
from app.api.schemas import format_timestamp
from app.db import Database
from app.domain import jobs, logs
from app.domain.callers import SCOPE_READ
from app.domain.states import TERMINAL, JobStatus

blp = Blueprint("logs", __name__, url_prefix="/api/v1/jobs", description="Job logs")

FOLLOW_POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
FOLLOW_MAX_SECONDS = 3600.0  # a client reconnects with Last-Event-ID; no stream holds a thread forever


class LogQuerySchema(ma.Schema):
    follow = ma.fields.Boolean(load_default=False, metadata={"description": "Stream logs in real time (text/event-stream)"})
    tail = ma.fields.Integer(load_default=100, validate=validate.Range(min=0, max=100_000), metadata={"description": "Number of lines from the end"})
    timestamps = ma.fields.Boolean(load_default=True, metadata={"description": "Prefix each line with its time"})


def render(line: logs.StoredLine, timestamps: bool, ranked: bool) -> str:
    text = f"[rank {line.member}] {line.line}" if ranked else line.line
    return f"{format_timestamp(line.at)} {text}" if timestamps else text


@blp.route("/<string:job_id>/logs")
class JobLogs(MethodView):
    @blp.arguments(LogQuerySchema, location="query")
    @blp.response(200, content_type="text/plain")
    @blp.alt_response(404, description="Job not found")
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Logs of a job, kept after it ends"""
        caller = require_scope(SCOPE_READ)
        job = jobs.get(session(), caller, job_id)
        ranked = job.gang_enabled and job.gang_min_members > 1
        if not args["follow"]:
            lines = logs.tail(session(), job.id, args["tail"]) if args["tail"] else []
            body = "".join(render(line, args["timestamps"], ranked) + "\n" for line in lines)
            return Response(body, mimetype="text/plain")
        resume_after = request.headers.get("Last-Event-ID", "")
        stream = follow(database(), job.id, args["tail"], int(resume_after) if resume_after.isdigit() else None, args["timestamps"], ranked)
        return Response(stream, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def follow(db: Database, job_id: str, tail: int, resume_after: int | None, timestamps: bool, ranked: bool) -> Iterator[str]:
    """Events `id: <line id>` / `data: <line>`; a final `event: end` carries the job's status."""
    started = last_sent = time.monotonic()
    with db.session() as s:
        if resume_after is None:
            backlog = logs.tail(s, job_id, tail) if tail else []
            last_id = backlog[-1].id if backlog else _newest_id_before_tail(s, job_id)
        else:
            backlog, last_id = [], resume_after
        for line in backlog:
            yield _event(line, timestamps, ranked)
        while True:
            ended = JobStatus(jobs.current_status(s, job_id)) in TERMINAL
            fresh = logs.after(s, job_id, last_id)
            s.rollback()  # no transaction held open between polls
            for line in fresh:
                last_id = line.id
                yield _event(line, timestamps, ranked)
            if fresh:
                last_sent = time.monotonic()
                continue
            if ended:
                yield f"event: end\ndata: {jobs.current_status(s, job_id)}\n\n"
                return
            now = time.monotonic()
            if now - started > FOLLOW_MAX_SECONDS:
                return
            if now - last_sent > KEEPALIVE_SECONDS:
                last_sent = now
                yield ": keep-alive\n\n"
            time.sleep(FOLLOW_POLL_SECONDS)


def _newest_id_before_tail(s: Any, job_id: str) -> int:
    newest = logs.tail(s, job_id, 1)
    return newest[-1].id if newest else 0


def _event(line: logs.StoredLine, timestamps: bool, ranked: bool) -> str:
    return f"id: {line.id}\ndata: {render(line, timestamps, ranked)}\n\n"
