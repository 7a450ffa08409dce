"""Swagger UI's assets for /api/v1/docs, served from the installed swagger-ui-bundle package (pinned in
setup.cfg), so that the page works without internet and shows the version that was installed."""
from __future__ import annotations

from flask import Blueprint, Flask, Response, send_from_directory
from swagger_ui_bundle import swagger_ui_path

ASSETS_RULE = "/api/v1/docs/assets/<path:filename>"
# The bundle never changes under a running process: let browsers keep it for a day.
_MAX_AGE_SECONDS = 86400

blp = Blueprint("docs_assets", __name__)


@blp.get(ASSETS_RULE)
def asset(filename: str) -> Response:
    # send_from_directory refuses paths that leave the folder (404), such as `../`.
    return send_from_directory(swagger_ui_path, filename, max_age=_MAX_AGE_SECONDS)


def register(app: Flask) -> None:
    app.register_blueprint(blp)
