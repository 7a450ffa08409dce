"""flask-smorest, adapted: errors in the service's envelope, validation failures as 400."""
from __future__ import annotations

from typing import Any

import flask
import flask_smorest
import marshmallow as ma
from flask import Response
from webargs import core
from webargs.flaskparser import FlaskParser, abort, is_json_request
from werkzeug.exceptions import HTTPException

from app.api import context, strictjson
from app.api.errors import ALL_CODES, http_exception_response


class ErrorDetailSchema(ma.Schema):
    field = ma.fields.String(required=True)
    message = ma.fields.String(required=True)


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf(ALL_CODES),
        metadata={"description": "One of the error codes of the reference"},
    )
    message = ma.fields.String(required=True)
    details = ma.fields.List(ma.fields.Nested(ErrorDetailSchema), required=True)
    request_id = ma.fields.String(required=True)


class ErrorEnvelopeSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema, required=True)


class Parser(FlaskParser):
    DEFAULT_VALIDATION_STATUS = 400
    # A misspelt filter (`?stauts=failed`) would otherwise list everything as if it had matched.
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION, "query": ma.RAISE, "querystring": ma.RAISE}

    def __init__(self) -> None:
        super().__init__()
        self._schemas: dict[type[ma.Schema], ma.Schema] = {}

    def _get_schema(self, argmap: Any, req: flask.Request) -> ma.Schema:
        """One instance per schema class, not one per request: webargs instantiates a class it is given on
        every request, and a schema's construction (deep copies of its declared fields and nested schemas)
        was about a tenth of a POST /jobs/'s CPU. Reuse is safe: a schema keeps no per-load state (webargs
        passes `unknown` to load(); settings-dependent bounds read the current app at call time)."""
        if isinstance(argmap, type) and issubclass(argmap, ma.Schema):
            schema = self._schemas.get(argmap)
            if schema is None:
                schema = self._schemas.setdefault(argmap, argmap())
            return schema
        return super()._get_schema(argmap, req)

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not is_json_request(req):
            return core.missing
        data = req.get_data(cache=True)
        if not data:
            return core.missing
        try:
            return context.json_body()
        except strictjson.JsonRejected as exc:
            abort(400, messages={"json": {exc.path or "_body": [exc.message]}})


class Api(flask_smorest.Api):
    ERROR_SCHEMA = ErrorEnvelopeSchema

    def handle_http_exception(self, error: HTTPException) -> Response:  # type: ignore[override]
        return http_exception_response(error)


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()
