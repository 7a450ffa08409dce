"""The scheduler against the real service: no job can stop it, and a job that cannot run blocks nobody."""
from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select, text

from app.db import Database
from app.domain.jobs import new_job_id
from app.domain.scheduling import retry_delay_seconds
from app.models import Job, JobEvent, Node
from config import Settings
from tests.conftest import ApiClient, wait_for, wait_for_status


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def insert_job(database: Database, **fields: Any) -> str:
    """A row as an older release (or an operator's SQL) may have left it: no API validation."""
    now = datetime.now(timezone.utc)
    row: dict[str, Any] = dict(
        id=new_job_id(), owner="legacy", job_type="inference", priority=50, queue="high-priority", status="pending",
        status_reason="submitted", command=["true"], cpu_millis=100, memory_bytes=1 << 20, gpus=0, created_at=now,
        updated_at=now, pending_since=now, max_retries=0, backoff_multiplier=2.0, retry_count=0,
    )
    row.update(fields)
    with database.session() as session, session.begin():
        session.add(Job(**row))
        session.add(JobEvent(job_id=row["id"], at=now, from_status=None, to_status=row["status"], reason="inserted", actor="test"))
    return row["id"]


def events(database: Database, job_id: str) -> list[JobEvent]:
    with database.session() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def test_the_retry_delay_is_capped_for_any_stored_multiplier() -> None:
    settings = Settings(retry_backoff_base_seconds=10, retry_backoff_max_seconds=3600)
    for multiplier, retries in ((1e12, 2), (1e12, 30), (math.inf, 1), (math.nan, 1), (2.0, 10**9), (1e308, 10**6)):
        assert retry_delay_seconds(settings, SimpleNamespace(backoff_multiplier=multiplier, retry_count=retries)) == 3600
    assert retry_delay_seconds(settings, SimpleNamespace(backoff_multiplier=2.0, retry_count=3)) == 80
    assert retry_delay_seconds(settings, SimpleNamespace(backoff_multiplier=-3.0, retry_count=1)) == 0
    assert retry_delay_seconds(settings, SimpleNamespace(backoff_multiplier=0.5, retry_count=10**9)) == 0


