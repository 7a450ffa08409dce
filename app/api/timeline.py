"""A job's timeline (every transition, live as server-sent events) and why it is not running yet."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import marshmallow as ma
from flask import Response, request
from flask.views import MethodView

from app.api import Blueprint
from app.api.context import database, session, settings
from app.api.identity import require_scope
from app.api.schemas import Timestamp, format_timestamp
from app.db import Database
from app.domain import explain, jobs, timeline
from app.domain.callers import SCOPE_READ
from app.domain.states import TERMINAL, JobStatus

blp = Blueprint("timeline", __name__, url_prefix="/api/v1/jobs", description="Job timeline and scheduling explanations")

FOLLOW_POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
FOLLOW_MAX_SECONDS = 3600.0  # as for log streams: the client resumes with Last-Event-ID
PAGE = 1000


class EventSchema(ma.Schema):
    id = ma.fields.Integer(metadata={"description": "Orders the events; the SSE event id"})
    at = Timestamp()
    from_status = ma.fields.String(allow_none=True)
    to_status = ma.fields.String()
    reason = ma.fields.String()
    actor = ma.fields.String(metadata={"description": "Who made the transition: a user, the scheduler, a worker, system"})
    attempt = ma.fields.Integer()
    worker_id = ma.fields.String(allow_none=True)
    cluster = ma.fields.String(allow_none=True)
    node = ma.fields.String(allow_none=True)
    exit_code = ma.fields.Integer(allow_none=True)
    details = ma.fields.Dict()


class TimelineSchema(ma.Schema):
    job_id = ma.fields.String()
    status = ma.fields.String()
    events = ma.fields.List(ma.fields.Nested(EventSchema))


class TimelineQuerySchema(ma.Schema):
    follow = ma.fields.Boolean(load_default=False, metadata={"description": "Stream the events as they happen (text/event-stream)"})


class BlockingSchema(ma.Schema):
    resource = ma.fields.String(metadata={"description": "gpus, cpu, memory, slots or gang_members"})
    requested = ma.fields.Raw()
    free = ma.fields.Raw()
    node = ma.fields.String(allow_none=True, metadata={"description": "The node that came nearest to fitting it"})


class BlockedBySchema(ma.Schema):
    job_id = ma.fields.String()
    priority = ma.fields.Integer()
    queue = ma.fields.String()
    reason = ma.fields.String()
    message = ma.fields.String()


class ExplanationSchema(ma.Schema):
    job_id = ma.fields.String()
    status = ma.fields.String()
    reason = ma.fields.String(metadata={"description": "A code: " + ", ".join(r.value for r in explain.Reason)})
    message = ma.fields.String()
    queue = ma.fields.String()
    queue_position = ma.fields.Integer(allow_none=True)
    blocking = ma.fields.Nested(BlockingSchema, allow_none=True)
    blocked_by = ma.fields.Nested(BlockedBySchema, allow_none=True)
    retry_at = Timestamp(allow_none=True)
    estimated_start_at = ma.fields.Method("_start_at", metadata={"description": "From the queue's last-hour throughput; null when none"})
    estimated_wait_seconds = ma.fields.Method("_wait_seconds")
    estimate_basis = ma.fields.Method("_basis", metadata={"description": "How the estimate was made, or why there is none"})
    attempt = ma.fields.Integer()
    cluster = ma.fields.String(allow_none=True)
    node = ma.fields.String(allow_none=True)
    worker_id = ma.fields.String(allow_none=True)
    since = Timestamp(allow_none=True, metadata={"description": "Queued, running or ended at"})
    exit_code = ma.fields.Integer(allow_none=True)

    def _start_at(self, e: explain.Explanation) -> str | None:
        return format_timestamp(e.estimate.start_at) if e.estimate and e.estimate.start_at else None

    def _wait_seconds(self, e: explain.Explanation) -> float | None:
        return e.estimate.wait_seconds if e.estimate else None

    def _basis(self, e: explain.Explanation) -> str | None:
        return e.estimate.basis if e.estimate else None


@blp.route("/<string:job_id>/events")
class JobTimeline(MethodView):
    @blp.arguments(TimelineQuerySchema, location="query")
    @blp.response(200, TimelineSchema)
    @blp.alt_response(404, description="Job not found")
    def get(self, args: dict[str, Any], job_id: str) -> Any:
        """Every transition of a job, oldest first, kept for the job's life"""
        caller = require_scope(SCOPE_READ)
        job = jobs.get(session(), caller, job_id)
        if args["follow"]:
            resume_after = request.headers.get("Last-Event-ID", "")
            stream = follow(database(), job.id, int(resume_after) if resume_after.isdigit() else 0)
            return Response(stream, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events: list[timeline.Event] = []
        while True:
            page = timeline.events(session(), job.id, events[-1].id if events else 0, PAGE)
            events.extend(page)
            if len(page) < PAGE:
                break
        return {"job_id": job.id, "status": job.status, "events": events}


@blp.route("/<string:job_id>/explain")
class JobExplanation(MethodView):
    @blp.response(200, ExplanationSchema)
    @blp.alt_response(404, description="Job not found")
    def get(self, job_id: str) -> explain.Explanation:
        """Why a job is not running yet (or what happened to it)"""
        caller = require_scope(SCOPE_READ)
        job = jobs.get(session(), caller, job_id)
        return explain.explain(session(), job, settings())


def follow(db: Database, job_id: str, after_id: int) -> Iterator[str]:
    """`id: <event id>` / `data: <event as JSON>`; a final `event: end` carries the job's final status."""
    schema = EventSchema()
    started = last_sent = time.monotonic()
    last_id = after_id
    with db.session() as s:
        while True:
            ended = JobStatus(jobs.current_status(s, job_id)) in TERMINAL
            fresh = timeline.events(s, job_id, last_id, PAGE)
            s.rollback()  # no transaction held open between polls
            for event in fresh:
                last_id = event.id
                yield f"id: {event.id}\ndata: {json.dumps(schema.dump(event), separators=(',', ':'))}\n\n"
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
