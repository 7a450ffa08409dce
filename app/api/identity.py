"""The caller of the current request: the one place the API learns who is asking."""
from __future__ import annotations

from flask import current_app, g
from flask_smorest import abort  # unlike flask.abort, it carries `message` to the envelope

from app.domain.callers import LOCAL_ADMIN, Caller


def current_caller() -> Caller:
    caller = getattr(g, "caller", None)
    if caller is not None:
        return caller
    if not current_app.config["JOBSERVICE_SETTINGS"].auth_enabled:
        return LOCAL_ADMIN
    abort(401)  # pragma: no cover - app.api.auth sets g.caller or refuses before any view runs


def require_scope(scope: str) -> Caller:
    caller = current_caller()
    if not caller.can(scope):
        abort(403, message=f"This operation needs the '{scope}' permission")
    return caller