def test_no_job_stops_the_scheduler(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    """A lost job with a 1e12 backoff and a pending job with negative resources, both written straight into
    the database, neither stop the pass: the first is retried after the capped delay, the second failed with
    its reason, and a valid job behind them runs."""
    long_ago = datetime.now(timezone.utc) - timedelta(minutes=10)
    huge_backoff = insert_job(
        database, status="running", backoff_multiplier=1e12, retry_count=3, max_retries=5, cluster="local", node="gone",
        worker_id="worker-gone", started_at=long_ago, heartbeat_at=long_ago, queued_at=long_ago,
    )
    negative = insert_job(database, priority=100, cpu_millis=-4000)
    start_worker("node-a")
    start_scheduler(RETRY_BACKOFF_MAX_SECONDS="120")
    valid = api.submit(command=sh("echo fine"), priority=10)
    assert wait_for_status(api, valid["id"], {"succeeded", "failed"})["status"] == "succeeded"

    failed = wait_for_status(api, negative, "failed")
    assert "could not admit" in failed["status_reason"] and "negative resources" in failed["status_reason"]
    assert events(database, negative)[-1].actor == "scheduler"
    retried = wait_for_status(api, huge_backoff, "pending")
    last = events(database, huge_backoff)[-1]
    assert last.from_status == "running" and last.details["backoff_seconds"] == 120
    assert "retry 4 of 5 in 120s" in retried["status_reason"]


def test_readiness_reports_a_scheduler_that_cannot_pass(api: ApiClient, start_scheduler, database: Database) -> None:
    assert api.get("/health/ready").json()["checks"]["scheduler"] == "unknown"  # none ever ran: not a failure
    start_scheduler(SCHEDULER_HEALTH_INTERVALS="2")  # interval 0.5s: stale after 1s
    wait_for(lambda: api.get("/health/ready").json()["checks"]["scheduler"] == "ok", message="scheduler ok")
    # Hold the jobs table: every pass now hangs in admission and none completes.
    with database.engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        try:
            wait_for(lambda: api.get("/health/ready").status_code == 503, timeout=20, message="readiness to degrade")
            body = api.get("/health/ready").json()
            assert body["status"] == "degraded" and body["checks"]["scheduler"] == "error"
            assert body["checks"]["database"] == "ok"
        finally:
            transaction.rollback()
    wait_for(lambda: api.get("/health/ready").status_code == 200, timeout=20, message="readiness to recover")


def test_a_gpu_job_with_no_gpu_node_does_not_block_a_cpu_job(api: ApiClient, start_scheduler, start_worker) -> None:
    gpu_job = api.submit(command=sh("true"), priority=90, resources={"gpu": 1})  # no node known yet: accepted
    start_worker("cpu-only", gpus=0)
    start_scheduler()
    cpu_job = api.submit(command=sh("echo cpu"), priority=10)
    assert wait_for_status(api, cpu_job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    assert api.get(f"/jobs/{gpu_job['id']}").json()["status"] == "pending"
    explained = api.get(f"/jobs/{gpu_job['id']}/explain").json()
    assert explained["reason"] == "INSUFFICIENT_GPUS", explained


def test_a_valid_job_is_not_refused_while_gpu_nodes_are_not_ready(api: ApiClient, database: Database) -> None:
    now = datetime.now(timezone.utc)
    with database.session() as session, session.begin():
        session.add(Node(cluster="local", name="gpu-1", gpu_indices=[0, 1], cpu_millis=8000, memory_bytes=32 << 30, slots=4,
                         ready=False, heartbeat_at=now - timedelta(minutes=5), started_at=now))
    accepted = api.post("/jobs/", json={"job_type": "train", "command": ["true"], "resources": {"gpu": 2}})
    assert accepted.status_code == 201, accepted.text
    refused = api.post("/jobs/", json={"job_type": "train", "command": ["true"], "resources": {"gpu": 3}})
    assert refused.status_code == 400 and "can never be scheduled" in refused.json()["error"]["message"]


def test_an_admission_that_cannot_be_written_fails_alone(database: Database, e2e_settings: Settings) -> None:
    """The pass writes its admissions in one statement; when that fails, each is written in its own savepoint:
    the job whose row cannot be written is failed with the reason, and the others are admitted as usual."""
    from app.domain.scheduling import admit

    now = datetime.now(timezone.utc)
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "VALUES ('local', 'node-w', '[]'::jsonb, 100000, 1099511627776, 8, true, now() + interval '1 day', now())"
        ))
    jobs = [insert_job(database, created_at=now - timedelta(seconds=3 - i)) for i in range(3)]
    doomed = jobs[1]
    with database.engine.begin() as conn:
        conn.execute(text(
            "CREATE OR REPLACE FUNCTION test_refuse_admission() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.job_id = TG_ARGV[0] AND NEW.to_status = 'queued' THEN RAISE EXCEPTION 'refused by the test'; END IF;"
            " RETURN NEW; END $$"
        ))
        conn.execute(text(
            f"CREATE TRIGGER test_refuse_admission BEFORE INSERT ON job_events FOR EACH ROW EXECUTE FUNCTION test_refuse_admission('{doomed}')"
        ))
    try:
        with database.session() as session:
            result = admit(session, e2e_settings)
    finally:
        with database.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS test_refuse_admission ON job_events"))
            conn.execute(text("DROP FUNCTION IF EXISTS test_refuse_admission()"))
    assert sorted(result.admitted) == sorted([jobs[0], jobs[2]])
    assert result.failed == [doomed]
    with database.session() as session:
        rows = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(jobs)))}
        outbox = dict(session.execute(text("SELECT job_id, args FROM outbox")).all())
    assert rows[doomed].status == "failed" and "could not admit" in (rows[doomed].status_reason or "")
    for job_id in (jobs[0], jobs[2]):
        assert rows[job_id].status == "queued" and rows[job_id].holds_resources and rows[job_id].node == "node-w"
        assert outbox[job_id] == [job_id, rows[job_id].dispatch_token]
        assert [(e.from_status, e.to_status) for e in events(database, job_id)][-1] == ("pending", "queued")
    assert doomed not in outbox


def test_a_scheduler_waiting_out_a_long_interval_stops_when_asked(e2e_settings: Settings, database: Database) -> None:
    """select() resumes after a signal handler (PEP 475), so a stop (SIGTERM's handler sets it) must not
    wait for the interval's end: the loop looks at it while it waits."""
    import threading

    from app.dispatch import CeleryPublisher
    from app.scheduler import SCHEDULER_APPLICATION, Scheduler

    settings = e2e_settings.with_overrides(scheduler_interval_seconds=300.0)
    publisher = CeleryPublisher(settings)
    scheduler = Scheduler(settings, Database(settings.database_url or "", pool_size=2, application_name=SCHEDULER_APPLICATION), publisher)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True)
    thread.start()

    def listening() -> int:
        with database.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND query LIKE 'LISTEN%'"),
                                {"name": SCHEDULER_APPLICATION}).scalar_one()

    try:
        wait_for(listening, 30, message="the scheduler waiting on its LISTEN session")
        stop.set()
        thread.join(60)  # a fifth of the interval: the wait did not run to its end
        assert not thread.is_alive()
    finally:
        stop.set()
        publisher.close()
        scheduler.database.dispose()


