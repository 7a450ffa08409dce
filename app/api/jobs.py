"""Jobs resource: parse, call one domain verb, serialize."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Response, jsonify
from flask.views import MethodView
from flask_smorest import abort

from app.api import Blueprint
from app.api.context import json_body, scheduler_waker, session, settings
from app.api.identity import require_scope
from app.api.schemas import (
    DryRunBatchSchema,
    DryRunSchema,
    IdempotencyHeaderSchema,
    JobBatchCreatedSchema,
    JobBatchCreateSchema,
    JobCancelledSchema,
    JobCreatedSchema,
    JobCreateSchema,
    JobDetailSchema,
    JobListQuerySchema,
    JobListSchema,
    SubmitQuerySchema,
    dump_created,
)
from app.domain import dryrun, idempotency, jobs
from app.domain.callers import SCOPE_READ, SCOPE_WRITE

REPLAYED_HEADER = "Idempotent-Replayed"
_REPLAYED_DOC = {
    REPLAYED_HEADER: {"description": "true: the answer of an earlier request with this Idempotency-Key", "schema": {"type": "string"}}
}

# Built once: a schema's construction costs more than the dump of one job (see app.api.Parser._get_schema).
_DRY_RUN, _DRY_RUN_BATCH = DryRunSchema(), DryRunBatchSchema()

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
    @blp.arguments(SubmitQuerySchema, location="query", as_kwargs=True)
    @blp.arguments(IdempotencyHeaderSchema, location="headers", as_kwargs=True)
    @blp.response(201, JobCreatedSchema, headers=_REPLAYED_DOC)
    @blp.alt_response(200, schema=DryRunSchema, description="dry_run=true: what would happen; nothing was created")
    @blp.alt_response(400, description="Invalid request body")
    @blp.alt_response(409, description="Idempotency-Key already used with a different request")
    @blp.alt_response(403, description="preemptible: false above PREEMPTION_PROTECT_PRIORITY, by a non-admin")
    def post(self, job: jobs.JobRequest, dry_run: bool, idempotency_key: str | None = None) -> Any:
        """Submit a job"""
        caller = require_scope(SCOPE_WRITE)
        _refuse_unpreemptible(caller, [job])
        if dry_run:
            preview = dryrun.preview(session(), caller, [job], settings(), _field_of_single)[0]
            return _dry_run_answer(_DRY_RUN.dump({"dry_run": True, **asdict(preview)}))
        key = _key("submit", idempotency_key)
        woken = scheduler_waker().at_commit()
        created = jobs.submit(session(), caller, job, settings(), key=key, wake_at_commit=woken)  # queue_position before the commit
        return _created(dump_created(created), created.replayed, woken)


@blp.route("/batch")
class JobBatch(MethodView):
    @blp.arguments(JobBatchCreateSchema)
    @blp.arguments(SubmitQuerySchema, location="query", as_kwargs=True)
    @blp.arguments(IdempotencyHeaderSchema, location="headers", as_kwargs=True)
    @blp.response(201, JobBatchCreatedSchema, headers=_REPLAYED_DOC)
    @blp.alt_response(200, schema=DryRunBatchSchema, description="dry_run=true: what would happen to each; nothing was created")
    @blp.alt_response(400, description="Invalid request body; details name the item (`jobs.17.priority`)")
    @blp.alt_response(409, description="Idempotency-Key already used with a different request")
    @blp.alt_response(403, description="preemptible: false above PREEMPTION_PROTECT_PRIORITY, by a non-admin")
    def post(self, batch: dict[str, list[jobs.JobRequest]], dry_run: bool, idempotency_key: str | None = None) -> Any:
        """Submit up to MAX_BATCH_JOBS jobs at once, all or none (the rate limit counts each job)"""
        caller = require_scope(SCOPE_WRITE)
        _refuse_unpreemptible(caller, batch["jobs"])
        if dry_run:
            previews = [asdict(p) for p in dryrun.preview(session(), caller, batch["jobs"], settings(), _field_of_item)]
            return _dry_run_answer(_DRY_RUN_BATCH.dump({"dry_run": True, "jobs": previews}))
        key = _key("batch", idempotency_key)
        woken = scheduler_waker().at_commit()
        submission = jobs.submit_many(session(), caller, batch["jobs"], settings(), key=key, field=_field_of_item,
                                      wake_at_commit=woken)
        return _created({"jobs": [dump_created(job) for job in submission.jobs]}, submission.replayed, woken)


def _refuse_unpreemptible(caller: Any, requests: list[jobs.JobRequest]) -> None:
    limit = settings().preemption_protect_priority
    if not caller.is_admin and any(not r.preemptible and r.priority > limit for r in requests):
        abort(403, message=f"Only admins may submit a job of priority above {limit} that cannot be preempted (preemptible: false)")


def _field_of_single(_index: int, name: str) -> str:
    return name


def _field_of_item(index: int, name: str) -> str:
    return f"jobs.{index}.{name}"


def _key(operation: str, header: str | None) -> idempotency.IdempotencyKey | None:
    """The key and the fingerprint of this request's body."""
    if header is None:
        return None
    body = json_body()
    return idempotency.IdempotencyKey(header, idempotency.fingerprint(operation, body))


def _dry_run_answer(body: dict[str, Any]) -> Response:
    response = jsonify(body)
    response.status_code = 200
    return response


def _created(body: dict[str, Any], replayed: bool, woken: bool) -> Response:
    """`woken`: the submit's transaction carried the scheduler's wake-up (app.wakeup), delivered by its commit."""
    response = jsonify(body)
    response.status_code = 201
    if replayed:
        response.headers[REPLAYED_HEADER] = "true"
    elif not woken:
        scheduler_waker().poke()  # after the commit; the scheduler's interval tick covers a lost wake-up
    return response


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
