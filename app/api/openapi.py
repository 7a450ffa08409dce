"""The OpenAPI document, completed after every blueprint is registered.

flask-smorest documents what each view declares; the rest holds for every operation alike and is added
here in one place: the bearer security scheme (none on the probes and /metrics), the error responses each
operation can give (all in the envelope), the SSE content type of `follow=true`, and the 200 bodies of the
views that return plain dicts. A schema-driven client (or fuzzer, tests/test_fuzz.py) can then hold the
service to each answer.
"""
from __future__ import annotations

from typing import Any

import flask_smorest

SECURITY_SCHEME = "bearerAuth"
_PUBLIC_PREFIXES = ("/api/v1/health/", "/health/")
_PUBLIC_PATHS = frozenset({"/metrics"})
_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_ENVELOPE = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
# (status, component name, description); which operations get which is decided in complete().
_ERRORS = {
    400: ("VALIDATION_ERROR", "Invalid path, query, header or body (details name each field)"),
    401: ("UNAUTHORIZED", "Missing or invalid bearer token"),
    403: ("FORBIDDEN", "The token lacks the permission this operation needs"),
    404: ("NOT_FOUND", "No such resource, or not the caller's"),
    409: ("CONFLICT", "The resource's state does not allow this"),
    413: ("PAYLOAD_TOO_LARGE", "Body larger than MAX_CONTENT_LENGTH, however it is sent"),
    415: ("UNSUPPORTED_MEDIA_TYPE", "A body that is not application/json"),
    429: ("RATE_LIMITED", "Rate limit exceeded; see Retry-After"),
}

_READINESS = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "checks": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_LIVENESS = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}}
_NODE = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "state": {"type": "string", "enum": ["ready", "cordoned", "draining"], "description": "Set by operators: cordoned and draining nodes get no new jobs"},
        "gpus": {
            "type": "object",
            "properties": {
                "total": {"type": "integer"},
                "available": {"type": "integer"},
                "type": {"type": "string", "nullable": True},
            },
        },
        "cpu": {"type": "object", "properties": {"total": {"type": "string"}, "available": {"type": "string"}}},
        "memory": {"type": "object", "properties": {"total": {"type": "string"}, "available": {"type": "string"}}},
    },
}
_CLUSTER_SUMMARY = {
    "type": "object",
    "required": ["name", "kind", "status"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["local", "kubernetes"]},
        "status": {"type": "string"},
        "total_nodes": {"type": "integer"},
        "available_gpus": {"type": "integer"},
        "total_gpus": {"type": "integer"},
        "running_jobs": {"type": "integer"},
        "cordoned_nodes": {"type": "integer"},
        "draining_nodes": {"type": "integer"},
    },
}
_CLUSTER_DETAIL = {
    "type": "object",
    "required": ["name", "kind", "status", "nodes"],
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["local", "kubernetes"]},
        "status": {"type": "string"},
        "nodes": {"type": "array", "items": _NODE},
        "capacity": {"type": "object", "properties": {"max_jobs": {"type": "integer"}, "current_jobs": {"type": "integer"}}},
    },
}
_CLUSTER_LIST = {
    "type": "object",
    "required": ["clusters"],
    "properties": {"clusters": {"type": "array", "items": {"$ref": "#/components/schemas/ClusterSummary"}}},
}
# Views that return plain dicts: their 200 bodies, by (path, method).
_BODIES: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {
    ("/api/v1/health/live", "get"): ("Liveness", _LIVENESS),
    ("/api/v1/health/ready", "get"): ("Readiness", _READINESS),
    ("/api/v1/clusters/", "get"): ("ClusterList", _CLUSTER_LIST),
    ("/api/v1/clusters/{cluster_name}", "get"): ("ClusterDetail", _CLUSTER_DETAIL),
}


