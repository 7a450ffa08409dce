"""A job's timeline (every transition, live as server-sent events) and why it is not running yet."""
from __future__ import annotations

import json
from typing import Any

import marshmallow as ma
from flask import Response, current_app
from flask.views import MethodView

from app.api import Blueprint, sse, streams
from app.api.context import session, settings
from app.api.identity import require_scope
from app.api.schemas import Timestamp, format_timestamp
from app.domain import explain, jobs, timeline
from app.domain.callers import SCOPE_READ

blp = Blueprint("timeline", __name__, url_prefix="/api/v1/jobs", description="Job timeline and scheduling explanations")

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
    resource = ma.fields.String(metadata={"description": "gpus, cpu, memory, slots, gang_members, or gpu_type / pool (no live node of that GPU type / pool)"})
    requested = ma.fields.Raw()
    free = ma.fields.Raw()
    node = ma.fields.String(allow_none=True, metadata={"description": "The node that came nearest to fitting it"})


class BlockedBySchema(ma.Schema):
    job_id = ma.fields.String()
    priority = ma.fields.Integer()
    queue = ma.fields.String()
    reason = ma.fields.String()
    message = ma.fields.String()


class FairShareRankSchema(ma.Schema):
    owner = ma.fields.String()
    weight = ma.fields.Float()
    share = ma.fields.Float(metadata={"description": "Decayed usage plus what it holds, as a dominant fraction of the fleet, over its weight"})
    rank = ma.fields.Integer(metadata={"description": "1 = served first among owners with a backlog, at equal priority"})
    owners_waiting = ma.fields.Integer()


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
    estimated_start_at = ma.fields.Method("_start_at", metadata={"description": "From the scheduler's plan (running jobs' ends, reservations, backoff); null when none"})
    estimated_wait_seconds = ma.fields.Method("_wait_seconds")
    estimate_basis = ma.fields.Method("_basis", metadata={"description": "How the estimate was made, or why there is none"})
    attempt = ma.fields.Integer()
    cluster = ma.fields.String(allow_none=True)
    node = ma.fields.String(allow_none=True)
    worker_id = ma.fields.String(allow_none=True)
    since = Timestamp(allow_none=True, metadata={"description": "Queued, running or ended at"})
    exit_code = ma.fields.Integer(allow_none=True)
    reserved_start_at = Timestamp(allow_none=True, metadata={"description": "RESERVED: it starts by then at the latest"})
    reserved_nodes = ma.fields.List(ma.fields.String(), allow_none=True, metadata={"description": "RESERVED: cluster/node it is reserved on"})
    fair_share = ma.fields.Nested(FairShareRankSchema, allow_none=True)

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
    @blp.alt_response(429, description="follow=true: the caller already holds STREAMS_PER_CALLER streams (Retry-After)")
    @blp.alt_response(503, description="follow=true: this API process holds STREAMS_PER_PROCESS streams (Retry-After)")
    def get(self, args: dict[str, Any], job_id: str) -> Any:
        """Every transition of a job, oldest first, kept for the job's life"""
        caller = require_scope(SCOPE_READ)
        job = jobs.get(session(), caller, job_id)
        if args["follow"]:
            schema = EventSchema()
            stream = sse.open_stream(streams.EVENTS, job.id)
            if isinstance(stream, Response):
                return stream
            events = sse.follow(
                stream, sse.last_event_id() or 0, lambda event: event.id, lambda event: json.dumps(schema.dump(event), separators=(",", ":")),
            )
            return sse.response(stream, events)
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
        plans = current_app.extensions.setdefault("jobservice.explain_plans", explain.PlanCache())
        return explain.explain(session(), job, settings(), plans=plans)
