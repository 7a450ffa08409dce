"""Metric state shared by every process of the service, kept in Redis.

A Prometheus client library keeps counters in the memory of the process that observes them, so
with several API processes (or hosts) each scrape would see one process's share. Here whichever
process observes adds to a Redis hash, and any process's /metrics reads the sums. Only what the
database cannot tell is kept here: the API's own request time of POST /jobs/. Everything about
jobs (dispatch latency, executions by outcome) is derived from the database at scrape time.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "jobservice:metrics:"
# Prometheus' default buckets plus finer steps where an API call normally lands.
SUBMIT_LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REDIS_TIMEOUT_SECONDS = 0.25  # an observation must never slow a submit down by much
WARN_EVERY_SECONDS = 60.0


FLUSH_SECONDS = 0.25  # observations reach Redis (and every process's scrape) within this


class RedisHistogram:
    """A Prometheus-style histogram whose buckets, sum and count live in one Redis hash.

    `observe` only adds to this process's tally; a thread of its own (started on first use, so one per
    forked server process) adds the tally to Redis every FLUSH_SECONDS in one MULTI. A Redis round trip
    per submit was about 7% of a POST /jobs/'s CPU. What a process observed in its last FLUSH_SECONDS is
    lost if it dies: a latency histogram may miss that much, nothing else depends on it.
    """

    def __init__(self, client: redis.Redis, name: str, buckets: tuple[float, ...]) -> None:
        self.client = client
        self.key = KEY_PREFIX + name
        self.buckets = tuple(sorted(buckets))
        self._last_warning = 0.0
        self._lock = threading.Lock()
        self._tally: dict[str, int] = {}
        self._sum = 0.0
        self._count = 0
        self._flusher: threading.Thread | None = None

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)  # the first bucket whose bound is >= value
        field = f"le:{self.buckets[index]!r}" if index < len(self.buckets) else "le:+Inf"
        with self._lock:
            self._tally[field] = self._tally.get(field, 0) + 1
            self._sum += value
            self._count += 1
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_forever, name=f"flush-{self.key}", daemon=True)
                self._flusher.start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        """Add this process's tally to Redis (kept for the next try if Redis does not answer)."""
        with self._lock:
            tally, total, count = self._tally, self._sum, self._count
            self._tally, self._sum, self._count = {}, 0.0, 0
        if not count:
            return
        try:
            pipe = self.client.pipeline(transaction=True)  # MULTI: a scrape never sees a half-counted one
            for field, n in tally.items():
                pipe.hincrby(self.key, field, n)
            pipe.hincrbyfloat(self.key, "sum", total)
            pipe.hincrby(self.key, "count", count)
            pipe.execute()
        except redis.RedisError as exc:
            with self._lock:  # not counted: owed to the next flush
                for field, n in tally.items():
                    self._tally[field] = self._tally.get(field, 0) + n
                self._sum += total
                self._count += count
            now = time.monotonic()
            if now - self._last_warning > WARN_EVERY_SECONDS:  # Redis down: say so, not on every request
                self._last_warning = now
                log.warning("could not record %s in Redis: %s", self.key, exc)

    def read(self) -> tuple[list[tuple[str, float]], float, int]:
        """(cumulative buckets as (le, count) ending with +Inf, sum, count); raises RedisError."""
        self.flush()  # what this process observed is in its own scrape at once
        raw = {k.decode(): v.decode() for k, v in self.client.hgetall(self.key).items()}
        cumulative, running = [], 0
        for bound in self.buckets:
            running += int(raw.get(f"le:{bound!r}", 0))
            cumulative.append((_le(bound), float(running)))
        running += int(raw.get("le:+Inf", 0))
        cumulative.append(("+Inf", float(running)))
        return cumulative, float(raw.get("sum", 0.0)), int(raw.get("count", 0))


def _le(bound: float) -> str:
    return repr(float(bound))


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