def test_passes_asked_by_submits_alone_are_spaced_and_any_other_wake_up_is_at_once(settings: Settings) -> None:
    """Issue 14: N API processes each ask up to 1/MIN_INTERVAL passes a second; a pass asked by submits alone right after
    another one waits for the spacing, which an attempt's end (a slot freed) or any other wake-up does not."""
    import threading

    import psycopg2

    from app.domain.jobs import SCHEDULER_CHANNEL, SUBMIT_WAKEUP
    from app.scheduler import Scheduler, Woken

    listener, notifier = psycopg2.connect(settings.database_url), psycopg2.connect(settings.database_url)
    for connection in (listener, notifier):
        connection.autocommit = True
    listener.cursor().execute(f"LISTEN {SCHEDULER_CHANNEL}")
    stop = threading.Event()

    def notify(reason: str) -> None:
        notifier.cursor().execute("SELECT pg_notify(%s, %s)", (SCHEDULER_CHANNEL, reason))

    try:
        notify(SUBMIT_WAKEUP)  # after a quiet spell (or a pass asked by something else): at once
        assert Scheduler._wait(listener, 30, stop, 0.0) is Woken.SUBMITS
        woken: list[Woken] = []
        waiting = threading.Thread(target=lambda: woken.append(Scheduler._wait(listener, 30, stop, time.monotonic() + 30)))
        waiting.start()
        notify(SUBMIT_WAKEUP)
        notify(SUBMIT_WAKEUP)
        waiting.join(1.0)
        assert waiting.is_alive() and woken == []  # deferred to the spacing's end
        notify("attempt-ended")
        waiting.join(10)
        assert woken == [Woken.OTHER]
        notify(SUBMIT_WAKEUP)  # deferred, then passed once the spacing is over
        assert Scheduler._wait(listener, 30, stop, time.monotonic() + 0.2) is Woken.SUBMITS
        assert Scheduler._wait(listener, 0.05, stop, 0.0) is Woken.TIMEOUT
    finally:
        listener.close()
        notifier.close()


def test_a_pass_skips_a_job_whose_row_someone_holds_and_admits_it_once_released(database: Database, e2e_settings: Settings) -> None:
    """A cancel holding a pending job's row must not stall admission: the pass leaves that job pending (no event, no
    outbox row), admits the others, and a later pass admits it once the row is free."""
    import threading

    from app.domain.scheduling import admit

    now = datetime.now(timezone.utc)
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "VALUES ('local', 'node-l', '[]'::jsonb, 100000, 1099511627776, 8, true, now() + interval '1 day', now())"
        ))
    held, free = (insert_job(database, created_at=now - timedelta(seconds=2 - i)) for i in range(2))
    results: list[Any] = []

    def one_pass() -> None:
        with database.session() as session:
            results.append(admit(session, e2e_settings))

    with database.engine.connect() as holder:
        holder.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": held})
        passing = threading.Thread(target=one_pass, daemon=True)
        passing.start()
        passing.join(30)
        assert not passing.is_alive(), "the pass waited for the row lock instead of skipping the job"
        holder.rollback()
    assert results[0].admitted == [free]
    with database.session() as session:
        row = session.get(Job, held)
        assert row is not None and row.status == "pending" and not row.holds_resources
        assert session.execute(text("SELECT count(*) FROM outbox WHERE job_id = :id"), {"id": held}).scalar() == 0
    assert [e.to_status for e in events(database, held)] == ["pending"]
    one_pass()
    assert results[1].admitted == [held]
    with database.session() as session:
        assert session.get(Job, held).status == "queued"


