"""flask-smorest, adapted: errors in the service's envelope, validation failures as 400."""
from __future__ import annotations

import flask_smorest
import marshmallow as ma
from flask import Response
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import HTTPException

from app.api.errors import http_exception_response


class ErrorDetailSchema(ma.Schema):
    field = ma.fields.String()
    message = ma.fields.String()


class ErrorBodySchema(ma.Schema):
    code = ma.fields.String(metadata={"description": "One of the error codes of the reference"})
    message = ma.fields.String()
    details = ma.fields.List(ma.fields.Nested(ErrorDetailSchema))
    request_id = ma.fields.String()


class ErrorEnvelopeSchema(ma.Schema):
    error = ma.fields.Nested(ErrorBodySchema)


class Parser(FlaskParser):
    DEFAULT_VALIDATION_STATUS = 400


class Api(flask_smorest.Api):
    ERROR_SCHEMA = ErrorEnvelopeSchema

    def handle_http_exception(self, error: HTTPException) -> Response:  # type: ignore[override]
        return http_exception_response(error)


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()
