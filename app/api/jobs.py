"""Jobs resource: parse, call one domain verb, serialize."""
from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import abort

from app.api import Blueprint
from app.api.context import session, settings
from app.api.identity import require_scope
from app.api.schemas import (
    JobCancelledSchema,
    JobCreatedSchema,
    JobCreateSchema,
    JobDetailSchema,
    JobListQuerySchema,
    JobListSchema,
)
from app.domain import jobs
from app.domain.callers import SCOPE_READ, SCOPE_WRITE

blp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs", description="Submit, inspect and cancel jobs")


@blp.route("/")
class JobCollection(MethodView):
    @blp.arguments(JobListQuerySchema, location="query")
    @blp.response(200, JobListSchema)
    def get(self, filters: jobs.JobFilters) -> dict[str, Any]:
        """List jobs, newest first"""
        caller = require_scope(SCOPE_READ)
        items, total = jobs.list_jobs(session(), caller, filters)
        return {"items": items, "total": total, "limit": filters.limit, "offset": filters.offset}

    @blp.arguments(JobCreateSchema)
    @blp.response(201, JobCreatedSchema)
    @blp.alt_response(400, description="Invalid request body")
    @blp.alt_response(403, description="preemptible: false above PREEMPTION_PROTECT_PRIORITY, by a non-admin")
    def post(self, request: jobs.JobRequest) -> Any:
        """Submit a job"""
        caller = require_scope(SCOPE_WRITE)
        if not request.preemptible and request.priority > settings().preemption_protect_priority and not caller.is_admin:
            abort(403, message=f"Only admins may submit a job of priority above {settings().preemption_protect_priority} "
                               "that cannot be preempted (preemptible: false)")
        return jobs.submit(session(), caller, request, settings())  # queue_position computed before the commit


@blp.route("/<string:job_id>")
class JobItem(MethodView):
    @blp.response(200, JobDetailSchema)
    @blp.alt_response(404, description="Job not found")
    def get(self, job_id: str) -> Any:
        """Get a job"""
        caller = require_scope(SCOPE_READ)
        job = jobs.get(session(), caller, job_id)
        job.queue_position = jobs.queue_position(session(), job)
        return job

    @blp.response(200, JobCancelledSchema)
    @blp.alt_response(404, description="Job not found")
    @blp.alt_response(409, description="Job already completed or cancelled")
    def delete(self, job_id: str) -> Any:
        """Cancel a pending or running job"""
        caller = require_scope(SCOPE_WRITE)
        return jobs.cancel(session(), caller, job_id)
