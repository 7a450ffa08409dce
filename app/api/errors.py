"""The one error envelope: `{"error": {"code", "message", "details", "request_id"}}` for every error."""
from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from app.db import first_line, is_connection_error
from app.domain.errors import Conflict, DomainError, InvalidRequest, NotFound

log = logging.getLogger(__name__)

ERROR_CODES = {
    400: "VALIDATION_ERROR",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    409: "CONFLICT",
    422: "VALIDATION_ERROR",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
    # Not in the reference's table: each names its status, so a client can tell them apart.
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    408: "REQUEST_TIMEOUT",
    411: "LENGTH_REQUIRED",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "RANGE_NOT_SATISFIABLE",
    431: "REQUEST_HEADER_FIELDS_TOO_LARGE",
    501: "NOT_IMPLEMENTED",
    502: "BAD_GATEWAY",
    504: "GATEWAY_TIMEOUT",
}
# Statuses without a code of their own fall back to these.
CLIENT_ERROR = "BAD_REQUEST"
SERVER_ERROR = "INTERNAL_ERROR"
ALL_CODES = tuple(sorted({*ERROR_CODES.values(), CLIENT_ERROR, SERVER_ERROR}))
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id() -> str:
    rid = getattr(g, "request_id", None)
    if rid is None:
        supplied = request.headers.get("X-Request-ID", "")
        rid = supplied if _REQUEST_ID.match(supplied) else f"req-{uuid.uuid4().hex[:12]}"
        g.request_id = rid
    return rid


def envelope(status: int, message: str, details: list[dict[str, Any]] | None = None, code: str | None = None) -> Response:
    response = jsonify(
        {
            "error": {
                "code": code or ERROR_CODES.get(status, SERVER_ERROR if status >= 500 else CLIENT_ERROR),
                "message": message,
                "details": details or [],
                "request_id": request_id(),
            }
        }
    )
    response.status_code = status
    return response


def flatten_messages(messages: Any, prefix: str = "") -> list[dict[str, str]]:
    """marshmallow's nested error dict -> [{"field": "resources.cpu", "message": ...}, ...]."""
    if isinstance(messages, dict):
        out: list[dict[str, str]] = []
        for key, value in messages.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            out.extend(flatten_messages(value, name))
        return out
    if isinstance(messages, (list, tuple)):
        if all(isinstance(m, str) for m in messages):
            return [{"field": prefix or "_schema", "message": m} for m in messages]
        out = []
        for m in messages:
            out.extend(flatten_messages(m, prefix))
        return out
    return [{"field": prefix or "_schema", "message": str(messages)}]


def http_exception_response(error: HTTPException) -> Response:
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    details: list[dict[str, str]] = []
    messages = data.get("errors") or data.get("messages")
    if messages:
        # webargs keys messages by location ("json", "query"): the caller cares about the field.
        if isinstance(messages, dict) and set(messages) <= {"json", "query", "querystring", "headers", "form", "files", "view_args"}:
            for located in messages.values():
                details.extend(flatten_messages(located))
        else:
            details = flatten_messages(messages)
    message = data.get("message") or _default_message(status, error)
    if details and status in (400, 422):
        message = data.get("message") or "Request validation failed"
        status = 400
    response = envelope(status, message, details)
    for name, value in (data.get("headers") or {}).items():
        response.headers[name] = value
    if status == 405 and hasattr(error, "valid_methods") and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def _default_message(status: int, error: HTTPException) -> str:
    if status == 404:
        return f"No resource at {request.path}"
    if status == 405:
        return f"Method {request.method} is not allowed on {request.path}"
    if status == 413:
        return "Request body is too large"
    if status == 415:
        return "Request body must be JSON (Content-Type: application/json)"
    return error.description or error.name


def register(app: Flask) -> None:
    @app.before_request
    def _assign_request_id() -> None:
        request_id()

    @app.before_request
    def _require_json_body() -> Response | None:
        has_body = bool(request.content_length) or "Transfer-Encoding" in request.headers
        if request.method in ("POST", "PUT", "PATCH") and has_body and request.mimetype != "application/json":
            return envelope(415, _default_message(415, HTTPException()))
        return None

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-ID"] = request_id()
        return response

    app.register_error_handler(HTTPException, http_exception_response)

    @app.errorhandler(NotFound)
    def _not_found(error: NotFound) -> Response:
        return envelope(404, error.message, error.details)

    @app.errorhandler(Conflict)
    def _conflict(error: Conflict) -> Response:
        return envelope(409, error.message, error.details)

    @app.errorhandler(InvalidRequest)
    def _invalid(error: InvalidRequest) -> Response:
        return envelope(400, error.message, error.details)

    @app.errorhandler(DomainError)
    def _domain(error: DomainError) -> Response:  # pragma: no cover - every subclass has its own
        return envelope(400, error.message, error.details)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if is_connection_error(error):
            # The database went away under this request (restart, failover, a terminated session): a
            # transient condition the client may retry, not a bug. A write whose commit was cut off may
            # have committed; idempotent clients read before they write again.
            log.warning("database connection lost during the request: %s", first_line(error), extra={"request_id": request_id()})
            response = envelope(503, "The database is unavailable; retry shortly")
            response.headers["Retry-After"] = "1"
            return response
        log.exception("unhandled error", extra={"request_id": request_id()})
        return envelope(500, "Internal server error")
