"""Batch submit, idempotency keys and dry run (issue 14), over real HTTP on real PostgreSQL and Redis."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from sqlalchemy import event, text

from app.api.schemas import GangSchema, JobCreateSchema, ResourcesSchema, RetryPolicySchema
from app.db import Database, transaction
from app.domain.callers import LOCAL_ADMIN
from app.domain import execution, idempotency
from app.domain import jobs as jobs_domain
from app.domain.jobs import SCHEDULER_CHANNEL, utcnow
from app.wakeup import SchedulerWaker
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token, wait_for
from tests.test_db_resilience import backend_pids
from tests.test_jobs_api import assert_error

JOB = {"job_type": "sweep", "command": ["true"], "priority": 10}


def writes_jobs(statement: str) -> bool:
    """A submit's INSERT of jobs and events: prepared once per database session, then executed by name."""
    return jobs_domain.INSERT.execute_sql.split("(")[0] in statement


@pytest.fixture
def serve(settings: Settings, database: Database) -> Iterator[Callable[..., LiveServer]]:
    """serve(**setting overrides) -> a LiveServer of its own."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(settings.with_overrides(**overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def as_user(server: LiveServer, sub: str) -> ApiClient:
    return ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub, 'jobs:read jobs:write')}"})


def count(database: Database, table: str) -> int:
    with database.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)


def register_node(database: Database, name: str = "node-a", slots: int = 2, cpu_millis: int = 4000) -> None:
    with database.session() as s:
        execution.register_node(s, cluster="local", name=name, gpu_indices=[], gpu_type=None, cpu_millis=cpu_millis,
                                memory_bytes=16 * 2**30, slots=slots)


# --- batch submit --------------------------------------------------------------------------------------------

def test_batch_creates_every_job_in_order_with_one_event_each(api: ApiClient, database: Database) -> None:
    bodies = [{**JOB, "config": {"i": i}} for i in range(5)] + [{**JOB, "priority": 90}]
    response = api.post("/jobs/batch", json={"jobs": bodies})
    assert response.status_code == 201, response.text
    created = response.json()["jobs"]
    assert len(created) == 6 and len({job["id"] for job in created}) == 6
    for job, body in zip(created, bodies):
        assert set(job) == {"id", "job_type", "priority", "status", "created_at", "queue_position"}
        assert job["priority"] == body["priority"] and job["status"] == "pending"
        detail = api.get(f"/jobs/{job['id']}").json()
        assert detail["config"] == body.get("config", {}) and detail["command"] == ["true"]
    # Same queue and priority: admitted in the batch's order, so positions 1..5; the priority-90 job has its own queue.
    assert [job["queue_position"] for job in created] == [1, 2, 3, 4, 5, 1]
    assert [api.get(f"/jobs/{job['id']}").json()["queue_position"] for job in created[:5]] == [1, 2, 3, 4, 5]
    with database.engine.connect() as conn:
        events = conn.execute(text("SELECT job_id, from_status, to_status, reason FROM job_events")).all()
    assert sorted(e.job_id for e in events) == sorted(job["id"] for job in created)
    assert {(e.from_status, e.to_status, e.reason) for e in events} == {(None, "pending", "submitted")}


def test_batch_writes_jobs_and_events_in_one_statement(live_server: LiveServer, api: ApiClient) -> None:
    engine = live_server.app.extensions["jobservice.database"].engine
    inserts: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if ("INSERT INTO" in statement and not statement.startswith("PREPARE")) or writes_jobs(statement):
            inserts.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        response = api.post("/jobs/batch", json={"jobs": [JOB] * 200})
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert response.status_code == 201, response.text
    assert len(inserts) == 1, inserts  # not one round trip per job (nor per table)
    assert writes_jobs(inserts[0])
    assert "INSERT INTO jobs" in jobs_domain.INSERT.prepare_sql and "INSERT INTO job_events" in jobs_domain.INSERT.prepare_sql


def test_batch_is_all_or_nothing_and_errors_name_the_item(api: ApiClient, database: Database) -> None:
    bodies = [JOB, JOB, {**JOB, "priority": 101}, JOB, {"job_type": "x"}]
    error = assert_error(api.post("/jobs/batch", json={"jobs": bodies}), 400, "VALIDATION_ERROR")
    fields = {d["field"] for d in error["details"]}
    assert "jobs.2.priority" in fields and "jobs.4.image" in fields
    assert count(database, "jobs") == 0 and count(database, "job_events") == 0


def test_batch_refuses_a_job_no_node_can_ever_run_by_its_index(api: ApiClient, database: Database) -> None:
    register_node(database, cpu_millis=2000)
    bodies = [JOB, {**JOB, "resources": {"cpu": "64"}}]
    error = assert_error(api.post("/jobs/batch", json={"jobs": bodies}), 400, "VALIDATION_ERROR")
    assert [d["field"] for d in error["details"]] == ["jobs.1.resources"]
    assert count(database, "jobs") == 0


@pytest.mark.parametrize("body", [{"jobs": []}, {"jobs": [JOB] * 4}, {"jobs": JOB}, {}, {"jobs": [JOB], "extra": 1}, [JOB]])
def test_batch_bounds_and_shape(serve: Callable[..., LiveServer], database: Database, body: Any) -> None:
    api = ApiClient(serve(max_batch_jobs=3).url)
    assert_error(api.post("/jobs/batch", json=body), 400, "VALIDATION_ERROR")
    assert count(database, "jobs") == 0


def test_batch_limit_is_documented_from_the_setting(serve: Callable[..., LiveServer]) -> None:
    document = ApiClient(serve(max_batch_jobs=7).url).get("/openapi.json").json()
    schema = document["components"]["schemas"]["JobBatchCreate"]["properties"]["jobs"]
    assert schema["maxItems"] == 7 and schema["minItems"] == 1


def test_rate_limit_counts_the_jobs_of_a_batch(serve: Callable[..., LiveServer], database: Database) -> None:
    server = serve(auth_enabled=True, ratelimit_enabled=True, ratelimit_submit="10/minute")
    alice = as_user(server, "alice")
    first = alice.post("/jobs/batch", json={"jobs": [JOB] * 6})
    assert first.status_code == 201, first.text
    assert first.headers["X-RateLimit-Limit"] == "10" and first.headers["X-RateLimit-Remaining"] == "4"
    single = alice.post("/jobs/", json=JOB)  # one counter for both ways to submit
    assert single.status_code == 201 and single.headers["X-RateLimit-Remaining"] == "3"
    assert_error(alice.post("/jobs/batch", json={"jobs": [JOB] * 4}), 429, "RATE_LIMITED")
    assert alice.post("/jobs/batch", json={"jobs": [JOB] * 3}).status_code == 201
    assert count(database, "jobs") == 10
    assert as_user(server, "bob").post("/jobs/batch", json={"jobs": [JOB] * 10}).status_code == 201  # per caller
    too_big = assert_error(as_user(server, "carol").post("/jobs/batch", json={"jobs": [JOB] * 11}), 429, "RATE_LIMITED")
    assert "send smaller batches" in too_big["message"]


# --- idempotency keys ---------------------------------------------------------------------------------------

def test_same_key_and_body_answers_the_first_answer_without_creating(api: ApiClient, database: Database) -> None:
    first = api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = api.post("/jobs/", json={"priority": 10, "command": ["true"], "job_type": "sweep"}, headers={"Idempotency-Key": "retry-1"})
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert count(database, "jobs") == 1 and count(database, "job_events") == 1


def test_same_key_with_another_body_or_endpoint_is_a_conflict(api: ApiClient, database: Database) -> None:
    assert api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "k"}).status_code == 201
    error = assert_error(api.post("/jobs/", json={**JOB, "priority": 11}, headers={"Idempotency-Key": "k"}), 409, "CONFLICT")
    assert error["details"][0]["field"] == "Idempotency-Key"
    assert_error(api.post("/jobs/batch", json={"jobs": [JOB]}, headers={"Idempotency-Key": "k"}), 409, "CONFLICT")
    assert count(database, "jobs") == 1


def test_batch_replay_answers_the_same_ids(api: ApiClient, database: Database) -> None:
    body = {"jobs": [JOB, {**JOB, "priority": 60}]}
    first = api.post("/jobs/batch", json=body, headers={"Idempotency-Key": "batch-7"})
    again = api.post("/jobs/batch", json=body, headers={"Idempotency-Key": "batch-7"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert count(database, "jobs") == 2


def test_keys_are_per_caller(serve: Callable[..., LiveServer], database: Database) -> None:
    server = serve(auth_enabled=True)
    alice = as_user(server, "alice").post("/jobs/", json=JOB, headers={"Idempotency-Key": "same"}).json()
    bob = as_user(server, "bob").post("/jobs/", json=JOB, headers={"Idempotency-Key": "same"}).json()
    assert alice["id"] != bob["id"] and count(database, "jobs") == 2


def test_an_expired_key_creates_again_and_the_purge_removes_only_expired_keys(api: ApiClient, database: Database) -> None:
    first = api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "old"}).json()
    api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "fresh"})
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'old'"))
    again = api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "old"})
    assert again.status_code == 201 and again.json()["id"] != first["id"] and "Idempotent-Replayed" not in again.headers
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = 'old'"))
    with database.session() as s:
        assert idempotency.purge_expired(s, utcnow()) == 1
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT key FROM idempotency_keys")).scalars().all() == ["fresh"]


def test_the_key_lives_for_the_configured_time(serve: Callable[..., LiveServer], database: Database) -> None:
    api = ApiClient(serve(idempotency_key_ttl_seconds=120).url)
    api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "ttl"})
    with database.engine.connect() as conn:
        lifetime = conn.execute(text("SELECT expires_at - created_at FROM idempotency_keys")).scalar()
    assert lifetime == timedelta(seconds=120)


def test_racing_requests_with_one_key_create_one_job(live_server: LiveServer, api: ApiClient, database: Database) -> None:
    """Every racer has read the key as new and inserted its job when they meet at the key's row: one wins."""
    answers: list[Any] = []
    with database.engine.connect() as conn:
        lock = conn.begin()
        conn.execute(text("LOCK TABLE idempotency_keys IN SHARE ROW EXCLUSIVE MODE"))  # blocks their INSERTs, not reads
        racers = [
            threading.Thread(target=lambda: answers.append(api.post("/jobs/", json=JOB, headers={"Idempotency-Key": "race"})))
            for _ in range(4)
        ]
        for racer in racers:
            racer.start()
        wait_for(lambda: len(backend_pids(database, "jobservice-api", waiting_on_lock=True, query_like="%idempotency_keys%")) == 4,
                 20, message="four submits waiting at the key")
        lock.rollback()
    for racer in racers:
        racer.join(30)
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sorted(a.headers.get("Idempotent-Replayed", "") for a in answers) == ["", "true", "true", "true"]
    assert count(database, "jobs") == 1 and count(database, "job_events") == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there"])
