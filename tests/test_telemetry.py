"""The submit-latency histogram: observed off the request path, shared by every process through Redis."""
from __future__ import annotations

import socket

import redis

from app.telemetry import RedisHistogram, redis_client
from config import Settings
from tests.conftest import wait_for

BUCKETS = (0.01, 0.1, 1.0)


class _Running:
    def is_alive(self) -> bool:
        return True


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when this returns: nothing listens there


def test_observations_reach_every_process_without_a_redis_call_per_observation(settings: Settings) -> None:
    name = "test_submit_latency_seconds"
    client = redis_client(settings.redis_url or "")
    client.delete(f"jobservice:metrics:{name}")
    calls: list[str] = []
    observer = RedisHistogram(client, name, BUCKETS)
    original = observer.client.pipeline
    observer.client.pipeline = lambda *a, **k: calls.append("pipeline") or original(*a, **k)  # type: ignore[method-assign]
    for value in (0.005, 0.05, 0.05, 5.0):
        observer.observe(value)
    assert calls == []  # nothing sent to Redis on the request path
    other_process = RedisHistogram(redis_client(settings.redis_url or ""), name, BUCKETS)  # another API process's view
    wait_for(lambda: other_process.read()[2] == 4, 10, interval=0.05, message="the flush of 4 observations")
    buckets, total, count = other_process.read()
    assert buckets == [("0.01", 1.0), ("0.1", 3.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert abs(total - 5.105) < 1e-9 and count == 4
    assert len(calls) == 1  # the four in one MULTI


def test_observations_wait_for_redis_when_it_is_down(settings: Settings) -> None:
    name = "test_submit_latency_down_seconds"
    up = redis_client(settings.redis_url or "")
    up.delete(f"jobservice:metrics:{name}")
    histogram = RedisHistogram(redis.Redis(port=closed_port(), socket_timeout=0.2, socket_connect_timeout=0.2), name, BUCKETS)
    histogram._flusher = _Running()  # type: ignore[assignment]  # flushed by hand below: no thread
    histogram.observe(0.05)
    histogram.flush()  # Redis down: kept, not lost
    histogram.observe(0.5)
    histogram.client = up  # Redis is back
    histogram.flush()
    buckets, total, count = RedisHistogram(up, name, BUCKETS).read()
    assert count == 2 and buckets[-1] == ("+Inf", 2.0) and buckets[1] == ("0.1", 1.0)