def test_the_scheduler_vacuums_the_tables_its_passes_and_folds_churn(e2e_settings: Settings, database: Database) -> None:
    """Dead rows of the delta tables are what every submit's position read scans: the scheduler's sweep vacuums them
    (this machine's PostgreSQL runs with autovacuum off, as some do)."""
    from app.dispatch import CeleryPublisher
    from app.scheduler import CHURN_TABLES, SCHEDULER_APPLICATION, Scheduler

    def dead_and_vacuumed() -> dict[str, tuple[int, Any]]:
        with database.engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
            return {name: (dead, last) for name, dead, last in conn.execute(text(
                "SELECT relname, n_dead_tup, last_vacuum FROM pg_stat_user_tables WHERE relname = ANY(:names)"),
                {"names": list(CHURN_TABLES)})}

    with database.engine.connect() as conn:  # two transactions, and this session's statistics sent at once
        conn.execute(text("INSERT INTO job_count_deltas (queue, status, priority, delta) "
                          "SELECT 'q-vacuum', 'pending', 1, 1 FROM generate_series(1, 2000)"))
        conn.commit()
        conn.execute(text("DELETE FROM job_count_deltas WHERE queue = 'q-vacuum'"))
        conn.commit()
        conn.execute(text("SELECT pg_stat_force_next_flush()"))
        conn.commit()
    # What the tick must change: each table's last vacuum. (Waiting for the 2,000 deleted rows to be counted dead first
    # timed out once in CI: the statistics can lag or be reset by a vacuum of the shared database meanwhile.)
    before = dead_and_vacuumed()
    scheduler = Scheduler(e2e_settings, Database(e2e_settings.database_url or "", pool_size=2, application_name=SCHEDULER_APPLICATION),
                          CeleryPublisher(e2e_settings))
    try:
        scheduler.tick()
    finally:
        scheduler.database.dispose()
    after = wait_for(lambda: (seen := dead_and_vacuumed())["job_count_deltas"][0] < 2000
                     and all(seen[name][1] != before[name][1] for name in before) and seen, timeout=10,
                     message="the dead rows vacuumed")
    assert set(after) == set(CHURN_TABLES)
    for name, (_, last_vacuum) in after.items():
        assert last_vacuum is not None and last_vacuum != before[name][1], name


def test_passes_between_sweeps_fold_the_counters_at_most_every_fold_interval(
    e2e_settings: Settings, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every submit adds up its queue's unfolded deltas (its position): under a load, the passes woken between two
    sweeps fold them too, FOLD_EVERY_SECONDS apart; an idle scheduler folds with its sweep alone."""
    from app import scheduler as scheduler_module
    from app.dispatch import CeleryPublisher
    from app.scheduler import SCHEDULER_APPLICATION, Scheduler

    def unfolded() -> int:
        with database.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM job_count_deltas WHERE queue = 'q-fold'")).scalar_one())

    def add_deltas() -> None:
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO job_count_deltas (queue, status, priority, delta) "
                              "SELECT 'q-fold', 'pending', 1, 1 FROM generate_series(1, 10)"))

    settings = e2e_settings.with_overrides(scheduler_interval_seconds=3600.0)  # one sweep: the first tick's
    publisher = CeleryPublisher(settings)
    scheduler = Scheduler(settings, Database(settings.database_url or "", pool_size=2, application_name=SCHEDULER_APPLICATION),
                          publisher)
    monkeypatch.setattr(scheduler_module, "FOLD_EVERY_SECONDS", 3600.0)
    try:
        add_deltas()
        scheduler.tick()  # the sweep folds
        assert unfolded() == 0
        add_deltas()
        scheduler.tick()  # woken again at once: not yet
        assert unfolded() == 10
        monkeypatch.setattr(scheduler_module, "FOLD_EVERY_SECONDS", 0.0)
        scheduler.tick()
        assert unfolded() == 0
        with database.engine.connect() as conn:
            assert conn.execute(text("SELECT count FROM job_counts WHERE queue = 'q-fold'")).scalar_one() == 20
    finally:
        scheduler.database.dispose()
        publisher.close()


def test_a_tick_whose_idle_connection_died_runs_again_at_once(e2e_settings: Settings, database: Database,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14, idle dispatch: a tick does not ping its pooled connections first (a round trip of every pass). A
    connection that died while idle (a database restart, a terminated session) fails the tick's first statement; the
    tick then runs again at once on a pinged connection and admits what it would have, with no error and no wait."""
    import logging

    from app.dispatch import CeleryPublisher
    from app.scheduler import SCHEDULER_APPLICATION, Scheduler, scheduler_database

    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "VALUES ('local', 'tick-node', '[]', 4000, 8589934592, 4, true, now() + interval '1 hour', now())"))
    publisher = CeleryPublisher(e2e_settings)
    scheduler = Scheduler(e2e_settings, scheduler_database(e2e_settings), publisher)
    try:
        scheduler._tick()  # the pool now holds an idle connection, used a moment ago
        with database.engine.connect() as conn:
            killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"),
                                  {"name": SCHEDULER_APPLICATION}).scalar_one()
        assert killed >= 1
        job_id = insert_job(database, priority=60)
        with caplog.at_level(logging.INFO, logger="jobservice.scheduler"):
            result = scheduler._tick()
        assert job_id in result.admitted
        assert any("met a dropped database connection" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        publisher.close()
        scheduler.database.dispose()
        with database.engine.begin() as conn:
            conn.execute(text("DELETE FROM nodes WHERE name = 'tick-node'"))
