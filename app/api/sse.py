"""Server-sent event streams of a job's rows (log lines, events): resumable, bounded, ending with the job.

The rows come from the process's stream hub (app.api.streams): a follower waits on its own queue and
holds neither a database connection nor (under the gevent worker) a request thread.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, current_app, request

from app.api.errors import envelope
from app.api.ratelimit import client_key
from app.api.streams import RETRY_AFTER_SECONDS, Feed, Stream, StreamRefused, Streams


def last_event_id() -> int | None:
    value = request.headers.get("Last-Event-ID", "").strip()
    # A row id is a PostgreSQL bigint: anything longer is not one of ours.
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None


def streams() -> Streams:
    return current_app.extensions["jobservice.streams"]


def open_stream(feed: Feed[Any], job_id: str) -> Stream | Response:
    """A slot for one more stream of the caller, or the 429/503 envelope that refuses it."""
    try:
        return streams().open(client_key(), feed, job_id)
    except StreamRefused as refused:
        response = envelope(refused.status, refused.message)
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response


def response(stream: Stream, events: Iterator[str]) -> Response:
    resp = Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # The server closes the response however it ends (client gone, never iterated): the slot goes back then.
    resp.call_on_close(stream.close)
    return resp


def follow(
    stream: Stream,
    after_id: int,
    row_id: Callable[[Any], int],
    render: Callable[[Any], str],
    backlog: Iterable[Any] = (),
) -> Iterator[str]:
    """`id: <row id>` / `data: <row>` for each row after `after_id` as it appears; `event: end` with the
    job's status once the job has ended and every row is out."""
    settings = stream.streams.settings
    started = last_sent = time.monotonic()
    deadline = started + settings.stream_max_seconds  # a client reconnects with Last-Event-ID
    try:
        # Servers send the status line and headers with the first chunk: without this a client would wait
        # for them until the first row or keep-alive.
        yield ": open\n\n"
        for row in backlog:
            yield f"id: {row_id(row)}\ndata: {render(row)}\n\n"
        subscription = stream.subscribe(after_id)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            batch = subscription.next(min(last_sent + settings.stream_keepalive_seconds, deadline) - now)
            if batch is None:
                if time.monotonic() < deadline:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            for row in batch.rows:
                yield f"id: {row_id(row)}\ndata: {render(row)}\n\n"
            last_sent = time.monotonic()
            if batch.end_status is not None:
                yield f"event: end\ndata: {batch.end_status}\n\n"
                return
            if batch.gone:
                return
    finally:
        stream.close()
