"""A job's log store: lines kept in PostgreSQL as they are produced, so they outlive the process or pod."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Text, bindparam, cast, delete, func, insert, select, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain.jobs import utcnow
from app.models import JobLogLine

MAX_LINE_CHARS = 16_384
# Lines the service writes into a job's log itself (where a retry begins, what was truncated), not the job.
SYSTEM_STREAM = "system"


def attempt_marker(attempt: int) -> str:
    return f"=== attempt {attempt} begins (retry {attempt}) ==="


@dataclass(frozen=True)
class StoredLine:
    id: int
    at: datetime
    stream: str
    member: int
    line: str


def append(session: Session, job_id: str, attempt: int, lines: Sequence[tuple[datetime, str, int, str]]) -> None:
    """Store (at, stream, member, line) tuples in one statement."""
    if not lines:
        return
    with transaction(session):
        session.execute(
            insert(JobLogLine),
            [
                {"job_id": job_id, "attempt": attempt, "at": at, "stream": stream, "member": member, "line": line[:MAX_LINE_CHARS]}
                for at, stream, member, line in lines
            ],
        )


def append_once(session: Session, job_id: str, attempt: int, lines: Sequence[tuple[datetime, str, int, str]], *, retry: bool) -> bool:
    """`append`, made safe to retry: a retry first checks whether the batch (one statement, so all or
    nothing) was stored by a try whose commit went unacknowledged. False when it was."""
    if retry and lines and _contains(session, job_id, attempt, lines[0]):
        session.rollback()
        return False
    append(session, job_id, attempt, lines)
    return True


def _contains(session: Session, job_id: str, attempt: int, line: tuple[datetime, str, int, str]) -> bool:
    at, stream, member, text_ = line
    return session.scalar(
        select(JobLogLine.id).where(
            JobLogLine.at == at, JobLogLine.job_id == job_id, JobLogLine.attempt == attempt,
            JobLogLine.stream == stream, JobLogLine.member == member, JobLogLine.line == text_[:MAX_LINE_CHARS],
        ).limit(1)
    ) is not None


def _rows(session: Session, query) -> list[StoredLine]:  # type: ignore[no-untyped-def]
    return [StoredLine(r.id, r.at, r.stream, r.member, r.line) for r in session.execute(query)]


def tail(session: Session, job_id: str, count: int) -> list[StoredLine]:
    columns = (JobLogLine.id, JobLogLine.at, JobLogLine.stream, JobLogLine.member, JobLogLine.line)
    newest = _rows(session, select(*columns).where(JobLogLine.job_id == job_id).order_by(JobLogLine.id.desc()).limit(count))
    return list(reversed(newest))


def after(session: Session, job_id: str, last_id: int, limit: int = 1000) -> list[StoredLine]:
    columns = (JobLogLine.id, JobLogLine.at, JobLogLine.stream, JobLogLine.member, JobLogLine.line)
    return _rows(
        session, select(*columns).where(JobLogLine.job_id == job_id, JobLogLine.id > last_id).order_by(JobLogLine.id).limit(limit)
    )


def cursor_table(cursors: Sequence[tuple[str, int]]):  # type: ignore[no-untyped-def]
    """(job_id, after_id) pairs as a FROM item, sent as two arrays (one bind each, whatever their number)."""
    return select(
        func.unnest(cast(bindparam("job_ids", [c[0] for c in cursors]), ARRAY(Text))).label("job_id"),
        func.unnest(cast(bindparam("after_ids", [c[1] for c in cursors]), ARRAY(BigInteger))).label("after_id"),
    ).subquery("c")


def after_many(session: Session, cursors: Sequence[tuple[str, int]], limit: int = 1000) -> dict[tuple[str, int], list[StoredLine]]:
    """For each (job id, last id) the next `limit` lines, in one statement: what a stream hub fetches per tick.

    A LATERAL subquery per cursor keeps each lookup on ix_job_log_lines_job and bounds every job alike, so
    one job with a large backlog cannot crowd the others out of a tick.
    """
    if not cursors:
        return {}
    wanted = cursor_table(cursors)
    lines = (
        select(JobLogLine.id, JobLogLine.at, JobLogLine.stream, JobLogLine.member, JobLogLine.line)
        .where(JobLogLine.job_id == wanted.c.job_id, JobLogLine.id > wanted.c.after_id)
        .order_by(JobLogLine.id)
        .limit(limit)
        .lateral("l")
    )
    query = select(wanted.c.job_id, wanted.c.after_id, lines).select_from(wanted).join(lines, true()).order_by(lines.c.id)
    found: dict[tuple[str, int], list[StoredLine]] = {(job_id, after_id): [] for job_id, after_id in cursors}
    for r in session.execute(query):
        found[(r.job_id, r.after_id)].append(StoredLine(r.id, r.at, r.stream, r.member, r.line))
    return found


def purge_older_than(session: Session, days: int) -> int:
    with transaction(session):
        result = session.execute(delete(JobLogLine).where(JobLogLine.at < utcnow() - timedelta(days=days)))
    return result.rowcount or 0


def last_line_at(session: Session, job_id: str, attempt: int) -> datetime | None:
    """When the newest stored line of an attempt was produced: where a re-attached stream resumes."""
    return session.scalar(
        select(JobLogLine.at).where(JobLogLine.job_id == job_id, JobLogLine.attempt == attempt).order_by(JobLogLine.id.desc()).limit(1)
    )


def attempt_usage(session: Session, job_id: str, attempt: int) -> tuple[int, int]:
    """Lines and bytes an attempt has stored: the part of its log budget already spent."""
    lines, size = session.execute(
        select(func.count(), func.coalesce(func.sum(func.octet_length(JobLogLine.line)), 0)).where(
            JobLogLine.job_id == job_id, JobLogLine.attempt == attempt
        )
    ).one()
    return int(lines), int(size)


def append_many_once(session: Session, batches: Sequence[tuple[str, int, Sequence[tuple[datetime, str, int, str]]]],
                     *, retry: bool) -> bool:
    """Many attempts' lines, (job id, attempt, lines) each, in one statement and one transaction: what a
    worker supervising many attempts stores per flush. Safe to retry as `append_once` (all or nothing, so
    the first line tells whether an unacknowledged try committed). False when it had."""
    rows = [
        {"job_id": job_id, "attempt": attempt, "at": at, "stream": stream, "member": member, "line": line[:MAX_LINE_CHARS]}
        for job_id, attempt, lines in batches
        for at, stream, member, line in lines
    ]
    if not rows:
        return True
    first = rows[0]
    if retry and _contains(session, first["job_id"], first["attempt"], (first["at"], first["stream"], first["member"], first["line"])):
        session.rollback()
        return False
    with transaction(session):
        session.execute(insert(JobLogLine), rows)
    return True
