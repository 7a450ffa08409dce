"""Request-level input checks that come before any view: text that cannot be stored, bodies that are too big.

A NUL in a path, query or header value reaches PostgreSQL as a text parameter and fails there (a 500);
a chunked body has no Content-Length, so werkzeug only truncates it at MAX_CONTENT_LENGTH and the parser
then sees broken JSON (a 400). Both are decided here, once, for every route.
"""
from __future__ import annotations

import re
from typing import Any

from flask import Flask, request
from flask.json.provider import DefaultJSONProvider
from flask.wrappers import Response
from werkzeug.exceptions import RequestEntityTooLarge

from app.api import strictjson
from app.api.errors import envelope

# Header values are latin-1 text; beyond these, control characters are refused (HTAB is legal in values).
_HEADER_CONTROL = {chr(c) for c in range(0x20) if c != 0x09} | {"\x7f"}
_EVENT_ID = re.compile(r"[0-9]{1,18}")


class StrictJSONProvider(DefaultJSONProvider):
    """`request.get_json()` anywhere in the app parses strictly too (webargs uses app.api.Parser)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return strictjson.loads(s)


def _bad(field: str, message: str) -> Response:
    return envelope(400, "Request validation failed", [{"field": field, "message": message}])


def check_request() -> Response | None:
    """before_request: refuse unstorable text in the path, query and headers, and oversized bodies."""
    problem = strictjson.text_problem(request.path)
    if problem is None and any(ord(c) < 0x20 or c == "\x7f" for c in request.path):
        problem = "must not contain control characters"
    if problem:
        return _bad("path", problem)
    for name, value in request.args.items(multi=True):
        problem = strictjson.text_problem(name) or strictjson.text_problem(value)
        if problem:
            return _bad(name if strictjson.text_problem(name) is None else "query", problem)
    for name, value in request.headers.items():
        if any(c in _HEADER_CONTROL for c in value):
            return _bad(name, "header values must not contain control characters")
    resume = request.headers.get("Last-Event-ID", "")
    if resume and not _EVENT_ID.fullmatch(resume):
        # The streams take it as a row id (bigint); "²" passes str.isdigit() and then fails int().
        return _bad("Last-Event-ID", "must be an event id this API sent (1-18 decimal digits)")
    _enforce_body_limit()
    return None


def _enforce_body_limit() -> None:
    limit = request.max_content_length
    if limit is None or request.content_length is not None:
        return  # werkzeug refuses a declared Content-Length beyond the limit itself
    if "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
        return
    # werkzeug stops reading a chunked body at the limit and hands the truncated prefix on as if it were
    # the whole body; reaching the limit means the sender had more.
    if len(request.get_data(cache=True)) >= limit:
        raise RequestEntityTooLarge()


def register(app: Flask) -> None:
    app.json = StrictJSONProvider(app)
    app.before_request(check_request)
