"""Follow streams (logs, events): one shared poller per process, per-caller and per-process caps, SSE semantics."""
from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis

from app.api.streams import KEY_PREFIX, StreamRefused, StreamSlots
from app.db import Database
from app.domain import logs
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token, wait_for
from tests.test_jobs_api import assert_error

STREAM_SETTINGS = {
    "auth_enabled": True,
    "streams_per_caller": 3,
    "streams_per_process": 5,
    "stream_keepalive_seconds": 0.2,  # a client that left is noticed at the next keep-alive write
    "stream_poll_seconds": 0.05,
}


@pytest.fixture
def serve(settings: Settings, database: Database) -> Iterator[Any]:
    """serve(**setting overrides) -> an API server of its own (its own stream hub and slots)."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(settings.with_overrides(**{**STREAM_SETTINGS, **overrides}))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def as_user(server: LiveServer, sub: str) -> ApiClient:
    return ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub)}"})


class Follower:
    """An open follow stream read event by event (comments skipped)."""

    def __init__(self, client: ApiClient, job_id: str, kind: str = "logs", last_event_id: str | None = None, **params: str) -> None:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.response = client.http.get(
            client.url(f"/jobs/{job_id}/{kind}"), params={"follow": "true", **params}, headers=headers, stream=True, timeout=30
        )
        self.lines = self.response.iter_lines(decode_unicode=True) if self.response.status_code == 200 else iter(())

    def next_event(self) -> dict[str, str]:
        event: dict[str, str] = {}
        for raw in self.lines:
            if raw.startswith(":"):
                continue
            if raw:
                key, _, value = raw.partition(": ")
                event[key] = value
            elif event:
                return event
        return event

    def events_until_end(self) -> list[dict[str, str]]:
        events = []
        while True:
            event = self.next_event()
            events.append(event)
            if not event or event.get("event") == "end":
                return events

    def close(self) -> None:
        self.response.close()


def append(database: Database, job_id: str, *lines: str) -> None:
    now = datetime.now(timezone.utc)
    with database.session() as s:
        logs.append(s, job_id, 0, [(now, "stdout", 0, line) for line in lines])


def test_streams_deliver_rows_to_every_follower_end_with_the_job_and_resume(serve, database: Database) -> None:
    server = serve()
    alice = as_user(server, "alice")
    job = alice.submit()
    other = alice.submit()
    append(database, job["id"], "before-1", "before-2")
    first = Follower(alice, job["id"], timestamps="false")
    second = Follower(alice, job["id"], timestamps="false", tail="1")
    elsewhere = Follower(alice, other["id"], timestamps="false")
    assert [first.next_event()["data"], first.next_event()["data"]] == ["before-1", "before-2"]
    assert second.next_event()["data"] == "before-2"
    append(database, job["id"], "live-1", "live-2")
    received = [first.next_event(), first.next_event()]
    assert [e["data"] for e in received] == ["live-1", "live-2"]
    assert [second.next_event()["data"], second.next_event()["data"]] == ["live-1", "live-2"]
    assert int(received[0]["id"]) < int(received[1]["id"])

    assert alice.delete(f"/jobs/{job['id']}").status_code == 200
    assert first.events_until_end()[-1] == {"event": "end", "data": "cancelled"}
    assert second.events_until_end()[-1] == {"event": "end", "data": "cancelled"}
    # Resume after live-1: only live-2 is left, then the end.
    resumed = Follower(alice, job["id"], last_event_id=received[0]["id"], timestamps="false").events_until_end()
    assert [e.get("data") for e in resumed] == ["live-2", "cancelled"]
    # The other job's follower saw none of it and is still open.
    append(database, other["id"], "mine")
    assert elsewhere.next_event()["data"] == "mine"
    for follower in (first, second, elsewhere):
        follower.close()


def test_followers_share_one_poller_instead_of_holding_a_connection_each(serve, database: Database) -> None:
    server = serve(auth_enabled=False, streams_per_caller=100, streams_per_process=100)
    client = ApiClient(server.url)
    job = client.submit()
    followers = [Follower(client, job["id"], kind="events" if i % 2 else "logs") for i in range(40)]
    for follower in followers:
        assert follower.response.status_code == 200
    engine = server.app.extensions["jobservice.database"].engine
    # The old code held a pooled connection per follower (40 > the pool's 10 + 20 overflow).
    wait_for(lambda: len(server.app.extensions["jobservice.streams"].hub) == 40, 10, message="40 subscriptions")
    assert engine.pool.checkedout() <= 2
    assert client.get("/jobs/", timeout=10).status_code == 200
    append(database, job["id"], "to-all")
    for follower in followers[::2]:
        assert follower.next_event()["data"].endswith("to-all")
    for follower in followers:
        follower.close()


def test_a_caller_beyond_its_stream_cap_gets_429_and_slots_come_back_when_streams_end(serve) -> None:
    server = serve()
    alice, bob, carol = (as_user(server, name) for name in ("alice", "bob", "carol"))
    job = alice.submit()
    bobs = bob.submit()
    opened = [Follower(alice, job["id"], kind=kind) for kind in ("logs", "events", "logs")]
    assert all(f.response.status_code == 200 for f in opened)

    refused = alice.get(f"/jobs/{job['id']}/events", params={"follow": "true"})
    error = assert_error(refused, 429, "RATE_LIMITED")
    assert "3 concurrent streams" in error["message"]
    assert int(refused.headers["Retry-After"]) > 0
    # Plain reads are not streams, and other callers have slots of their own.
    assert alice.get(f"/jobs/{job['id']}/logs").status_code == 200
    bobs_streams = [Follower(bob, bobs["id"]), Follower(bob, bobs["id"])]
    assert all(f.response.status_code == 200 for f in bobs_streams)
    # Five streams fill this process, whoever asks next.
    full = carol.get(f"/jobs/{carol.submit()['id']}/logs", params={"follow": "true"})
    assert_error(full, 503, "SERVICE_UNAVAILABLE")
    assert full.headers["Retry-After"]

    # The client closes a stream: its slot comes back (noticed at the next keep-alive).
    opened.pop().close()
    again = wait_for(lambda: (f := Follower(alice, job["id"])).response.status_code == 200 and f, 10, message="a freed slot")
    opened.append(again)
    # The job ends: every stream ends with it and gives its slot back.
    assert alice.delete(f"/jobs/{job['id']}").status_code == 200
    for follower in opened:
        assert follower.events_until_end()[-1] == {"event": "end", "data": "cancelled"}
        follower.close()
    late = [Follower(alice, job["id"], kind="events") for _ in range(3)]
    assert [f.events_until_end()[-1]["data"] for f in late] == ["cancelled"] * 3
    slots = server.app.extensions["jobservice.streams"].slots
    wait_for(lambda: len(slots) == 2, 10, message="only bob's two slots held")
    for follower in bobs_streams:
        follower.close()


def test_a_stream_ends_after_its_maximum_duration(serve) -> None:
    server = serve(stream_max_seconds=0.5)
    alice = as_user(server, "alice")
    job = alice.submit()
    follower = Follower(alice, job["id"], kind="events")
    events = follower.events_until_end()
    assert [e["data"] for e in events[:-1]] and events[-1] == {}  # the timeline so far, then closed without `end`
    assert alice.get(f"/jobs/{job['id']}").json()["status"] == "pending"


def test_slots_of_a_process_that_died_expire_with_their_lease(settings: Settings, database: Database) -> None:
    config = settings.with_overrides(streams_per_caller=2, streams_per_process=10, stream_slot_lease_seconds=1.0)
    dead, alive = StreamSlots(config), StreamSlots(config)
    dead.acquire("sub:alice")
    dead.acquire("sub:alice")  # ... and the process dies: no release, no renewal
    with pytest.raises(StreamRefused) as refused:
        alive.acquire("sub:alice")
    assert refused.value.status == 429
    slot = wait_for(lambda: _try(alive, "sub:alice"), 10, message="the dead process's slots to expire")
    # A live process renews its leases, so its slots never expire under it.
    time.sleep(0.1)
    alive._renewed_at = 0.0
    alive.renew_if_due()
    client = redis.Redis.from_url(settings.redis_url or "")
    assert client.zscore(KEY_PREFIX + "sub:alice", slot) > time.time()
    alive.release(slot)
    assert client.zcard(KEY_PREFIX + "sub:alice") == 0
    client.close()


def _try(slots: StreamSlots, caller: str) -> str | None:
    try:
        return slots.acquire(caller)
    except StreamRefused:
        return None


def test_stream_ids_that_are_not_row_ids_are_refused_in_the_envelope(serve, database: Database) -> None:
    server = serve(streams_per_caller=10)
    alice = as_user(server, "alice")
    job = alice.submit()
    for bogus in ("-1", "1e3", "\u00b2", "9" * 40):
        follower = Follower(alice, job["id"], kind="events", last_event_id=bogus)
        assert follower.response.status_code == 400, bogus
        assert follower.response.json()["error"]["details"][0]["field"] == "Last-Event-ID"
        follower.close()
    follower = Follower(alice, job["id"], kind="events", last_event_id="0")
    assert follower.response.status_code == 200
    assert follower.next_event()["data"]  # the submit event, from the start
    follower.close()


def test_every_row_of_a_long_log_is_out_before_the_end(serve, database: Database) -> None:
    server = serve()
    alice = as_user(server, "alice")
    job = alice.submit()
    lines = [f"line {i}" for i in range(2500)]  # more than one tick's page (ROWS_PER_TICK) per follower
    append(database, job["id"], *lines)
    assert alice.delete(f"/jobs/{job['id']}").status_code == 200
    events = Follower(alice, job["id"], last_event_id="0", timestamps="false").events_until_end()
    assert [e["data"] for e in events[:-1]] == lines
    assert events[-1] == {"event": "end", "data": "cancelled"}
    tail = Follower(alice, job["id"], kind="logs", tail="3", timestamps="false").events_until_end()
    assert [e["data"] for e in tail] == lines[-3:] + ["cancelled"]
