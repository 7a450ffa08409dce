"""Queues resource: depth, processing and the backlog of each logical queue (any valid token)."""
from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask.views import MethodView
from marshmallow import validate

from app.api import Blueprint
from app.api.context import session, settings
from app.api.identity import current_caller
from app.api.schemas import MAX_CURSOR_LENGTH, FullMatch, Timestamp
from app.domain import stats

# Cursors are unpadded URL-safe base64 (app.domain.stats.encode_cursor).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"

blp = Blueprint("queues", __name__, url_prefix="/api/v1/queues", description="Queue status and backlog")


class QueueSummarySchema(ma.Schema):
    name = ma.fields.String()
    depth = ma.fields.Integer(metadata={"description": "Pending jobs (in the backlog, including retries in backoff)"})
    processing = ma.fields.Integer(metadata={"description": "Running jobs"})
    queued = ma.fields.Integer(metadata={"description": "Admitted jobs waiting for their worker to start them"})
    max_concurrency = ma.fields.Integer()
    oldest_job_age_seconds = ma.fields.Float(
        allow_none=True, metadata={"description": "Age of the longest-waiting pending job; null when there is none"}
    )


class QueueListSchema(ma.Schema):
    queues = ma.fields.List(ma.fields.Nested(QueueSummarySchema))
    total_pending = ma.fields.Integer()
    total_processing = ma.fields.Integer()


class PendingJobSchema(ma.Schema):
    id = ma.fields.String()
    priority = ma.fields.Integer()
    queued_at = Timestamp(metadata={"description": "When it entered the backlog: its submit or its latest return to pending"})
    retry_at = Timestamp(allow_none=True, metadata={"description": "A retry in backoff is not admitted before this"})


class QueueStatsSchema(ma.Schema):
    jobs_processed_1h = ma.fields.Integer(metadata={"description": "Attempts that ended in the last hour"})
    avg_wait_time_seconds = ma.fields.Float(allow_none=True, metadata={"description": "Backlog entry to running"})
    avg_processing_time_seconds = ma.fields.Float(allow_none=True, metadata={"description": "Running to the attempt's end"})


class QueueDetailSchema(QueueSummarySchema):
    jobs = ma.fields.List(ma.fields.Nested(PendingJobSchema), metadata={"description": "Pending jobs in admission order"})
    limit = ma.fields.Integer()
    next = ma.fields.String(allow_none=True, metadata={"description": "Pass as `after` for the next page; null on the last"})
    stats = ma.fields.Nested(QueueStatsSchema)


class QueueDetailQuerySchema(ma.Schema):
    limit = ma.fields.Integer(load_default=50, validate=validate.Range(min=1, max=100, error="limit must be between 1 and 100"))
    after = ma.fields.String(
        load_default=None,
        validate=[validate.Length(min=1, max=MAX_CURSOR_LENGTH), FullMatch(CURSOR_PATTERN, error="not a cursor of this API")],
        metadata={"description": "The `next` cursor of the previous page"},
    )


@blp.route("/")
class QueueCollection(MethodView):
    @blp.response(200, QueueListSchema)
    def get(self) -> dict[str, Any]:
        """Status of every queue"""
        current_caller()
        overview = stats.queues_overview(session(), settings())
        return {
            "queues": overview.queues,
            "total_pending": overview.total_pending,
            "total_processing": overview.total_processing,
        }


@blp.route("/<string:queue_name>")
class QueueItem(MethodView):
    @blp.arguments(QueueDetailQuerySchema, location="query")
    @blp.response(200, QueueDetailSchema)
    @blp.alt_response(404, description="Queue not found")
    def get(self, args: dict[str, Any], queue_name: str) -> dict[str, Any]:
        """A queue's status, its backlog (keyset-paginated) and its last hour"""
        current_caller()
        detail = stats.queue_detail(session(), settings(), queue_name, limit=args["limit"], after=args["after"])
        return {
            **vars(detail.summary),
            "jobs": [{"id": j.id, "priority": j.priority, "queued_at": j.queued_at, "retry_at": j.retry_at} for j in detail.jobs],
            "limit": detail.limit,
            "next": detail.next_cursor,
            "stats": detail.stats,
        }
