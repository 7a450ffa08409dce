"""Per-client rate limits (flask-limiter), counted in Redis so that every API process shares them.

The client is the authenticated `sub` (set by app.api.auth, whose hook must run first) or, for
calls without a caller, the client address. Limits: RATELIMIT_SUBMIT for POST /jobs/ and POST /jobs/batch
(one counter, in jobs: a batch costs one per job it holds), RATELIMIT_LIST for GET and HEAD /jobs/ (one
counter), RATELIMIT_DEFAULT for each other endpoint and method; health probes are not limited.
"""
from __future__ import annotations

import logging

import limits
from flask import Flask, current_app, g, request
from flask.wrappers import Response
from flask_limiter import Limit, Limiter

from app.api import context
from app.api.auth import is_health_probe
from config import Settings

log = logging.getLogger(__name__)

JOBS_COLLECTION_RULE = "/api/v1/jobs/"
JOBS_BATCH_RULE = "/api/v1/jobs/batch"
# A Redis that hangs (rather than refusing connections) must not hang every request with it.
REDIS_TIMEOUT_SECONDS = 1.0


def client_key() -> str:
    caller = g.get("caller")
    if caller is not None:
        return f"sub:{caller.sub}"
    return f"addr:{request.remote_addr or 'unknown'}"


def _is_submit() -> bool:
    rule = request.url_rule
    return request.method == "POST" and rule is not None and rule.rule in (JOBS_COLLECTION_RULE, JOBS_BATCH_RULE)


def limit_for_request() -> str:
    settings: Settings = current_app.config["JOBSERVICE_SETTINGS"]
    if _is_submit():
        return settings.ratelimit_submit
    rule = request.url_rule
    if rule is not None and rule.rule == JOBS_COLLECTION_RULE and request.method in ("GET", "HEAD"):
        return settings.ratelimit_list
    return settings.ratelimit_default


def method_scope(endpoint: str) -> str:
    """Counters are per endpoint and method, but HEAD is a GET without its body: one counter for both;
    and one counter for the two ways to submit, so that a batch cannot get around the submit limit."""
    if _is_submit():
        return "submit"
    return f"{endpoint}:{'GET' if request.method == 'HEAD' else request.method}"


def request_cost() -> int:
    """What a request takes from its limit: a batch, one per job it holds (at most MAX_BATCH_JOBS); all else 1.

    Counted before the body is validated: an invalid batch costs what it holds, as its work was done.
    """
    rule = request.url_rule
    if request.method != "POST" or rule is None or rule.rule != JOBS_BATCH_RULE:
        return 1
    try:
        body = context.json_body()
    except Exception:  # noqa: BLE001 - the view refuses the body with its own 400
        return 1
    items = body.get("jobs") if isinstance(body, dict) else None
    settings: Settings = current_app.config["JOBSERVICE_SETTINGS"]
    return max(1, min(len(items), settings.max_batch_jobs)) if isinstance(items, list) else 1


def _breach_message() -> str:
    limit = limit_for_request()
    cost = request_cost()
    if cost > 1 and cost > limits.parse(limit).amount:
        # Waiting never helps this one: say what does.
        return (f"A batch of {cost} jobs is more than the submit limit of {limit} allows at once; "
                "send smaller batches (or raise RATELIMIT_SUBMIT)")
    return f"Rate limit of {limit} exceeded; retry after the number of seconds in the Retry-After header"


def _retry_after_only_on_refusals(response: Response) -> Response:
    # flask-limiter sets Retry-After on every limited response; it means "come back later" only on a 429.
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def register(app: Flask) -> None:
    """Register after app.api.auth: flask-limiter's check runs as a before_request hook, in order."""
    settings: Settings = app.config["JOBSERVICE_SETTINGS"]
    if not settings.ratelimit_enabled:
        return
    if not settings.redis_url:
        log.warning("REDIS_URL is not set: rate limits are counted per process, not shared")
    app.config.update(
        {
            "RATELIMIT_ENABLED": True,
            "RATELIMIT_STORAGE_URI": settings.redis_url or "memory://",
            "RATELIMIT_STORAGE_OPTIONS": (
                {"socket_connect_timeout": REDIS_TIMEOUT_SECONDS, "socket_timeout": REDIS_TIMEOUT_SECONDS}
                if settings.redis_url
                else {}
            ),
            # Moving window: exactly N per rolling minute, no double burst at a fixed window's edge.
            "RATELIMIT_STRATEGY": "moving-window",
            "RATELIMIT_KEY_PREFIX": "jobservice",
            "RATELIMIT_HEADERS_ENABLED": True,
            # Redis down: keep serving, counting in this process's memory until Redis answers again
            # (flask-limiter logs the switch); swallow anything else the limiter trips over.
            "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
            "RATELIMIT_SWALLOW_ERRORS": True,
        }
    )
    # Registered before the limiter's own after_request so that it runs after it (Flask runs them in reverse).
    app.after_request(_retry_after_only_on_refusals)
    limiter = Limiter(
        client_key,
        default_limits=[
            Limit(limit_for_request, scope=method_scope, shared=True, cost=request_cost, error_message=_breach_message)
        ],
    )
    limiter.request_filter(is_health_probe)
    limiter.init_app(app)
    app.extensions["jobservice.limiter"] = limiter

