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
import time

import redis

log = logging.getLogger(__name__)

KEY_PREFIX = "jobservice:metrics:"
# Prometheus' default buckets plus finer steps where an API call normally lands.
SUBMIT_LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REDIS_TIMEOUT_SECONDS = 0.25  # an observation must never slow a submit down by much
WARN_EVERY_SECONDS = 60.0


class RedisHistogram:
    """A Prometheus-style histogram whose buckets, sum and count live in one Redis hash."""

    def __init__(self, client: redis.Redis, name: str, buckets: tuple[float, ...]) -> None:
        self.client = client
        self.key = KEY_PREFIX + name
        self.buckets = tuple(sorted(buckets))
        self._last_warning = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)  # the first bucket whose bound is >= value
        field = repr(self.buckets[index]) if index < len(self.buckets) else "+Inf"
        try:
            pipe = self.client.pipeline(transaction=True)  # MULTI: a scrape never sees a half-counted one
            pipe.hincrby(self.key, f"le:{field}", 1)
            pipe.hincrbyfloat(self.key, "sum", value)
            pipe.hincrby(self.key, "count", 1)
            pipe.execute()
        except redis.RedisError as exc:
            now = time.monotonic()
            if now - self._last_warning > WARN_EVERY_SECONDS:  # Redis down: say so, not on every request
                self._last_warning = now
                log.warning("could not record %s in Redis: %s", self.key, exc)

    def read(self) -> tuple[list[tuple[str, float]], float, int]:
        """(cumulative buckets as (le, count) ending with +Inf, sum, count); raises RedisError."""
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