# Path parameters: what the service ever issues (job ids are `job-` and 12 hex digits; queue and cluster names
# come from configuration). Anything else is simply not found (404), never an error of the server.
_PATH_PARAMETERS = {
    "job_id": {"type": "string", "pattern": "^job-[0-9a-f]{12}$", "maxLength": 16, "example": "job-3f9a1c2b7d4e"},
    "queue_name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", "maxLength": 63},
    "cluster_name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", "maxLength": 63},
    # Host names and Kubernetes node names (DNS subdomains, at most 253 characters).
    "node_name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$", "maxLength": 253},
    # A tenant with a quota or a fair-share weight (app.api.quotas.TENANT_PATTERN).
    "tenant": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,199}$", "maxLength": 200, "example": "team-a"},
}

# Views that answer text (flask-smorest documents their status, not their body).
_TEXT_BODIES = {
    ("/api/v1/jobs/{job_id}/logs", "get"): "One log line per line, oldest first (`timestamps=true`: RFC 3339 time first)",
    ("/metrics", "get"): "Prometheus text exposition format",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _is_public(path: str) -> bool:
    return path.startswith(_PUBLIC_PREFIXES) or path in _PUBLIC_PATHS


def _complete_operation(path: str, method: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status, response in responses.items():
        # alt_response(404, description=...) documents the status but not the body: it is the envelope.
        if status.isdigit() and int(status) >= 400 and "$ref" not in response and "content" not in response:
            if not (path.endswith("/ready") and status == "503"):
                response["content"] = _ENVELOPE
    public = _is_public(path)
    operation["security"] = [] if public else [{SECURITY_SCHEME: []}]
    # Every route refuses NUL and control characters in its path, query and headers.
    wanted = [400]
    if not public:
        wanted.append(401)
        if path.startswith(("/api/v1/jobs/", "/api/v1/nodes/")):
            wanted.append(403)
    if "{" in path:
        wanted.append(404)
    if method in ("post", "put", "patch"):
        wanted += [413, 415]
    if not path.startswith(_PUBLIC_PREFIXES):
        wanted.append(429)
    for status in wanted:
        current = responses.get(str(status))
        if current is None or current.get("$ref") == "#/components/responses/BAD_REQUEST":
            responses[str(status)] = _ref(_ERRORS[status][0])
    if (path, method) in _BODIES:
        name, _ = _BODIES[(path, method)]
        responses["200"] = {"description": "OK", "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
        if path.endswith("/ready"):
            responses["503"] = {
                "description": "A dependency is down (the same body, status degraded)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}},
            }
    if (path, method) in _TEXT_BODIES:
        ok = responses.setdefault("200", {"description": "OK"})
        ok.setdefault("content", {})["text/plain"] = {"schema": {"type": "string", "description": _TEXT_BODIES[(path, method)]}}
    parameters = operation.setdefault("parameters", [])
    if any(p.get("in") == "query" and p.get("name") == "follow" for p in parameters):
        ok = responses.setdefault("200", {"description": "OK"})
        content = ok.setdefault("content", {})
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "With follow=true: server-sent events (id, data; `event: end` last)"}
        }
        parameters.append(
            {
                "in": "header",
                "name": "Last-Event-ID",
                "required": False,
                "description": "With follow=true: resume after this event id (the SSE `id` last received)",
                "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
            }
        )


def complete(api: flask_smorest.Api) -> None:
    spec = api.spec
    spec.components.security_scheme(SECURITY_SCHEME, {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    for status, (name, description) in _ERRORS.items():
        spec.components.response(name, {"description": description, "content": _ENVELOPE})
    spec.components.schema("ClusterSummary", _CLUSTER_SUMMARY)
    for name, schema in {name: schema for name, schema in _BODIES.values()}.items():
        spec.components.schema(name, schema)
    # apispec keeps registered paths in `_paths`; it has no public way to amend an operation afterwards.
    for path, item in spec._paths.items():  # noqa: SLF001
        for parameter in item.get("parameters", []):
            if parameter.get("in") == "path" and parameter.get("name") in _PATH_PARAMETERS:
                parameter["schema"] = dict(_PATH_PARAMETERS[parameter["name"]])
        for method in _HTTP_METHODS:
            if method in item:
                _complete_operation(path, method, item[method])
