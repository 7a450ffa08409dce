"""Server-sent event streams of a job's rows (log lines, events): resumable, bounded, ending with the job."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from flask import Response, request
from sqlalchemy.orm import Session

from app.db import Database
from app.domain import jobs
from app.domain.states import TERMINAL, JobStatus

Row = TypeVar("Row")

POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
MAX_SECONDS = 3600.0  # a client reconnects with Last-Event-ID; no stream holds a server thread forever


def last_event_id() -> int | None:
    value = request.headers.get("Last-Event-ID", "")
    return int(value) if value.isdigit() else None


def response(stream: Iterator[str]) -> Response:
    return Response(stream, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def follow(
    db: Database,
    job_id: str,
    after_id: int,
    fetch: Callable[[Session, int], list[Row]],
    row_id: Callable[[Row], int],
    render: Callable[[Row], str],
    backlog: Iterable[Row] = (),
) -> Iterator[str]:
    """`id: <row id>` / `data: <row>` for each row after `after_id` as it appears; `event: end` with the
    job's status once the job has ended and every row is out."""
    started = last_sent = time.monotonic()
    last_id = after_id
    for row in backlog:
        yield f"id: {row_id(row)}\ndata: {render(row)}\n\n"
    with db.session() as session:
        while True:
            # Read the status first: rows written before the job ended are then surely fetched below.
            ended = JobStatus(jobs.current_status(session, job_id)) in TERMINAL
            fresh = fetch(session, last_id)
            session.rollback()  # no transaction held open between polls
            for row in fresh:
                last_id = row_id(row)
                yield f"id: {last_id}\ndata: {render(row)}\n\n"
            if fresh:
                last_sent = time.monotonic()
                continue
            if ended:
                yield f"event: end\ndata: {jobs.current_status(session, job_id)}\n\n"
                return
            now = time.monotonic()
            if now - started > MAX_SECONDS:
                return
            if now - last_sent > KEEPALIVE_SECONDS:
                last_sent = now
                yield ": keep-alive\n\n"
            time.sleep(POLL_SECONDS)
