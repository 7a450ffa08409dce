"""A job's logs: the last lines as text, or a live server-sent event stream that resumes and ends with the job."""
from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask import Response
from flask.views import MethodView
from marshmallow import validate
from sqlalchemy.orm import Session

from app.api import Blueprint, sse, streams
from app.api.context import session
from app.api.identity import require_scope
from app.api.schemas import format_timestamp
from app.domain import jobs, logs
from app.domain.callers import SCOPE_READ

blp = Blueprint("logs", __name__, url_prefix="/api/v1/jobs", description="Job logs")


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
    @blp.alt_response(429, description="follow=true: the caller already holds STREAMS_PER_CALLER streams (Retry-After)")
    @blp.alt_response(503, description="follow=true: this API process holds STREAMS_PER_PROCESS streams (Retry-After)")
    def get(self, args: dict[str, Any], job_id: str) -> Response:
        """Logs of a job, kept after it ends"""
        caller = require_scope(SCOPE_READ)
        job = jobs.get(session(), caller, job_id)
        ranked = job.gang_enabled and job.gang_min_members > 1
        if not args["follow"]:
            lines = logs.tail(session(), job.id, args["tail"]) if args["tail"] else []
            body = "".join(render(line, args["timestamps"], ranked) + "\n" for line in lines)
            return Response(body, mimetype="text/plain")
        stream = sse.open_stream(streams.LOG_LINES, job.id)
        if isinstance(stream, Response):
            return stream
        try:
            resume_after = sse.last_event_id()
            backlog, after_id = ([], resume_after) if resume_after is not None else _first_line_id(session(), job.id, args["tail"])
        except BaseException:
            stream.close()
            raise
        events = sse.follow(stream, after_id, lambda line: line.id, lambda line: render(line, args["timestamps"], ranked), backlog)
        return sse.response(stream, events)


def _first_line_id(s: Session, job_id: str, tail: int) -> tuple[list[logs.StoredLine], int]:
    """The last `tail` lines to send first, and the id after which new lines follow (on the request's
    session: opening a stream takes one pooled connection, not two)."""
    backlog = logs.tail(s, job_id, tail) if tail else []
    if backlog:
        return backlog, backlog[-1].id
    newest = logs.tail(s, job_id, 1)
    return [], newest[-1].id if newest else 0