def test_the_key_header_is_bounded_and_checked(api: ApiClient, database: Database, key: str) -> None:
    error = assert_error(api.post("/jobs/", json=JOB, headers={"Idempotency-Key": key}), 400, "VALIDATION_ERROR")
    assert {d["field"] for d in error["details"]} == {"Idempotency-Key"}
    assert count(database, "jobs") == 0


def test_a_key_of_255_printable_characters_is_accepted(api: ApiClient) -> None:
    key = ("!~azAZ09" * 40)[:255]
    assert api.post("/jobs/", json=JOB, headers={"Idempotency-Key": key}).status_code == 201
    assert api.post("/jobs/", json=JOB, headers={"Idempotency-Key": key}).headers["Idempotent-Replayed"] == "true"


# --- dry run ------------------------------------------------------------------------------------------------

def test_dry_run_creates_nothing_and_says_why_it_would_wait(api: ApiClient, database: Database) -> None:
    api.submit(**JOB)
    response = api.post("/jobs/?dry_run=true", json=JOB, headers={"Idempotency-Key": "ignored"})
    assert response.status_code == 200, response.text
    preview = response.json()
    assert preview["dry_run"] is True and preview["fits_now"] is False
    assert preview["reason"] == "NO_NODES" and preview["queue"] == "default" and preview["queue_position"] == 2
    assert count(database, "jobs") == 1 and count(database, "job_events") == 1 and count(database, "idempotency_keys") == 0


