"""Request and response schemas: they validate input and generate the OpenAPI document.

Every number and string a caller sends is bounded here, and each bound is a validator that apispec
writes into the OpenAPI document (minimum, maximum, maxLength, maxItems, pattern), so a schema-driven
client knows it. Bounds an operator may want to change come from settings (`SettingRange`); the rest,
mostly the kernel's exec limits, are constants below. README.md ("Limits") lists them all.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

import marshmallow as ma
from flask import current_app, has_app_context
from marshmallow import validate

from app.domain.jobs import JobFilters, JobRequest
from app.domain.quantities import cpu_to_millis, memory_to_bytes
from app.domain.states import ALL_STATES
from config import Settings

DEFAULT_CPU = "1"
DEFAULT_MEMORY = "1Gi"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_ENV = {"JOB_ID", "JOB_CONFIG", "JOB_RANK", "JOB_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"}

# PostgreSQL `integer` columns (timeout, retries, gang size, gpus) hold no more than this, whatever the settings say.
INT32_MAX = 2**31 - 1
# Linux refuses one exec argument or environment string of 128 KiB or more (MAX_ARG_STRLEN) and all of
# them together beyond about 2 MiB (ARG_MAX less the stack's share): stay well below both.
MAX_COMMAND_ITEMS = 1024
MAX_ARG_BYTES = 64 * 1024
MAX_ENV_VARS = 256
MAX_ENV_NAME_LENGTH = 256
MAX_EXEC_BYTES = 1024 * 1024  # command + env + JOB_CONFIG together
# `config` reaches the job as the JOB_CONFIG environment string, so it too stays below MAX_ARG_STRLEN.
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 32
MAX_IMAGE_LENGTH = 512
MAX_QUANTITY_LENGTH = 32
MAX_OFFSET = 10_000_000  # deep offsets cost a scan each; far from bigint's range
MAX_CURSOR_LENGTH = 512
JOB_TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$"
# A Kubernetes quantity (app.domain.quantities), as a pattern a schema-driven client can generate from.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE])?$"
# Image references are printable ASCII without spaces (registry/name:tag@digest).
IMAGE_PATTERN = r"^[!-~]+$"
# A GPU model as nodes report it (nvidia-smi's name, Kubernetes' nvidia.com/gpu.product label):
# printable ASCII, inner spaces allowed, no leading or trailing space.
GPU_TYPE_PATTERN = r"^[!-~]([ -~]{0,126}[!-~])?$"
MAX_GPU_TYPE_LENGTH = 128
MAX_GPU_TYPES = 8
POOL_PATTERN = JOB_TYPE_PATTERN  # WORKER_POOL names, as job types: 1-63 of A-Z a-z 0-9 _ . -

_DEFAULT_SETTINGS: Settings | None = None


def current_settings() -> Settings:
    """The app's settings inside a request or while the document is built; the defaults outside one."""
    global _DEFAULT_SETTINGS
    if has_app_context():
        return current_app.config["JOBSERVICE_SETTINGS"]
    if _DEFAULT_SETTINGS is None:
        _DEFAULT_SETTINGS = Settings()
    return _DEFAULT_SETTINGS


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, e.g. 2024-01-15T10:00:00.123Z."""
    value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


class Timestamp(ma.fields.DateTime):
    def _serialize(self, value: datetime | None, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else format_timestamp(value)


# --- validators and strict fields --------------------------------------------------------------


class SettingRange(validate.Range):
    """A Range whose maximum is a setting, read when it validates and when the document is built."""

    def __init__(self, min: int, setting: str, name: str, ceiling: int = INT32_MAX) -> None:  # noqa: A002
        self.min = min
        self.setting = setting
        self.ceiling = ceiling
        self.min_inclusive = self.max_inclusive = True
        self.error = f"{name} must be between {{min}} and {{max}}"

    @property
    def max(self) -> int:  # type: ignore[override]
        return min(int(getattr(current_settings(), self.setting)), self.ceiling)

    @max.setter
    def max(self, value: int) -> None:  # pragma: no cover - Range.__init__ is not called
        raise AttributeError("SettingRange.max comes from settings")


class FullMatch(validate.Regexp):
    """`re.match` with `$` lets a trailing newline through: the whole string must match."""

    def __call__(self, value: Any) -> Any:
        if self.regex.fullmatch(value) is None:
            raise ma.ValidationError(self._format_error(value))
        return value


class StrictInteger(ma.fields.Integer):
    """A JSON integer: not a bool, not 1.0, not "1" (marshmallow's strict mode already refuses bools)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)


class StrictFloat(ma.fields.Float):
    """A JSON number, never a string ("2") or a bool; finite (marshmallow refuses NaN and inf)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(ma.fields.Boolean):
    """`true` or `false` only: marshmallow also takes 0, 1, "yes", "on" and friends."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Quantity(ma.fields.String):
    """A Kubernetes quantity string ("2", "500m", "8Gi"), more than zero and at most a setting."""

    def __init__(self, parse: Any, unit: str, maximum_setting: str, **kwargs: Any) -> None:
        super().__init__(
            validate=[validate.Length(min=1, max=MAX_QUANTITY_LENGTH), FullMatch(QUANTITY_PATTERN, error="not a quantity")],
            **kwargs,
        )
        self.parse = parse
        self.unit = unit
        self.maximum_setting = maximum_setting

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            # A bare number is ambiguous (is memory 8 bytes or 8 Gi?): Kubernetes takes strings, so do we.
            raise ma.ValidationError(f"must be a string quantity such as \"2\" or \"8Gi\", not {type(value).__name__}")
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > MAX_QUANTITY_LENGTH:
            raise ma.ValidationError(f"at most {MAX_QUANTITY_LENGTH} characters")
        maximum = getattr(current_settings(), self.maximum_setting)
        try:
            amount = self.parse(text)
            ceiling = self.parse(maximum)
        except ValueError as exc:
            raise ma.ValidationError(str(exc)) from exc
        if amount <= 0:
            raise ma.ValidationError(f"must be more than zero (at least 1 {self.unit})")
        if amount > ceiling:
            raise ma.ValidationError(f"must be at most {maximum}")
        return text


def _utf8_size(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def _depth(value: Any) -> int:
    # Bodies nest at most app.api.strictjson.MAX_BODY_DEPTH levels, so recursion stays shallow.
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _validate_config(value: dict[str, Any]) -> None:
    if _depth(value) > MAX_CONFIG_DEPTH:
        raise ma.ValidationError(f"config nests deeper than {MAX_CONFIG_DEPTH} levels")
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ma.ValidationError(f"config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES}")


def _validate_env(value: dict[str, str]) -> None:
    if len(value) > MAX_ENV_VARS:
        raise ma.ValidationError(f"at most {MAX_ENV_VARS} variables")
    long = [k for k in value if len(k) > MAX_ENV_NAME_LENGTH]
    if long:
        raise ma.ValidationError(f"variable names are at most {MAX_ENV_NAME_LENGTH} characters")
    bad = [k for k in value if not _ENV_NAME.fullmatch(k) or k in _RESERVED_ENV]
    if bad:
        raise ma.ValidationError(f"invalid or reserved environment variable names: {', '.join(sorted(bad))}")
    big = sorted(k for k, v in value.items() if _utf8_size(k) + 1 + _utf8_size(v) > MAX_ARG_BYTES)
    if big:
        raise ma.ValidationError(f"each NAME=value is at most {MAX_ARG_BYTES} bytes: {', '.join(big)}")


def _validate_command(value: list[str]) -> None:
    big = [i for i, arg in enumerate(value) if _utf8_size(arg) > MAX_ARG_BYTES]
    if big:
        raise ma.ValidationError(f"each argument is at most {MAX_ARG_BYTES} bytes (argument {big[0]} is larger)")


_GPU_TYPE_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_GPU_TYPE_LENGTH, "pattern": GPU_TYPE_PATTERN}


class GpuTypes(ma.fields.Field):
    """One GPU model, or a list of acceptable models in order of preference; loads as a tuple."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            metadata={
                "oneOf": [_GPU_TYPE_SCHEMA, {"type": "array", "items": _GPU_TYPE_SCHEMA, "minItems": 1, "maxItems": MAX_GPU_TYPES}],
                "description": "GPU model(s) the job may run on, as nodes report them (`GET /clusters/`): one name, or up to "
                f"{MAX_GPU_TYPES} in order of preference. The job is placed only on nodes of these types.",
                "example": "NVIDIA H100 80GB HBM3",
            },
            **kwargs,
        )
        self._item = ma.fields.String(validate=[validate.Length(min=1, max=MAX_GPU_TYPE_LENGTH),
                                                FullMatch(GPU_TYPE_PATTERN, error="a GPU type is printable ASCII without leading or trailing space")])

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            return (self._item.deserialize(value),)
        if not isinstance(value, list):
            raise ma.ValidationError("must be a string or a list of strings")
        if not 1 <= len(value) <= MAX_GPU_TYPES:
            raise ma.ValidationError(f"must list 1 to {MAX_GPU_TYPES} GPU types")
        errors: dict[int, Any] = {}
        types: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                errors[index] = ["Not a valid string."]
                continue
            try:
                types.append(self._item.deserialize(item))
            except ma.ValidationError as exc:
                errors[index] = exc.messages
        if errors:
            raise ma.ValidationError(errors)
        if len(set(types)) != len(types):
            raise ma.ValidationError("GPU types must not repeat")
        return tuple(types)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return list(value) if value is not None else None


class ResourcesSchema(ma.Schema):
    cpu = Quantity(
        cpu_to_millis,
        "m",
        "max_job_cpu",
        load_default=DEFAULT_CPU,
        metadata={"example": "2", "description": "CPU per member: a quantity string, 1m .. MAX_JOB_CPU (default 1024)"},
    )
    memory = Quantity(
        memory_to_bytes,
        "byte",
        "max_job_memory",
        load_default=DEFAULT_MEMORY,
        metadata={"example": "8Gi", "description": "Memory per member: a quantity string, 1 .. MAX_JOB_MEMORY (default 64Ti)"},
    )
    gpu = StrictInteger(load_default=0, validate=SettingRange(0, "max_job_gpus", "gpu"), metadata={"description": "GPUs per member"})
    gpu_type = GpuTypes(load_default=())
    pool = ma.fields.String(
        load_default=None,
        validate=FullMatch(POOL_PATTERN, error="pool must be 1-63 letters, digits, '-', '_' or '.'"),
        metadata={"example": "h100", "description": "The worker pool (WORKER_POOL) that must run it; any when absent"},
    )


class GangSchema(ma.Schema):
    enabled = StrictBoolean(load_default=False)
    min_members = StrictInteger(load_default=1, validate=SettingRange(1, "max_gang_members", "min_members"))


class RetryPolicySchema(ma.Schema):
    max_retries = StrictInteger(load_default=0, validate=SettingRange(0, "max_retries", "max_retries"))
    backoff_multiplier = StrictFloat(
        load_default=2.0, validate=validate.Range(min=1, max=10, error="backoff_multiplier must be between {min} and {max}")
    )


class JobCreateSchema(ma.Schema):
    job_type = ma.fields.String(
        required=True,
        validate=FullMatch(JOB_TYPE_PATTERN, error="job_type must be 1-63 letters, digits, '-', '_' or '.'"),
        metadata={"example": "inference"},
    )
    priority = StrictInteger(
        load_default=50, validate=validate.Range(min=0, max=100, error="Priority must be between 0 and 100")
    )
    image = ma.fields.String(
        load_default=None,
        allow_none=True,
        validate=[validate.Length(min=1, max=MAX_IMAGE_LENGTH), FullMatch(IMAGE_PATTERN, error="image must be printable ASCII without spaces")],
        metadata={"example": "pytorch-inference:v1.0"},
    )
    config = ma.fields.Dict(
        keys=ma.fields.String(),
        load_default=dict,
        validate=_validate_config,
        metadata={"description": f"Free-form; at most {MAX_CONFIG_DEPTH} levels deep and {MAX_CONFIG_BYTES} bytes as JSON"},
    )
    # Defaults as plain dicts (what the nested schemas load from {}): a schema instance per missing field
    # was a third of the validation time of a batch.
    resources = ma.fields.Nested(
        ResourcesSchema, load_default=lambda: {"cpu": DEFAULT_CPU, "memory": DEFAULT_MEMORY, "gpu": 0, "gpu_type": (), "pool": None}
    )
    gang = ma.fields.Nested(GangSchema, load_default=lambda: {"enabled": False, "min_members": 1})
    timeout_seconds = StrictInteger(
        load_default=None, allow_none=True, validate=SettingRange(1, "max_job_timeout_seconds", "timeout_seconds")
    )
    retry_policy = ma.fields.Nested(RetryPolicySchema, load_default=lambda: {"max_retries": 0, "backoff_multiplier": 2.0})
    command = ma.fields.List(
        ma.fields.String(validate=validate.Length(max=MAX_ARG_BYTES)),
        load_default=None,
        allow_none=True,
        validate=[
            validate.Length(min=1, max=MAX_COMMAND_ITEMS, error="command must have 1 to {max} elements"),
            _validate_command,
        ],
        metadata={
            "description": "Overrides the image's entrypoint, like a Kubernetes container's command; "
            f"each argument at most {MAX_ARG_BYTES} bytes"
        },
    )
    preemptible = StrictBoolean(
        load_default=True,
        metadata={"description": "false: never preempted by higher-priority work (admins only above PREEMPTION_PROTECT_PRIORITY)"},
    )
    env = ma.fields.Dict(
        keys=ma.fields.String(validate=validate.Length(min=1, max=MAX_ENV_NAME_LENGTH)),
        values=ma.fields.String(validate=validate.Length(max=MAX_ARG_BYTES)),
        load_default=dict,
        validate=_validate_env,
        metadata={
            "maxProperties": MAX_ENV_VARS,
            "description": f"Names match {_ENV_NAME.pattern} (not {', '.join(sorted(_RESERVED_ENV))}); "
            f"each NAME=value at most {MAX_ARG_BYTES} bytes",
        },
    )

    @ma.validates_schema
    def _runnable(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.get("image") and not data.get("command"):
            raise ma.ValidationError("a job needs an image, a command, or both", "image")
        exec_bytes = sum(_utf8_size(arg) + 1 for arg in data.get("command") or [])
        exec_bytes += sum(_utf8_size(k) + _utf8_size(v) + 2 for k, v in (data.get("env") or {}).items())
        exec_bytes += len(json.dumps(data.get("config") or {}, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if exec_bytes > MAX_EXEC_BYTES:
            raise ma.ValidationError(f"command, env and config together are at most {MAX_EXEC_BYTES} bytes", "command")

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
            resources={"cpu": resources["cpu"], "memory": resources["memory"], "gpu": resources["gpu"],
                       **({"gpu_type": list(resources["gpu_type"])} if resources["gpu_type"] else {}),
                       **({"pool": resources["pool"]} if resources["pool"] is not None else {})},
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
            gpu_types=resources["gpu_type"],
            pool=resources["pool"],
            preemptible=data["preemptible"],
        )


class JobCreatedSchema(ma.Schema):
    id = ma.fields.String()
    job_type = ma.fields.String()
    priority = ma.fields.Integer()
    status = ma.fields.String()
    created_at = Timestamp()
    queue_position = ma.fields.Integer(allow_none=True)


def dump_created(job: Any) -> dict[str, Any]:
    """JobCreatedSchema().dump(job), without marshmallow: a batch's answer is 1,000 of them, and the schema's
    dump was a fifth of a batch's CPU. tests/test_submission.py holds the two equal."""
    return {
        "id": job.id, "job_type": job.job_type, "priority": job.priority, "status": job.status,
        "created_at": format_timestamp(job.created_at), "queue_position": job.queue_position,
    }


# --- batch submit, idempotency keys, dry run ------------------------------------------------------

# Printable ASCII without spaces (a UUID fits many times over); a header value loses its edge spaces anyway.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
MAX_IDEMPOTENCY_KEY_LENGTH = 255


class SettingLength(validate.Length):
    """A Length whose maximum is a setting, read when it validates and when the document is built."""

    def __init__(self, min: int, setting: str, name: str) -> None:  # noqa: A002
        self.min = min
        self.setting = setting
        self.equal = None
        self.error = f"{name} must have {{min}} to {{max}} items"

    @property
    def max(self) -> int:  # type: ignore[override]
        return int(getattr(current_settings(), self.setting))

    @max.setter
    def max(self, value: int) -> None:  # pragma: no cover - Length.__init__ is not called
        raise AttributeError("SettingLength.max comes from settings")


class JobBatchCreateSchema(ma.Schema):
    jobs = ma.fields.List(
        ma.fields.Nested(JobCreateSchema),
        required=True,
        validate=SettingLength(1, "max_batch_jobs", "jobs"),
        metadata={"description": "The jobs, created all or none; errors name the item (`jobs.17.priority`)"},
    )


class SubmitQuerySchema(ma.Schema):
    dry_run = ma.fields.Boolean(
        load_default=False,
        truthy={"true"},
        falsy={"false"},
        metadata={"description": "true: validate and say what would happen (queue, fit, estimated start); create nothing"},
    )


class IdempotencyHeaderSchema(ma.Schema):
    idempotency_key = ma.fields.String(
        data_key="Idempotency-Key",
        validate=[
            validate.Length(min=1, max=MAX_IDEMPOTENCY_KEY_LENGTH),
            FullMatch(IDEMPOTENCY_KEY_PATTERN, error="Idempotency-Key must be 1-255 printable ASCII characters without spaces"),
        ],
        metadata={
            "description": "Per caller, kept IDEMPOTENCY_KEY_TTL_SECONDS (default 24 h): the same key with the same body "
            "answers the first request's answer and creates nothing; with a different body, 409 CONFLICT"
        },
    )


class JobBatchCreatedSchema(ma.Schema):
    jobs = ma.fields.List(ma.fields.Nested(JobCreatedSchema), required=True)


class DryRunBlockingSchema(ma.Schema):
    resource = ma.fields.String()
    requested = ma.fields.Raw(metadata={"description": "an integer or a quantity string"})
    free = ma.fields.Raw(metadata={"description": "an integer or a quantity string"})
    node = ma.fields.String(allow_none=True)


class DryRunJobSchema(ma.Schema):
    job_type = ma.fields.String()
    priority = ma.fields.Integer()
    queue = ma.fields.String()
    queue_position = ma.fields.Integer(allow_none=True)
    fits_now = ma.fields.Boolean(metadata={"description": "a node has room for it now (reason WAITING_FOR_SCHEDULER)"})
    reason = ma.fields.String(metadata={"description": "the scheduler's reason, as GET /jobs/{id}/explain gives it"})
    message = ma.fields.String()
    blocking = ma.fields.Nested(DryRunBlockingSchema, allow_none=True)
    estimated_start_at = Timestamp(allow_none=True)
    estimated_wait_seconds = ma.fields.Float(allow_none=True)


class DryRunSchema(DryRunJobSchema):
    dry_run = ma.fields.Boolean(metadata={"description": "always true: nothing was created"})


class DryRunBatchSchema(ma.Schema):
    dry_run = ma.fields.Boolean(metadata={"description": "always true: nothing was created"})
    jobs = ma.fields.List(ma.fields.Nested(DryRunJobSchema))


class JobSummarySchema(ma.Schema):
    id = ma.fields.String()
    job_type = ma.fields.String()
    priority = ma.fields.Integer()
    status = ma.fields.String()
    created_at = Timestamp()
    started_at = Timestamp(allow_none=True)


class JobListQuerySchema(ma.Schema):
    status = ma.fields.String(validate=validate.OneOf(ALL_STATES))
    job_type = ma.fields.String(validate=validate.Length(min=1, max=63))
    priority_min = ma.fields.Integer(load_default=0, validate=validate.Range(min=0, max=100))
    limit = ma.fields.Integer(load_default=50, validate=validate.Range(min=1, max=100, error="limit must be between 1 and 100"))
    offset = ma.fields.Integer(
        load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET, error="offset must be between {min} and {max}")
    )

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
    preemptible = ma.fields.Boolean()
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
