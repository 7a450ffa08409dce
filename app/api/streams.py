"""Follow streams that cost the API next to nothing while they wait.

One `StreamHub` per API process polls PostgreSQL for every followed job at once (one status query and one
query per feed per tick, whatever the number of followers) and hands the new rows to each follower's
queue; a follower only waits on its queue. Under gunicorn's gevent worker (config/gunicorn.py) a follower
is a greenlet, not a thread, so a thousand of them leave the request pool free for everything else.

`StreamSlots` bounds how many streams a caller holds across every API process (a Redis sorted set per
caller of stream ids scored by lease expiry, renewed by the hub while the stream lives, so a process
that dies without cleaning up frees its slots within one lease) and how many one process holds at all.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis
from flask import Flask
from sqlalchemy.orm import Session

from app.db import Database
from app.domain import logs, timeline
from app.domain.states import TERMINAL, JobStatus
from config import Settings

log = logging.getLogger(__name__)

Row = TypeVar("Row")
KEY_PREFIX = "jobservice:streams:"
REDIS_TIMEOUT_SECONDS = 1.0
RETRY_AFTER_SECONDS = 5
ROWS_PER_TICK = 1000  # per job and cursor: bounds one tick's work and one follower's queued batch
WARN_EVERY_SECONDS = 60.0


@dataclass(frozen=True)
class Feed(Generic[Row]):
    """What a stream follows: rows of a job, fetched for many (job id, last row id) cursors at once."""

    name: str
    fetch_many: Callable[[Session, Sequence[tuple[str, int]], int], dict[tuple[str, int], list[Row]]]
    row_id: Callable[[Row], int]


LOG_LINES: Feed[logs.StoredLine] = Feed("logs", logs.after_many, lambda line: line.id)
EVENTS: Feed[timeline.Event] = Feed("events", timeline.events_many, lambda event: event.id)


@dataclass
class Batch:
    rows: list[Any]
    end_status: str | None = None  # the job has ended and every row is out: `event: end`
    gone: bool = False  # the job no longer exists


@dataclass(eq=False)
class Subscription:
    feed: Feed[Any]
    job_id: str
    cursor: int  # the last row id handed to this follower (written by the hub only)
    batches: queue.Queue[Batch] = field(default_factory=queue.Queue)
    done: bool = False

    def next(self, timeout: float) -> Batch | None:
        try:
            return self.batches.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None


class StreamHub:
    """One poller per process; started on the first follower, idle (no queries) while nobody follows."""

    def __init__(self, database: Database, poll_seconds: float, on_tick: Callable[[], None] = lambda: None) -> None:
        self.database = database
        self.poll_seconds = poll_seconds
        self.on_tick = on_tick
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def subscribe(self, feed: Feed[Any], job_id: str, after_id: int) -> Subscription:
        subscription = Subscription(feed, job_id, after_id)
        with self._lock:
            self._subscriptions.add(subscription)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stream-hub", daemon=True)
                self._thread.start()
        self._wake.set()  # a new follower gets what exists at once, not one period later
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def __len__(self) -> int:
        return len(self._subscriptions)

    def _run(self) -> None:
        failures = 0
        while True:
            self._wake.wait(self.poll_seconds * (2 ** min(failures, 5)))
            self._wake.clear()
            try:
                self.on_tick()
                self.tick()
                failures = 0
            except Exception:  # noqa: BLE001 - the database may be away; followers keep their keep-alives
                failures += 1
                if failures == 1:
                    log.exception("stream hub tick failed; retrying with backoff")

    def tick(self) -> None:
        """Fetch new rows for every follower that has taken its last batch, and hand them out."""
        with self._lock:
            # A follower still writing its last batch waits for the next tick: one batch queued at most.
            ready = [s for s in self._subscriptions if not s.done and s.batches.empty()]
        if not ready:
            return
        by_feed: dict[str, tuple[Feed[Any], set[tuple[str, int]]]] = {}
        for s in ready:
            by_feed.setdefault(s.feed.name, (s.feed, set()))[1].add((s.job_id, s.cursor))
        with self.database.session() as session:
            # Statuses first: rows written before a job ended are then surely among the rows read after.
            statuses = timeline.statuses(session, {s.job_id for s in ready})
            fetched = {name: feed.fetch_many(session, sorted(cursors), ROWS_PER_TICK) for name, (feed, cursors) in by_feed.items()}
            session.rollback()  # no transaction held open between ticks
        for s in ready:
            status = statuses.get(s.job_id)
            if status is None:
                s.done = True
                s.batches.put(Batch([], gone=True))
                continue
            rows = fetched[s.feed.name].get((s.job_id, s.cursor), [])
            ended = len(rows) < ROWS_PER_TICK and JobStatus(status) in TERMINAL
            if rows:
                s.cursor = s.feed.row_id(rows[-1])
            if rows or ended:
                s.done = ended
                s.batches.put(Batch(rows, status if ended else None))


class StreamRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# KEYS[1]: the caller's set. ARGV: stream id, cap, lease seconds. Redis' clock, so hosts' skew does not matter.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 1)
return 1
"""
# KEYS[1]: the caller's set. ARGV: lease seconds, then the stream ids this process still holds.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1])) + 1)
return 1
"""


class StreamSlots:
    """Concurrent streams per caller (all processes, Redis) and per process (memory)."""

    def __init__(self, settings: Settings) -> None:
        self.per_caller = settings.streams_per_caller
        self.per_process = settings.streams_per_process
        self.lease_seconds = settings.stream_slot_lease_seconds
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # stream id -> caller key
        self._renewed_at = 0.0
        self._warned_at = -math.inf
        self._redis: redis.Redis | None = (
            redis.Redis.from_url(settings.redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
            if settings.redis_url
            else None
        )
        self._acquire = self._redis.register_script(_ACQUIRE) if self._redis else None
        self._renew = self._redis.register_script(_RENEW) if self._redis else None

    def acquire(self, caller: str) -> str:
        """A slot for one more stream of `caller`, or StreamRefused (429 over the caller's cap, 503 over the process's)."""
        stream_id = uuid.uuid4().hex
        with self._lock:
            if len(self._held) >= self.per_process:
                raise StreamRefused(503, f"This API process serves its maximum of {self.per_process} streams; retry shortly")
            local = sum(1 for held_by in self._held.values() if held_by == caller)
            self._held[stream_id] = caller  # reserved now so that concurrent requests cannot overshoot the process cap
        granted = self._grant(caller, stream_id, local)
        if not granted:
            with self._lock:
                self._held.pop(stream_id, None)
            raise StreamRefused(429, f"At most {self.per_caller} concurrent streams per caller; close one or retry later")
        return stream_id

    def _grant(self, caller: str, stream_id: str, local: int) -> bool:
        if self._acquire is not None:
            try:
                return bool(self._acquire(keys=[KEY_PREFIX + caller], args=[stream_id, self.per_caller, self.lease_seconds]))
            except redis.RedisError as exc:
                self._warn(f"stream slots counted per process while Redis is unavailable: {exc}")
        return local < self.per_caller

    def release(self, stream_id: str) -> None:
        with self._lock:
            caller = self._held.pop(stream_id, None)
        if caller is None or self._redis is None:
            return
        try:
            self._redis.zrem(KEY_PREFIX + caller, stream_id)
        except redis.RedisError as exc:  # the lease frees it
            self._warn(f"stream slot not released, it expires with its lease: {exc}")

    def renew_if_due(self) -> None:
        """Push the lease of every stream this process holds forward, every third of a lease."""
        now = time.monotonic()
        if self._renew is None or now - self._renewed_at < self.lease_seconds / 3:
            return
        self._renewed_at = now
        with self._lock:
            by_caller: dict[str, list[str]] = {}
            for stream_id, caller in self._held.items():
                by_caller.setdefault(caller, []).append(stream_id)
        if not by_caller:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)  # type: ignore[union-attr]
            for caller, ids in by_caller.items():
                self._renew(keys=[KEY_PREFIX + caller], args=[self.lease_seconds, *ids], client=pipe)
            pipe.execute()
        except redis.RedisError as exc:
            self._warn(f"stream slot leases not renewed: {exc}")

    def __len__(self) -> int:
        return len(self._held)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning(message)


class Streams:
    """The process's hub and slots, kept in app.extensions."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.slots = StreamSlots(settings)
        self.hub = StreamHub(database, settings.stream_poll_seconds, on_tick=self.slots.renew_if_due)

    def open(self, caller: str, feed: Feed[Any], job_id: str) -> "Stream":
        return Stream(self, self.slots.acquire(caller), feed, job_id)


class Stream:
    """One follower: its slot, then its subscription; `close()` gives both back, whatever state it is in."""

    def __init__(self, streams: Streams, slot: str, feed: Feed[Any], job_id: str) -> None:
        self.streams = streams
        self.slot = slot
        self.feed = feed
        self.job_id = job_id
        self.subscription: Subscription | None = None
        self.closed = False

    def subscribe(self, after_id: int) -> Subscription:
        self.subscription = self.streams.hub.subscribe(self.feed, self.job_id, after_id)
        return self.subscription

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.subscription is not None:
            self.streams.hub.unsubscribe(self.subscription)
        self.streams.slots.release(self.slot)


def register(app: Flask) -> None:
    app.extensions["jobservice.streams"] = Streams(app.config["JOBSERVICE_SETTINGS"], app.extensions["jobservice.database"])