def test_dry_run_of_a_batch_sees_the_batch_jobs_ahead(api: ApiClient, database: Database) -> None:
    register_node(database, slots=1)
    response = api.post("/jobs/batch?dry_run=true", json={"jobs": [JOB, JOB]})
    assert response.status_code == 200, response.text
    first, second = response.json()["jobs"]
    assert first["fits_now"] is True and first["reason"] == "WAITING_FOR_SCHEDULER" and first["queue_position"] == 1
    assert second["fits_now"] is False and second["reason"] == "NO_FREE_SLOTS" and second["queue_position"] == 2
    assert second["blocking"]["resource"] == "slots"
    assert count(database, "jobs") == 0 and count(database, "job_events") == 0


def test_dry_run_validates_like_a_submit(api: ApiClient, database: Database) -> None:
    register_node(database, cpu_millis=2000)
    error = assert_error(api.post("/jobs/?dry_run=true", json={**JOB, "resources": {"cpu": "64"}}), 400, "VALIDATION_ERROR")
    assert error["details"][0]["field"] == "resources"
    assert_error(api.post("/jobs/batch?dry_run=true", json={"jobs": [{**JOB, "priority": -1}]}), 400, "VALIDATION_ERROR")
    assert_error(api.post("/jobs/?dry_run=yes", json=JOB), 400, "VALIDATION_ERROR")
    assert api.post("/jobs/?dry_run=false", json=JOB).status_code == 201


