"""Job counts without counting rows: the trigger-maintained counters of migration 0002_observability.

Triggers on `jobs` and `job_events` append delta rows in the writer's own transaction (never updating
a shared row, so concurrent submits do not contend); `fold` moves them into `job_counts` and
`job_stats`. A reader adds the folded table and the pending deltas up in ONE statement, so it sees
exactly the committed rows of its snapshot, however long ago the last fold ran.

This module knows tables and SQL only; it imports nothing else of the domain, so that `jobs` may use it.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.orm import Session

from app.db import transaction

FOLD_LOCK = 7_311_002  # pg advisory lock: one folder at a time, so upserts never deadlock each other
MINUTE_RETENTION = "25 hours"  # per-minute sums serve the 24 h peak and the windows' first hour
HOUR_RETENTION = "8 days"
SAME_PRIORITY_SCAN_LIMIT = 2_000


@dataclass(frozen=True)
class FoldResult:
    count_rows: int  # folded rows written (upserted), not deltas read
    stat_rows: int
    locked_out: bool = False


_FOLD_COUNTS = text(
    """
    WITH moved AS (DELETE FROM job_count_deltas RETURNING queue, status, priority, delta)
    INSERT INTO job_counts (queue, status, priority, count)
    SELECT queue, status, priority, sum(delta) FROM moved GROUP BY queue, status, priority
    ON CONFLICT (queue, status, priority) DO UPDATE SET count = job_counts.count + EXCLUDED.count
    """
)

HISTOGRAM_METRICS = ("wait", "dispatch", "execution")
_PERIOD = """
    CASE s.span
        WHEN 'minute' THEN m.minute
        WHEN 'hour' THEN date_trunc('hour', m.minute AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        ELSE '-infinity'::timestamptz
    END
"""
# Counts and sums per minute, hour and since ever. Histograms: since ever per queue and label (for
# Prometheus), and per hour fleet-wide only (queue and label ''): the 24 h percentiles merge them all
# anyway, and a per-queue, per-outcome split would multiply the rows a 24 h read has to add up.
_FOLD_STATS = text(
    f"""
    WITH moved AS (DELETE FROM job_stats_deltas RETURNING minute, queue, metric, label, bucket, count, total),
    sums AS (
        INSERT INTO job_stats (span, period_start, queue, metric, label, count, total)
        SELECT s.span, {_PERIOD}, m.queue, m.metric, m.label, sum(m.count), sum(m.total)
        FROM moved m CROSS JOIN (VALUES ('minute'), ('hour'), ('total')) AS s(span)
        GROUP BY 1, 2, 3, 4, 5
        ON CONFLICT (span, period_start, queue, metric, label)
        DO UPDATE SET count = job_stats.count + EXCLUDED.count, total = job_stats.total + EXCLUDED.total
    )
    INSERT INTO job_stat_buckets (span, period_start, queue, metric, label, bucket, count, total)
    SELECT s.span, {_PERIOD},
           CASE s.span WHEN 'hour' THEN '' ELSE m.queue END, m.metric, CASE s.span WHEN 'hour' THEN '' ELSE m.label END,
           m.bucket, sum(m.count), sum(m.total)
    FROM moved m CROSS JOIN (VALUES ('hour'), ('total')) AS s(span)
    WHERE m.metric IN {HISTOGRAM_METRICS!r}
    GROUP BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (span, period_start, queue, metric, label, bucket)
    DO UPDATE SET count = job_stat_buckets.count + EXCLUDED.count, total = job_stat_buckets.total + EXCLUDED.total
    """
)

_PURGE_STATS = text(
    f"""
    DELETE FROM job_stats
    WHERE (span = 'minute' AND period_start < now() - interval '{MINUTE_RETENTION}')
       OR (span = 'hour' AND period_start < now() - interval '{HOUR_RETENTION}')
    """
)
_PURGE_BUCKETS = text(f"DELETE FROM job_stat_buckets WHERE span = 'hour' AND period_start < now() - interval '{HOUR_RETENTION}'")


def fold(session: Session) -> FoldResult:
    """Move the appended deltas into the folded tables; commits. Cheap when there is nothing to fold."""
    with transaction(session):
        if not session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": FOLD_LOCK}):
            return FoldResult(0, 0, locked_out=True)
        counts = session.execute(_FOLD_COUNTS).rowcount or 0
        session.execute(text("DELETE FROM job_counts WHERE count = 0"))
        stats = session.execute(_FOLD_STATS).rowcount or 0
        session.execute(_PURGE_STATS)
        session.execute(_PURGE_BUCKETS)
    return FoldResult(counts, stats)


# --- job counts ------------------------------------------------------------------------------------

_COUNTS_BY_QUEUE_STATUS = text(
    """
    SELECT queue, status, sum(n)::bigint AS n
    FROM (SELECT queue, status, count AS n FROM job_counts
          UNION ALL
          SELECT queue, status, delta FROM job_count_deltas) AS c
    GROUP BY queue, status
    """
)


def counts_by_queue_and_status(session: Session) -> dict[str, dict[str, int]]:
    """{queue: {status: jobs}} for every queue and status that has (or had) jobs."""
    result: dict[str, dict[str, int]] = defaultdict(dict)
    for queue, status, n in session.execute(_COUNTS_BY_QUEUE_STATUS):
        if n:
            result[queue][status] = int(n)
    return dict(result)


_COUNT_MATCHING = text(
    """
    SELECT coalesce(sum(n), 0)::bigint
    FROM (SELECT status, priority, count AS n FROM job_counts
          UNION ALL
          SELECT status, priority, delta FROM job_count_deltas) AS c
    WHERE priority >= :priority_min AND (CAST(:status AS text) IS NULL OR status = :status)
    """
)


def count_jobs(session: Session, status: str | None, priority_min: int) -> int:
    """Jobs of every owner with this status (any when None) and at least this priority, without a scan."""
    return int(session.scalar(_COUNT_MATCHING, {"status": status, "priority_min": priority_min}) or 0)


# The jobs of higher priority and of the same priority, from the counters; then the jobs of its own level on
# either side of it, each side scanning at most :scan_limit index entries.
_POSITION_COUNTS = """
    WITH c AS (
        SELECT priority, count AS n FROM job_counts WHERE queue = :queue AND status = 'pending' AND priority >= :priority
        UNION ALL
        SELECT priority, delta FROM job_count_deltas WHERE queue = :queue AND status = 'pending' AND priority >= :priority
    )
    SELECT
        (SELECT coalesce(sum(n), 0) FROM c WHERE priority > :priority) AS higher,
        (SELECT coalesce(sum(n), 0) FROM c WHERE priority = :priority) AS same,"""
_SIDE = """
        (SELECT count(*) FROM (
            SELECT 1 FROM jobs
            WHERE status = 'pending' AND queue = :queue AND priority = :priority AND (created_at, id) {op} (:created_at, :id)
            {order}LIMIT :scan_limit) AS s) AS {name}"""
_POSITION = text(_POSITION_COUNTS + _SIDE.format(op="<", name="ahead", order="") + "," +
                 _SIDE.format(op=">", name="behind", order=""))

_SAME_PRIORITY_AHEAD = text(
    """
    SELECT count(*) FROM jobs
    WHERE status = 'pending' AND queue = :queue AND priority = :priority AND (created_at, id) < (:created_at, :id)
    """
)


def pending_position(session: Session, queue: str, priority: int, created_at: datetime, job_id: str) -> int:
    """1-based rank of a pending job in its queue's admission order (priority desc, then age).

    Jobs of a higher priority come from the counters (at most 100 rows); only the job's own priority
    level is counted, from whichever end is nearer, each side scanning at most SAME_PRIORITY_SCAN_LIMIT
    index entries: a fresh submit (the common call) has nobody behind it, the next job to start nobody
    ahead. Only a job deep inside one huge priority level costs a full count of the jobs ahead of it.
    """
    params = {"queue": queue, "priority": priority, "created_at": created_at, "id": job_id}
    row = session.execute(_POSITION, {**params, "scan_limit": SAME_PRIORITY_SCAN_LIMIT + 1}).one()
    higher, same, ahead, behind = int(row.higher), int(row.same), int(row.ahead), int(row.behind)
    # Counted in one snapshot with the counters, so either short side gives the exact rank.
    if ahead <= SAME_PRIORITY_SCAN_LIMIT:
        return higher + ahead + 1
    if behind <= SAME_PRIORITY_SCAN_LIMIT:
        return higher + max(same - behind, 1)
    ahead = int(session.scalar(_SAME_PRIORITY_AHEAD, params) or 0)
    return higher + ahead + 1


# In the index's order: a generic plan (app.domain.jobs prepares a submit's reads), blind to :created_at, then walks
# the admission order from the new job on rather than filtering another index's entries (or the whole table) for it.
_NEW_POSITION = text(_POSITION_COUNTS + _SIDE.format(op=">", name="behind", order="ORDER BY priority DESC, created_at, id "))


# For statements that read a new job's position among their own columns (parameters :queue, :priority,
# :created_at, :id, :scan_limit = SAME_PRIORITY_SCAN_LIMIT + 1).
NEW_POSITION_SQL = _NEW_POSITION.text


@functools.lru_cache(maxsize=8)
def _with_savepoint(savepoint: str) -> TextClause:
    """Built once per savepoint name: parsing the statement's text for its parameters costs a submit ~1%."""
    return text(f"SAVEPOINT {savepoint}; {_NEW_POSITION.text}")


def new_job_position(
    session: Session, queue: str, priority: int, created_at: datetime, job_id: str, *, savepoint: str | None = None
) -> int:
    """pending_position for a job just submitted: it is the newest of its priority level (or nearly), so only
    the jobs behind it are counted. pending_position counts both sides, and the side ahead of a new job
    in a deep level is a scan of SAME_PRIORITY_SCAN_LIMIT index entries: 16 ms of every submit with
    50,000 jobs waiting at its priority, against under 1 ms for this one.

    `savepoint`: set this savepoint first, in the same round trip (a submit's insert survives a failed read)."""
    params = {"queue": queue, "priority": priority, "created_at": created_at, "id": job_id}
    statement = _with_savepoint(savepoint) if savepoint else _NEW_POSITION
    row = session.execute(statement, {**params, "scan_limit": SAME_PRIORITY_SCAN_LIMIT + 1}).one()
    return new_position_from(session, row, queue, priority, created_at, job_id)


def new_position_from(session: Session, row: Any, queue: str, priority: int, created_at: datetime, job_id: str) -> int:
    """The position from a row of NEW_POSITION_SQL's columns (higher, same, behind), read in another statement's
    round trip (app.domain.jobs reads it with the submit's INSERT); a deep priority level costs one more read."""
    if int(row.behind) <= SAME_PRIORITY_SCAN_LIMIT:
        return int(row.higher) + max(int(row.same) - int(row.behind), 1)
    return pending_position(session, queue, priority, created_at, job_id)
