"""gunicorn's configuration for the `web` process: `gunicorn --config python:config.gunicorn`.

- gevent workers: a follow stream (logs, events) is a greenlet waiting on the stream hub's queue, so
  thousands of them cost neither threads nor database connections (psycogreen makes psycopg2 yield).
- `reuse_port`: a master restarted after a SIGKILL binds at once, although the dead master's orphaned
  workers may still hold the port for a moment; `graceful_timeout` keeps that moment short.
- gunicorn's own refusals (bad request line, 414, 431, ...) answer in the API's JSON error envelope.
- No gunicorn access log: the app writes one JSON line per request itself (app._register_access_log);
  gunicorn's own lines are JSON too when LOG_FORMAT is `json`. QuietAccessLogger skips gunicorn's access
  entry altogether: with a logging config it built the entry's atoms for every request and then dropped the
  line (2.6% of the API's samples under 16 submitting clients, benchmarks/dispatch.py --submit-only --py-spy).
- A response's head and body leave in one write (OneWriteResponse): gunicorn wrote them with a send() each,
  two loopback segments and two client wake-ups per answer (9% of the API's samples, the same profile).

Every value comes from config.Settings, the one reader of the environment.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import socket
import uuid
from datetime import datetime, timezone
from typing import Any

from gunicorn import glogging, util
from gunicorn.http import wsgi
from gunicorn.workers.ggevent import GeventWorker

from config import Settings

_settings = Settings.from_env()

wsgi_app = "app:create_app()"
bind = [f"0.0.0.0:{_settings.port}"]
workers = _settings.web_concurrency
worker_class = "config.gunicorn.EnvelopeGeventWorker"
worker_connections = _settings.web_worker_connections
reuse_port = True
graceful_timeout = math.ceil(_settings.web_graceful_timeout_seconds)
accesslog = None
logger_class = "config.gunicorn.QuietAccessLogger"
# gunicorn >= 25 opens a control socket at one fixed path per user: a second master (a restart, another
# instance on the host) would fight over it, and nothing here uses gunicornc.
control_socket_disable = True
# gunicorn's defaults, stated: beyond them the request gets 414 / 431 in the envelope.
limit_request_line = 4094
limit_request_fields = 100
limit_request_field_size = 8190



class JsonLines(logging.Formatter):
    """The shape of app.logs.JsonFormatter; importing app here would load Flask and SQLAlchemy into the
    master before the workers' gevent patching."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


loglevel = _settings.log_level.lower()
if _settings.log_format == "json":
    logconfig_dict = {
        "root": {"level": _settings.log_level, "handlers": []},
        "loggers": {"gunicorn.error": {"level": _settings.log_level, "handlers": ["error_console"], "propagate": False}},
        "handlers": {"error_console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "formatters": {"json": {"()": JsonLines}},
    }

ERROR_CODES = {
    400: "BAD_REQUEST",  # not HTTP at all (request line, header syntax, chunking): no body was validated
    403: "FORBIDDEN",
    414: "URI_TOO_LONG",
    417: "EXPECTATION_FAILED",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL_ERROR",
    501: "NOT_IMPLEMENTED",
}
MAX_MESSAGE_CHARS = 300  # gunicorn's message may quote the offending request line

log = logging.getLogger("gunicorn.error")


def write_envelope(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Stands in for gunicorn.util.write_error, which writes an HTML page."""
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    body = json.dumps(
        {
            "error": {
                "code": ERROR_CODES.get(status_int, "INTERNAL_ERROR" if status_int >= 500 else "BAD_REQUEST"),
                "message": f"{reason}: {mesg}"[:MAX_MESSAGE_CHARS] if mesg else reason,
                "details": [],
                "request_id": request_id,
            }
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


class QuietAccessLogger(glogging.Logger):
    """gunicorn's logger without its access log: the app logs each request itself (app._register_access_log)."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


class OneWriteResponse(wsgi.Response):
    """An HTTP/1 response whose head goes out in the same write as its body's first (for the API: only) piece.

    Only for a body of known length that is not chunked: anything else (a stream, a HEAD, a 204/304, an empty
    piece) is written as gunicorn writes it, head first."""

    def write(self, arg: bytes) -> None:
        if (self.headers_sent or self.chunked or self._omits_body or not isinstance(arg, bytes) or not arg
                or self.response_length is None or len(arg) > self.response_length - self.sent):
            super().write(arg)
            return
        lines = self.default_headers()
        lines.extend(f"{name}: {value}\r\n" for name, value in self.headers)
        head = util.to_bytestring("%s\r\n" % "".join(lines), "latin-1")  # as Response.send_headers builds it
        self.headers_sent = True
        self.sent += len(arg)
        util.write(self.sock, head + arg)


class EnvelopeGeventWorker(GeventWorker):
    """gunicorn's gevent worker with cooperative psycopg2, JSON error pages and one write per response."""

    def patch(self) -> None:
        super().patch()  # gevent's monkey.patch_all(), before the app is loaded
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
        util.write_error = write_envelope  # base.Worker.handle_error looks it up at call time
        wsgi.Response = OneWriteResponse  # wsgi.create looks it up at call time (HTTP/2 passes its own class)


def on_starting(server: Any) -> None:
    """Each open stream is a socket: let the workers hold as many as they may accept."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = worker_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("open-file limit %s is below WEB_WORKER_CONNECTIONS + 256 (%s)", target, wanted)