# --- the scheduler is still woken, after the commit ---------------------------------------------------------

def test_a_submit_wakes_the_scheduler_after_its_commit(api: ApiClient, settings: Settings) -> None:
    listener = psycopg2.connect(settings.database_url)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    try:
        listener.cursor().execute(f"LISTEN {SCHEDULER_CHANNEL}")

        def notified() -> bool:
            listener.poll()
            return bool(listener.notifies)

        api.post("/jobs/batch", json={"jobs": [JOB] * 3})
        wait_for(notified, 10, interval=0.02, message="a NOTIFY after the batch")
        listener.notifies.clear()
        api.submit(**JOB)
        wait_for(notified, 10, interval=0.02, message="a NOTIFY after the submit")
    finally:
        listener.close()


def test_a_wake_up_survives_a_dropped_connection(api: ApiClient, settings: Settings, database: Database) -> None:
    listener = psycopg2.connect(settings.database_url)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    try:
        listener.cursor().execute(f"LISTEN {SCHEDULER_CHANNEL}")

        def notified() -> bool:
            listener.poll()
            return bool(listener.notifies)

        api.submit(**JOB)
        wait_for(notified, 10, interval=0.02, message="the first wake-up")
        for pid in backend_pids(database, "jobservice-api"):  # every API session, the waker's included
            with database.engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        listener.notifies.clear()
        api.submit(**JOB)
        wait_for(notified, 10, interval=0.02, message="a wake-up after the API's sessions were dropped")
    finally:
        listener.close()


