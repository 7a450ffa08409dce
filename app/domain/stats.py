"""Queue and system statistics, computed from what really happened: the jobs table, its counters and
the event roll-ups of migration 0002_observability (see app.domain.counters).

Every answer costs a bounded amount of work whatever the backlog: counts come from counters, the
oldest pending job and a page of the backlog from partial indexes (keyset pagination, never OFFSET),
windowed figures from per-minute and per-hour roll-ups (at most a few thousand rows for 24 h).

Definitions (the README's "Observability" section repeats them):
- depth: pending jobs (including those waiting out a retry backoff); processing: running jobs;
  queued: admitted jobs waiting for their worker to start them.
- oldest_job_age_seconds: now minus the backlog entry (submit, or latest return to pending) of the
  queue's longest-waiting pending job; null when the queue has no pending job.
- wait: backlog entry -> running, per attempt; dispatch: submit -> first running, per job;
  execution: running -> end of that attempt, whatever the outcome (a retry included).
- windows ("last hour", "last 24 h") are whole minutes: from the start of the minute the window's
  start falls in, up to now; rates divide by that exact span. Percentiles come from hourly
  histograms, so theirs starts at the top of that hour (24 to 25 hours).
- throughput counts jobs that reached succeeded or failed (a cancellation is not work done).
- peak_jobs_per_second: the busiest minute of the last 24 h (its finished jobs / 60), or the
  trailing minute's rate when that is higher.
- percentiles come from histograms whose buckets are 1/8 of a power of two wide: the value reported
  is the mean of the observations in the bucket holding the percentile's rank (nearest rank), so it
  is within about 9% of the exact value, usually much closer.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import Text

from app.domain import capacity, counters
from app.domain.errors import InvalidRequest, NotFound
from app.domain.jobs import utcnow
from app.domain.states import JobStatus
from config import QueueConfig, Settings

HOUR = timedelta(hours=1)
DAY = timedelta(hours=24)
MINUTE = timedelta(minutes=1)
BUCKETS_PER_OCTAVE = 8  # must match jobservice_histogram_bucket() in the migration
FINISHED_STATUSES = ("succeeded", "failed")


# --- histograms ------------------------------------------------------------------------------------


@dataclass
class Histogram:
    """Observations grouped in log buckets: bucket b holds values in [2^(b/8), 2^((b+1)/8))."""

    buckets: dict[int, tuple[int, float]] = field(default_factory=dict)  # bucket -> (count, sum)

    def add(self, bucket: int, count: int, total: float) -> None:
        old_count, old_total = self.buckets.get(bucket, (0, 0.0))
        self.buckets[bucket] = (old_count + count, old_total + total)

    @property
    def count(self) -> int:
        return sum(c for c, _ in self.buckets.values())

    @property
    def total(self) -> float:
        return sum(t for _, t in self.buckets.values())

    def mean(self) -> float | None:
        n = self.count
        return self.total / n if n else None

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile (q in 0..1), reported as the mean of the bucket that holds it."""
        n = self.count
        if not n:
            return None
        rank = max(1, math.ceil(q * n))
        seen = 0
        for bucket in sorted(self.buckets):
            count, total = self.buckets[bucket]
            seen += count
            if seen >= rank:
                return total / count if count else bucket_lower_bound(bucket)
        return None  # pragma: no cover - rank <= n

    def cumulative_below(self, bound: float) -> int:
        """Observations below `bound`; exact when bound is a power of two (a bucket boundary)."""
        limit = math.floor(BUCKETS_PER_OCTAVE * math.log2(bound) + 1e-9)
        return sum(c for b, (c, _) in self.buckets.items() if b < limit)


def bucket_lower_bound(bucket: int) -> float:
    return 2.0 ** (bucket / BUCKETS_PER_OCTAVE)


# --- windows over the roll-ups -----------------------------------------------------------------------


