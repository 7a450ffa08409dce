"""Request and response schemas: they validate input and generate the OpenAPI document."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

import marshmallow as ma
from marshmallow import validate

from app.domain.jobs import JobFilters, JobRequest
from app.domain.quantities import cpu_to_millis, memory_to_bytes
from app.domain.states import ALL_STATES

DEFAULT_CPU = "1"
DEFAULT_MEMORY = "1Gi"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = {"JOB_ID", "JOB_CONFIG", "JOB_RANK", "JOB_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"}


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, e.g. 2024-01-15T10:00:00.123Z."""
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class Timestamp(ma.fields.DateTime):
    def _serialize(self, value: datetime | None, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else format_timestamp(value)


class Quantity(ma.fields.String):
    def __init__(self, parse: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parse = parse

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            self.parse(text)
        except ValueError as exc:
            raise ma.ValidationError(str(exc)) from exc
        return text


class ResourcesSchema(ma.Schema):
    cpu = Quantity(cpu_to_millis, load_default=DEFAULT_CPU, metadata={"example": "2"})
    memory = Quantity(memory_to_bytes, load_default=DEFAULT_MEMORY, metadata={"example": "8Gi"})
    gpu = ma.fields.Integer(
        load_default=0, strict=True, validate=validate.Range(min=0, error="GPU count must be a non-negative integer")
    )


class GangSchema(ma.Schema):
    enabled = ma.fields.Boolean(load_default=False)
    min_members = ma.fields.Integer(
        load_default=1, strict=True, validate=validate.Range(min=1, error="min_members must be at least 1")
    )


class RetryPolicySchema(ma.Schema):
    max_retries = ma.fields.Integer(
        load_default=0, strict=True, validate=validate.Range(min=0, error="max_retries must be 0 or more")
    )
    backoff_multiplier = ma.fields.Float(
        load_default=2.0, validate=validate.Range(min=1, error="backoff_multiplier must be at least 1")
    )


class JobCreateSchema(ma.Schema):
    job_type = ma.fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$", error="job_type must be 1-63 letters, digits, '-', '_' or '.'"),
        metadata={"example": "inference"},
    )
    priority = ma.fields.Integer(
        load_default=50, strict=True, validate=validate.Range(min=0, max=100, error="Priority must be between 0 and 100")
    )
    image = ma.fields.String(
        load_default=None, allow_none=True, validate=validate.Length(min=1, max=512), metadata={"example": "pytorch-inference:v1.0"}
    )
    config = ma.fields.Dict(keys=ma.fields.String(), load_default=dict)
    resources = ma.fields.Nested(ResourcesSchema, load_default=lambda: ResourcesSchema().load({}))
    gang = ma.fields.Nested(GangSchema, load_default=lambda: GangSchema().load({}))
    timeout_seconds = ma.fields.Integer(
        load_default=None, allow_none=True, strict=True, validate=validate.Range(min=1, error="timeout_seconds must be greater than 0")
    )
    retry_policy = ma.fields.Nested(RetryPolicySchema, load_default=lambda: RetryPolicySchema().load({}))
    command = ma.fields.List(
        ma.fields.String(),
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, error="command must have at least one element"),
        metadata={"description": "Overrides the image's entrypoint, like a Kubernetes container's command"},
    )
    env = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.String(), load_default=dict)

    @ma.validates("env")
    def _env_names(self, value: dict[str, str], **kwargs: Any) -> None:
        bad = [k for k in value if not _ENV_NAME.match(k) or k in _RESERVED_ENV]
        if bad:
            raise ma.ValidationError(f"invalid or reserved environment variable names: {', '.join(sorted(bad))}")

    @ma.validates_schema
    def _runnable(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("image") and not data.get("command"):
            raise ma.ValidationError("a job needs an image, a command, or both", "image")

    @ma.post_load
    def _to_request(self, data: dict[str, Any], **kwargs: Any) -> JobRequest:
        resources = data["resources"]
        gang = data["gang"]
        retry = data["retry_policy"]
        return JobRequest(
            job_type=data["job_type"],
            priority=data["priority"],
            image=data["image"],
            config=data["config"],
            resources={"cpu": resources["cpu"], "memory": resources["memory"], "gpu": resources["gpu"]},
            cpu_millis=cpu_to_millis(resources["cpu"]),
            memory_bytes=memory_to_bytes(resources["memory"]),
            gpus=resources["gpu"],
            gang_enabled=gang["enabled"],
            gang_min_members=gang["min_members"],
            timeout_seconds=data["timeout_seconds"],
            max_retries=retry["max_retries"],
            backoff_multiplier=retry["backoff_multiplier"],
            command=data["command"],
            env=data["env"],
        )


class JobCreatedSchema(ma.Schema):
    id = ma.fields.String()
    job_type = ma.fields.String()
    priority = ma.fields.Integer()
    status = ma.fields.String()
    created_at = Timestamp()
    queue_position = ma.fields.Integer(allow_none=True)


class JobSummarySchema(ma.Schema):
    id = ma.fields.String()
    job_type = ma.fields.String()
    priority = ma.fields.Integer()
    status = ma.fields.String()
    created_at = Timestamp()
    started_at = Timestamp(allow_none=True)


class JobListQuerySchema(ma.Schema):
    status = ma.fields.String(validate=validate.OneOf(ALL_STATES))
    job_type = ma.fields.String()
    priority_min = ma.fields.Integer(load_default=0, validate=validate.Range(min=0, max=100))
    limit = ma.fields.Integer(load_default=50, validate=validate.Range(min=1, max=100, error="limit must be between 1 and 100"))
    offset = ma.fields.Integer(load_default=0, validate=validate.Range(min=0, error="offset must be 0 or more"))

    @ma.post_load
    def _to_filters(self, data: dict[str, Any], **kwargs: Any) -> JobFilters:
        return JobFilters(**data)


class JobListSchema(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(JobSummarySchema))
    total = ma.fields.Integer()
    limit = ma.fields.Integer()
    offset = ma.fields.Integer()


class JobDetailSchema(ma.Schema):
    id = ma.fields.String()
    job_type = ma.fields.String()
    priority = ma.fields.Integer()
    status = ma.fields.String()
    status_reason = ma.fields.String(allow_none=True)
    queue = ma.fields.String()
    queue_position = ma.fields.Integer(allow_none=True)
    image = ma.fields.String(allow_none=True)
    command = ma.fields.List(ma.fields.String(), allow_none=True)
    env = ma.fields.Dict()
    config = ma.fields.Dict()
    resources = ma.fields.Dict()
    gang = ma.fields.Method("_gang")
    timeout_seconds = ma.fields.Integer(allow_none=True)
    retry_policy = ma.fields.Method("_retry_policy")
    created_at = Timestamp()
    started_at = Timestamp(allow_none=True)
    completed_at = Timestamp(allow_none=True)
    cancelled_at = Timestamp(allow_none=True)
    retry_count = ma.fields.Integer()
    exit_code = ma.fields.Integer(allow_none=True)
    worker_id = ma.fields.String(allow_none=True)
    cluster = ma.fields.String(allow_none=True)
    node = ma.fields.String(allow_none=True)
    logs_url = ma.fields.Method("_logs_url")

    def _gang(self, job: Any) -> dict[str, Any]:
        return {"enabled": job.gang_enabled, "min_members": job.gang_min_members}

    def _retry_policy(self, job: Any) -> dict[str, Any]:
        return {"max_retries": job.max_retries, "backoff_multiplier": job.backoff_multiplier}

    def _logs_url(self, job: Any) -> str:
        return f"/api/v1/jobs/{job.id}/logs"


class JobCancelledSchema(ma.Schema):
    id = ma.fields.String()
    status = ma.fields.String()
    cancelled_at = Timestamp()