def test_a_burst_of_pokes_asks_one_pass_per_min_interval_and_a_lone_poke_is_sent_at_once(settings: Settings, database: Database) -> None:
    """Each NOTIFY costs the scheduler a pass: under load, one per MIN_INTERVAL_SECONDS; after a quiet spell, at once."""
    now = [100.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the waker's clock moves only when it waits
        sleeps.append(seconds)
        now[0] += seconds

    waker = SchedulerWaker(database.engine, reason="test-burst", min_interval=0.05, clock=lambda: now[0], sleep=sleep)
    listener = psycopg2.connect(settings.database_url)
    listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
    received: list[str] = []

    def wake_ups(count: int) -> bool:
        listener.poll()
        received.extend(n.payload for n in listener.notifies if n.payload == "test-burst")
        listener.notifies.clear()
        return len(received) >= count

    try:
        listener.cursor().execute(f"LISTEN {SCHEDULER_CHANNEL}")
        waker.poke()
        wait_for(lambda: wake_ups(1), 10, interval=0.02, message="the first wake-up")
        assert sleeps == []  # nothing sent before: no wait
        waker.poke()  # at the same instant: the second NOTIFY waits out the interval
        wait_for(lambda: wake_ups(2), 10, interval=0.02, message="the second wake-up")
        assert sleeps == [pytest.approx(0.05)]
        now[0] += 1.0  # a quiet spell
        waker.poke()
        wait_for(lambda: wake_ups(3), 10, interval=0.02, message="the wake-up after a quiet spell")
        assert sleeps == [pytest.approx(0.05)] and len(received) == 3
    finally:
        listener.close()


class WakeUpProbe:
    """A LiveServer whose waker runs on a clock that moves only when it waits, and a LISTEN session on the
    schedulers' channel (with a node, so that submits are accepted)."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.now = [100.0]
        self.server = LiveServer(settings)
        self.waker = SchedulerWaker(self.server.app.extensions["jobservice.database"].engine, min_interval=0.05,
                                    clock=lambda: self.now[0], sleep=self._sleep)
        self.server.app.extensions["jobservice.scheduler_waker"] = self.waker
        self.api = ApiClient(self.server.url)
        self.received: list[str] = []
        self._database = database
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, ready, heartbeat_at, "
                "started_at) VALUES ('local', 'wake-node', '[]', 4000, 8589934592, 4, true, now(), now())"))
        self.listener = psycopg2.connect(settings.database_url)
        self.listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        self.listener.cursor().execute(f"LISTEN {SCHEDULER_CHANNEL}")

    def _sleep(self, seconds: float) -> None:
        self.now[0] += seconds

    def wake_ups(self, count: int) -> bool:
        self.listener.poll()
        self.received.extend(n.payload for n in self.listener.notifies)
        self.listener.notifies.clear()
        return len(self.received) >= count

    def received_before_a_marker(self) -> list[str]:
        """Every wake-up not yet taken: a NOTIFY committed now arrives after anything committed before it, so what
        came before it is all there is. Takes them, and the marker."""
        with self._database.engine.connect() as conn:
            conn.execute(text("SELECT pg_notify(:channel, 'marker')"), {"channel": SCHEDULER_CHANNEL})
            conn.commit()
        wait_for(lambda: self.wake_ups(len(self.received) + 1) and "marker" in self.received, 10, interval=0.02,
                 message="the marker")
        cut = self.received.index("marker")
        taken, self.received = self.received[:cut], self.received[cut + 1:]
        return taken

    def close(self) -> None:
        self.listener.close()
        self.server.stop()
        with self._database.engine.begin() as conn:
            conn.execute(text("DELETE FROM nodes WHERE name = 'wake-node'"))


@pytest.fixture
def wake_up_probe(settings: Settings, database: Database) -> Iterator[WakeUpProbe]:
    probe = WakeUpProbe(settings, database)
    yield probe
    probe.close()


def test_a_lone_submit_carries_its_wake_up_in_its_transaction_and_a_quick_second_one_leaves_it_to_the_waker(
        wake_up_probe: WakeUpProbe) -> None:
    """Issue 14, idle dispatch: a submit after a quiet spell wakes the scheduler by its own commit (the NOTIFY rides in
    its INSERT's round trip), so the waker thread sends nothing; a second submit within MIN_INTERVAL_SECONDS pokes the
    thread, which waits out the interval (commits stay unserialised under load). A submit that rolls back after its
    INSERT (a job no node could ever hold: 400) wakes nobody: it created nothing."""
    probe, api = wake_up_probe, wake_up_probe.api
    assert api.post("/jobs/", json=JOB).status_code == 201
    wait_for(lambda: probe.wake_ups(1), 10, interval=0.02, message="the first submit's wake-up")
    assert probe.waker._thread is None  # delivered by its commit: the thread never started

    assert api.post("/jobs/", json=JOB).status_code == 201  # the same instant: left to the thread
    wait_for(lambda: probe.wake_ups(2), 10, interval=0.02, message="the second submit's wake-up")
    assert probe.waker._thread is not None and probe.now[0] == pytest.approx(100.05)

    probe.now[0] += 1.0  # a quiet spell: the next submit would carry its wake-up, but it rolls back
    refused = api.post("/jobs/", json={**JOB, "resources": {"gpus": 64}})
    assert refused.status_code == 400, refused.text
    assert probe.received_before_a_marker() == ["submit", "submit"]


def test_a_batch_after_a_quiet_spell_carries_one_wake_up_in_its_transaction_and_a_refused_one_none(
        wake_up_probe: WakeUpProbe) -> None:
    """The batch path too: one NOTIFY for all its jobs, delivered by its commit, none from the waker thread; a batch
    that rolls back (one job no node could ever hold) created nothing and wakes nobody."""
    probe, api = wake_up_probe, wake_up_probe.api
    refused = api.post("/jobs/batch", json={"jobs": [JOB, {**JOB, "resources": {"gpus": 64}}]})
    assert refused.status_code == 400, refused.text
    assert probe.received_before_a_marker() == []

    probe.now[0] += 1.0  # the refused batch reserved the interval's in-transaction wake-up: a quiet spell after it
    created = api.post("/jobs/batch", json={"jobs": [JOB, {**JOB, "priority": 90}, JOB]})
    assert created.status_code == 201, created.text
    assert probe.received_before_a_marker() == ["submit"]
    assert probe.waker._thread is None  # delivered by its commit: the thread never started


def test_a_submit_skips_the_pre_ping_and_retries_a_connection_found_dead_before_its_commit(
    settings: Settings, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pre-ping is a round trip per request; a submit retries instead, which is safe before its COMMIT."""
    server = LiveServer(settings)  # a pool of its own: which connection a checkout gets is known
    try:
        api = ApiClient(server.url)
        engine = server.app.extensions["jobservice.database"].engine
        # Every submit carries its own wake-up: no waker thread checks a pooled connection out behind the test's back
        # (it pings it, and may take the one the next request was to reuse).
        server.app.extensions["jobservice.scheduler_waker"] = SchedulerWaker(engine, min_interval=0.0)
        pings: list[int] = []
        ping = engine.dialect.do_ping
        monkeypatch.setattr(engine.dialect, "do_ping", lambda connection: pings.append(1) or ping(connection))
        first = api.submit(**JOB)
        api.submit(**JOB)
        pings.clear()
        api.submit(**JOB)  # its connection was in use a moment ago
        assert pings == []
        assert api.get(f"/jobs/{first['id']}").status_code == 200
        assert pings == [1]  # every other request still pings
        for pid in backend_pids(database, "jobservice-api"):  # dies while idle in the pool, a moment after use
            with database.engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with database.session() as s:
            before = s.scalar(text("SELECT count(*) FROM jobs"))
        response = api.post("/jobs/", json=JOB)
        assert response.status_code == 201, response.text  # not a 503: nothing was committed, so it was retried
        with database.session() as s:
            assert s.scalar(text("SELECT count(*) FROM jobs")) == before + 1
            assert s.scalar(text("SELECT count(*) FROM job_events WHERE job_id = :id"), {"id": response.json()["id"]}) == 1

        # A restart ends every session: the retry's connection is pinged, not the next dead one of the pool.
        held = [engine.connect() for _ in range(3)]
        for connection in held:
            connection.execute(text("SELECT 1"))
        for connection in held:
            connection.close()
        for pid in backend_pids(database, "jobservice-api"):
            with database.engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        response = api.post("/jobs/", json=JOB)
        assert response.status_code == 201, response.text
    finally:
        server.stop()


def test_the_submit_insert_is_prepared_once_per_database_session(settings: Settings, database: Database) -> None:
    """Planning the INSERT cost PostgreSQL as much as running it: each session plans it once."""
    server = LiveServer(settings)
    try:
        api = ApiClient(server.url)
        engine = server.app.extensions["jobservice.database"].engine
        statements: list[tuple[int, str]] = []

        def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append((id(conn.connection.dbapi_connection), statement))

        event.listen(engine, "before_cursor_execute", seen)
        try:
            for _ in range(4):
                api.submit(**JOB)
            assert api.post("/jobs/batch", json={"jobs": [JOB] * 3}).status_code == 201
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        prepared = [conn for conn, s in statements if s.startswith("PREPARE jobservice_submit_insert")]
        assert prepared and len(prepared) == len(set(prepared))  # once per session, whatever the number of submits
        assert sum(writes_jobs(s) for _, s in statements) == 5
        with database.session() as s:
            assert s.scalar(text("SELECT count(*) FROM jobs")) >= 7
    finally:
        server.stop()


def test_the_submit_reads_keep_one_generic_plan_that_walks_an_index_while_jobs_fills_up(
    settings: Settings, database: Database
) -> None:
    """The reads of a submit are planned once per database session, and a plan made while `jobs` was empty (analyzed
    so: a scan and a sort were the cheapest then) must not stay cached as a scan of the whole backlog."""
    register_node(database)
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE jobs"))
    own = Database(settings.database_url or "", pool_size=1, application_name="submit-plan-test")
    request = jobs_domain.JobRequest(job_type="t", priority=10, image=None, config={}, resources={}, cpu_millis=100,
                                     memory_bytes=1000, gpus=0, command=["true"])

    def submit() -> jobs_domain.Submitted:
        with own.session() as s:
            return jobs_domain.submit(s, LOCAL_ADMIN, request, settings)

    def cached_plan(job: jobs_domain.Submitted) -> str:
        with own.session() as s, transaction(s):
            s.execute(text(jobs_domain.SUBMIT_READS.plan))
            rows = s.execute(text(f"EXPLAIN {jobs_domain.SUBMIT_READS.execute_sql}"), {
                "quota_tenant": LOCAL_ADMIN.fair_share_owner, "queue": job.queue, "priority": job.priority,
                "created_at": job.created_at, "id": job.id, "scan_limit": 2001}).scalars().all()
        return "\n".join(rows)

    def plans() -> tuple[int, int]:
        with own.session() as s:
            row = s.execute(text("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                                 "WHERE name = :name"), {"name": jobs_domain.SUBMIT_READS.name}).one()
        return int(row.generic_plans), int(row.custom_plans)

    try:
        first = submit()
        assert first.queue_position == 1
        plan = cached_plan(first)
        assert "Seq Scan on jobs" not in plan, plan
        # An index walk from the new job on (its condition, not a filter on another index's entries).
        assert "Index Cond" in plan and "ROW(created_at, id) > ROW(" in plan, plan
        # The backlog grows behind the cached plan's back (no ANALYZE): the next submit still reads its position.
        with database.engine.begin() as conn:
            conn.execute(text(
                """INSERT INTO jobs (id, owner, job_type, priority, queue, status, created_at, updated_at, pending_since)
                   SELECT 'bulk-' || g, 'local', 'bulk', 10, :queue, 'pending', now() - interval '1 hour', now(), now()
                   FROM generate_series(1, 3000) AS g"""), {"queue": first.queue})
        second = submit()
        assert second.queue_position == 3002
        assert "Seq Scan on jobs" not in cached_plan(second)
        generic, custom = plans()
        assert generic >= 3 and custom == 0  # two submits and two EXPLAINs, none planned again with its values
    finally:
        own.dispose()


def test_the_submit_transaction_itself_does_not_notify(live_server: LiveServer, api: ApiClient) -> None:
    """PostgreSQL commits notifying transactions one at a time: a NOTIFY inside the submit serialises all submits."""
    engine = live_server.app.extensions["jobservice.database"].engine
    seen: list[tuple[int, str]] = []
    listeners = {
        "before_cursor_execute": lambda conn, cursor, statement, *args: seen.append((id(conn.connection.dbapi_connection), statement)),
        "commit": lambda conn: seen.append((id(conn.connection.dbapi_connection), "COMMIT")),
        "rollback": lambda conn: seen.append((id(conn.connection.dbapi_connection), "ROLLBACK")),
    }
    for name, listener in listeners.items():
        event.listen(engine, name, listener)
    try:
        api.submit(**JOB)
        assert api.post("/jobs/batch", json={"jobs": [JOB] * 2}).status_code == 201
        wait_for(lambda: sum("pg_notify" in s for _, s in seen) >= 1, 10, interval=0.02, message="the wake-up")
    finally:
        for name, listener in listeners.items():
            event.remove(engine, name, listener)
    submitting: set[int] = set()  # connections inside a submit's transaction
    for conn, statement in list(seen):
        if writes_jobs(statement):
            submitting.add(conn)
        elif statement in ("COMMIT", "ROLLBACK"):
            submitting.discard(conn)
        elif "pg_notify" in statement:
            assert conn not in submitting, "NOTIFY inside the submit's transaction"
    assert sum(writes_jobs(s) for _, s in seen) == 2


# --- schemas -------------------------------------------------------------------------------------------------

def test_the_create_schemas_defaults_are_what_the_nested_schemas_load() -> None:
    fields = JobCreateSchema().fields
    assert fields["resources"].load_default() == ResourcesSchema().load({})
    assert fields["gang"].load_default() == GangSchema().load({})
    assert fields["retry_policy"].load_default() == RetryPolicySchema().load({})


def test_the_document_describes_batch_keys_and_dry_run(api: ApiClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/jobs/", "/api/v1/jobs/batch"):
        operation = paths[path]["post"]
        parameters = {p["name"]: p for p in operation["parameters"]}
        assert parameters["Idempotency-Key"]["in"] == "header" and parameters["Idempotency-Key"]["schema"]["maxLength"] == 255
        assert parameters["dry_run"]["in"] == "query"
        assert {"200", "201", "400", "409", "429"} <= set(operation["responses"])


@pytest.mark.parametrize("position", [7, None])
def test_the_created_answer_is_what_its_schema_dumps(position: int | None) -> None:
    """app.api.schemas.dump_created stands in for JobCreatedSchema().dump on the submit path: the two agree."""
    from datetime import datetime, timezone as tz

    from app.api.schemas import JobCreatedSchema, dump_created
    from app.domain.jobs import Submitted

    for created_at in (datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=tz.utc),
                       datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz(timedelta(hours=-5)))):
        job = Submitted("job-0123456789ab", "train", 80, "high-priority", "pending", created_at, position)
        assert dump_created(job) == JobCreatedSchema().dump(job)