def _floor_minute(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(second=0, microsecond=0)


def _floor_hour(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class Window:
    """[since, now]: per-minute sums up to the first whole hour, hourly sums from there on.

    The hourly row of the current hour is folded as it goes, so the end of the window is exact;
    histograms exist per hour only, so percentiles cover [hour_since, now] (up to an hour more).
    """

    since: datetime  # start of the minute the window starts in
    now: datetime
    full_hours_from: datetime

    @classmethod
    def last(cls, length: timedelta, now: datetime) -> "Window":
        since = _floor_minute(now - length)
        hour = _floor_hour(since)
        return cls(since, now, hour if hour == since else hour + HOUR)

    @property
    def hour_since(self) -> datetime:
        return _floor_hour(self.since)

    @property
    def seconds(self) -> float:
        return max((self.now - self.since).total_seconds(), 1.0)


def _sums_query(queue_filter: bool) -> str:
    q = "AND queue = :queue" if queue_filter else ""
    return f"""
    SELECT metric, label, sum(count)::bigint AS count, sum(total) AS total FROM (
        SELECT metric, label, count, total FROM job_stats
        WHERE span = 'minute' AND period_start >= :since AND period_start < :full_from {q}
        UNION ALL
        SELECT metric, label, count, total FROM job_stats WHERE span = 'hour' AND period_start >= :full_from {q}
        UNION ALL
        SELECT metric, label, count, total FROM job_stats_deltas WHERE minute >= :since {q}
    ) AS s
    GROUP BY metric, label
    """


# Hourly histograms are fleet-wide (queue and label '', see counters._FOLD_STATS).
_HISTOGRAMS_QUERY = """
    SELECT metric, bucket, sum(count)::bigint AS count, sum(total) AS total FROM (
        SELECT metric, bucket, count, total FROM job_stat_buckets
        WHERE span = 'hour' AND period_start >= :since AND metric IN :metrics AND queue = '' AND label = ''
        UNION ALL
        SELECT metric, bucket, count, total FROM job_stats_deltas WHERE minute >= :since AND metric IN :metrics
    ) AS s
    GROUP BY metric, bucket
"""


def _expanding(query: str) -> TextClause:
    return text(query).bindparams(bindparam("metrics", expanding=True))


_SUMS_ALL = text(_sums_query(queue_filter=False))
_SUMS_QUEUE = text(_sums_query(queue_filter=True))
_HISTOGRAMS = _expanding(_HISTOGRAMS_QUERY)


@dataclass
class Rollup:
    """Roll-up figures by (metric, label): counts and sums, and histograms of the timed metrics."""

    sums: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    histograms: dict[tuple[str, str], Histogram] = field(default_factory=lambda: defaultdict(Histogram))

    def add_sum(self, metric: str, label: str, count: int, total: float) -> None:
        old_count, old_total = self.sums.get((metric, label), (0, 0.0))
        self.sums[(metric, label)] = (old_count + int(count), old_total + float(total or 0.0))

    def add_bucket(self, metric: str, label: str, bucket: int, count: int, total: float) -> None:
        self.histograms[(metric, label)].add(bucket, int(count), float(total or 0.0))

    def count(self, metric: str, labels: tuple[str, ...] | None = None) -> int:
        return sum(c for (m, label), (c, _) in self.sums.items() if m == metric and (labels is None or label in labels))

    def mean(self, metric: str) -> float | None:
        count = self.count(metric)
        total = sum(t for (m, _), (_, t) in self.sums.items() if m == metric)
        return total / count if count else None

    def merged(self, metric: str, labels: tuple[str, ...] | None = None) -> Histogram:
        out = Histogram()
        for (m, label), histogram in self.histograms.items():
            if m == metric and (labels is None or label in labels):
                for bucket, (count, total) in histogram.buckets.items():
                    out.add(bucket, count, total)
        return out


def window_sums(session: Session, window: Window, queue: str | None = None) -> Rollup:
    rollup = Rollup()
    params: dict[str, object] = {"since": window.since, "full_from": window.full_hours_from}
    if queue is not None:
        params["queue"] = queue
    for row in session.execute(_SUMS_QUEUE if queue is not None else _SUMS_ALL, params):
        rollup.add_sum(row.metric, row.label, row.count, row.total)
    return rollup


def window_histograms(session: Session, window: Window, rollup: Rollup, metrics: tuple[str, ...]) -> Rollup:
    """Adds the fleet-wide histograms of `metrics` over [window.hour_since, now] to `rollup`."""
    for row in session.execute(_HISTOGRAMS, {"since": window.hour_since, "metrics": list(metrics)}):
        rollup.add_bucket(row.metric, "", row.bucket, row.count, row.total)
    return rollup


_ALL_TIME_SUMS = text(
    """
    SELECT queue, metric, label, sum(count)::bigint AS count, sum(total) AS total FROM (
        SELECT queue, metric, label, count, total FROM job_stats WHERE span = 'total'
        UNION ALL
        SELECT queue, metric, label, count, total FROM job_stats_deltas
    ) AS s
    GROUP BY queue, metric, label
    """
)
_ALL_TIME_BUCKETS = _expanding(
    """
    SELECT queue, metric, label, bucket, sum(count)::bigint AS count, sum(total) AS total FROM (
        SELECT queue, metric, label, bucket, count, total FROM job_stat_buckets WHERE span = 'total'
        UNION ALL
        SELECT queue, metric, label, bucket, count, total FROM job_stats_deltas WHERE metric IN :metrics
    ) AS s
    GROUP BY queue, metric, label, bucket
    """
)


def all_time_rollups(session: Session) -> dict[str, Rollup]:
    """Every event since the counters began, per queue: what Prometheus counters and histograms need."""
    result: dict[str, Rollup] = defaultdict(Rollup)
    for row in session.execute(_ALL_TIME_SUMS):
        result[row.queue].add_sum(row.metric, row.label, row.count, row.total)
    for row in session.execute(_ALL_TIME_BUCKETS, {"metrics": list(counters.HISTOGRAM_METRICS)}):
        result[row.queue].add_bucket(row.metric, row.label, row.bucket, row.count, row.total)
    return dict(result)


# --- queues ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueSummary:
    name: str
    depth: int
    processing: int
    queued: int
    max_concurrency: int
    oldest_job_age_seconds: float | None


@dataclass(frozen=True)
class QueuesOverview:
    queues: list[QueueSummary]

    @property
    def total_pending(self) -> int:
        return sum(q.depth for q in self.queues)

    @property
    def total_processing(self) -> int:
        return sum(q.processing for q in self.queues)


_OLDEST_PENDING = text(
    """
    SELECT q.name, (SELECT min(j.pending_since) FROM jobs j WHERE j.status = 'pending' AND j.queue = q.name) AS oldest
    FROM unnest(:names) AS q(name)
    """
).bindparams(bindparam("names", type_=ARRAY(Text)))


def oldest_pending(session: Session, names: list[str]) -> dict[str, datetime | None]:
    return {name: oldest for name, oldest in session.execute(_OLDEST_PENDING, {"names": names})}


def _age(oldest: datetime | None, now: datetime) -> float | None:
    return None if oldest is None else round(max((now - oldest).total_seconds(), 0.0), 3)


def _summaries(session: Session, queues: tuple[QueueConfig, ...], now: datetime) -> list[QueueSummary]:
    counts = counters.counts_by_queue_and_status(session)
    oldest = oldest_pending(session, [q.name for q in queues])
    return [
        QueueSummary(
            name=q.name,
            depth=counts.get(q.name, {}).get(JobStatus.PENDING.value, 0),
            processing=counts.get(q.name, {}).get(JobStatus.RUNNING.value, 0),
            queued=counts.get(q.name, {}).get(JobStatus.QUEUED.value, 0),
            max_concurrency=q.max_concurrency,
            oldest_job_age_seconds=_age(oldest.get(q.name), now),
        )
        for q in queues
    ]


def queues_overview(session: Session, settings: Settings, now: datetime | None = None) -> QueuesOverview:
    return QueuesOverview(_summaries(session, settings.queues, now or utcnow()))


@dataclass(frozen=True)
class PendingEntry:
    id: str
    priority: int
    queued_at: datetime  # when it entered the backlog (submit, or its latest return to pending)
    created_at: datetime
    retry_at: datetime | None


@dataclass(frozen=True)
class QueueStats:
    jobs_processed_1h: int
    avg_wait_time_seconds: float | None
    avg_processing_time_seconds: float | None
    window_seconds: float


@dataclass(frozen=True)
class QueueDetail:
    summary: QueueSummary
    jobs: list[PendingEntry]
    next_cursor: str | None
    limit: int
    stats: QueueStats


def encode_cursor(entry: PendingEntry) -> str:
    raw = json.dumps([entry.priority, entry.created_at.isoformat(), entry.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        priority, created_at, job_id = json.loads(raw)
        parsed = datetime.fromisoformat(created_at)
        # bool is an int to Python but not to PostgreSQL; NUL cannot be a text parameter.
        if type(priority) is not int or not 0 <= priority <= 100 or parsed.tzinfo is None:
            raise ValueError("wrong types")
        if not isinstance(job_id, str) or not 0 < len(job_id) <= 128 or "\x00" in job_id:
            raise ValueError("wrong types")
        return priority, parsed, job_id
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            "Invalid pagination cursor", [{"field": "after", "message": "pass the `next` value of the previous page"}]
        ) from exc


_PENDING_COLUMNS = "id, priority, created_at, pending_since, not_before"
_PENDING_ORDER = "ORDER BY priority DESC, created_at, id"
_FIRST_PAGE = text(
    f"SELECT {_PENDING_COLUMNS} FROM jobs WHERE status = 'pending' AND queue = :queue {_PENDING_ORDER} LIMIT :n"
)
# Keyset continuation as two index range scans (rest of the cursor's priority, then lower ones):
# a single OR condition would make PostgreSQL walk the index from the start of the priority.
_NEXT_PAGE = text(
    f"""
    SELECT * FROM (
        (SELECT {_PENDING_COLUMNS} FROM jobs
         WHERE status = 'pending' AND queue = :queue AND priority = :priority AND (created_at, id) > (:created_at, :id)
         {_PENDING_ORDER} LIMIT :n)
        UNION ALL
        (SELECT {_PENDING_COLUMNS} FROM jobs
         WHERE status = 'pending' AND queue = :queue AND priority < :priority
         {_PENDING_ORDER} LIMIT :n)
    ) AS page
    {_PENDING_ORDER} LIMIT :n
    """
)


def pending_page(session: Session, queue: str, limit: int, after: str | None) -> tuple[list[PendingEntry], str | None]:
    """One page of a queue's backlog in admission order, and the cursor of the next page (None at the end)."""
    params: dict[str, object] = {"queue": queue, "n": limit + 1}
    if after:
        priority, created_at, job_id = decode_cursor(after)
        rows = session.execute(_NEXT_PAGE, {**params, "priority": priority, "created_at": created_at, "id": job_id})
    else:
        rows = session.execute(_FIRST_PAGE, params)
    entries = [PendingEntry(r.id, r.priority, r.pending_since, r.created_at, r.not_before) for r in rows]
    if len(entries) > limit:
        entries = entries[:limit]
        return entries, encode_cursor(entries[-1])
    return entries, None


def queue_stats(session: Session, queue: str, now: datetime | None = None) -> QueueStats:
    window = Window.last(HOUR, now or utcnow())
    rollup = window_sums(session, window, queue)
    return QueueStats(
        jobs_processed_1h=rollup.count("execution"),
        avg_wait_time_seconds=_round(rollup.mean("wait"), 3),
        avg_processing_time_seconds=_round(rollup.mean("execution"), 3),
        window_seconds=window.seconds,
    )


def queue_detail(
    session: Session, settings: Settings, name: str, *, limit: int = 50, after: str | None = None, now: datetime | None = None
) -> QueueDetail:
    queue = settings.queue_named(name)
    if queue is None:
        raise NotFound(f"Queue {name} not found")
    now = now or utcnow()
    summary = _summaries(session, (queue,), now)[0]
    jobs, next_cursor = pending_page(session, name, limit, after)
    return QueueDetail(summary, jobs, next_cursor, limit, queue_stats(session, name, now))


# --- system metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobTotals:
    total_submitted_24h: int
    total_completed_24h: int
    total_failed_24h: int
    success_rate: float | None


@dataclass(frozen=True)
class Latency:
    dispatch_p50_ms: float | None
    dispatch_p99_ms: float | None
    execution_p50_seconds: float | None
    execution_p99_seconds: float | None


@dataclass(frozen=True)
class Throughput:
    jobs_per_second: float
    peak_jobs_per_second: float


@dataclass(frozen=True)
class SystemMetrics:
    jobs: JobTotals
    latency: Latency
    throughput: Throughput


_FINISHED_SINCE = text(
    "SELECT count(*) FROM job_events WHERE to_status IN ('succeeded', 'failed') AND at > :since AND at <= :now"
)
_BUSIEST_MINUTE = text(
    """
    SELECT minute, sum(count)::bigint AS n FROM (
        SELECT period_start AS minute, count FROM job_stats
        WHERE span = 'minute' AND metric = 'finished' AND label IN ('succeeded', 'failed') AND period_start >= :since
        UNION ALL
        SELECT minute, count FROM job_stats_deltas
        WHERE metric = 'finished' AND label IN ('succeeded', 'failed') AND minute >= :since
    ) AS s
    GROUP BY minute ORDER BY n DESC LIMIT 1
    """
)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def finished_in_last(session: Session, seconds: float, now: datetime) -> int:
    """Jobs that reached succeeded/failed in the trailing `seconds`: exact, from the events index."""
    return int(session.scalar(_FINISHED_SINCE, {"since": now - timedelta(seconds=seconds), "now": now}) or 0)


def system_metrics(session: Session, now: datetime | None = None) -> SystemMetrics:
    now = now or utcnow()
    window = Window.last(DAY, now)
    rollup = window_histograms(session, window, window_sums(session, window), ("dispatch", "execution"))
    completed = rollup.count("finished", ("succeeded",))
    failed = rollup.count("finished", ("failed",))
    dispatch = rollup.merged("dispatch")
    execution = rollup.merged("execution")
    current = finished_in_last(session, 60, now) / 60.0
    busiest = session.execute(_BUSIEST_MINUTE, {"since": window.since}).first()
    peak = max(current, (busiest.n / 60.0) if busiest else 0.0)
    return SystemMetrics(
        jobs=JobTotals(
            total_submitted_24h=rollup.count("submitted"),
            total_completed_24h=completed,
            total_failed_24h=failed,
            success_rate=_round(completed / (completed + failed), 4) if completed + failed else None,
        ),
        latency=Latency(
            dispatch_p50_ms=_round(dispatch.percentile(0.50), 1),
            dispatch_p99_ms=_round(dispatch.percentile(0.99), 1),
            execution_p50_seconds=_round(execution.percentile(0.50), 3),
            execution_p99_seconds=_round(execution.percentile(0.99), 3),
        ),
        throughput=Throughput(jobs_per_second=round(current, 4), peak_jobs_per_second=round(peak, 4)),
    )


# --- the fleet (Prometheus gauges) -------------------------------------------------------------------


@dataclass(frozen=True)
class NodeHealth:
    cluster: str
    name: str
    heartbeat_age_seconds: float
    alive: bool


@dataclass(frozen=True)
class ClusterGpus:
    cluster: str
    used: int
    free: int


_NODES = text("SELECT cluster, name, heartbeat_at, ready FROM nodes ORDER BY cluster, name")


def node_health(session: Session, settings: Settings, now: datetime | None = None) -> list[NodeHealth]:
    now = now or utcnow()
    alive_since = capacity.node_alive_since(now, settings.node_lease_seconds)
    return [
        NodeHealth(r.cluster, r.name, max((now - r.heartbeat_at).total_seconds(), 0.0), bool(r.ready) and r.heartbeat_at >= alive_since)
        for r in session.execute(_NODES)
    ]


def gpus_by_cluster(session: Session, settings: Settings, now: datetime | None = None) -> list[ClusterGpus]:
    """GPUs of live nodes (the ones the scheduler places on), held by admitted jobs or free."""
    now = now or utcnow()
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for node in capacity.load_nodes(session, alive_since=capacity.node_alive_since(now, settings.node_lease_seconds)):
        free = len(node.free_gpus)
        totals[node.cluster][0] += len(node.gpu_indices) - free
        totals[node.cluster][1] += free
    return [ClusterGpus(cluster, used, free) for cluster, (used, free) in sorted(totals.items())]
