"""Dropped database connections, on real PostgreSQL: what is retried, what is idempotent, what is requeued.

The worker-side and scheduler-side end-to-end checks (real processes) are in test_db_faults_e2e.py.
"""
from __future__ import annotations

import socket
import threading
from datetime import timedelta
from typing import Any

import psycopg2
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import Database, is_connection_error, retry_on_disconnect, transaction
from app.domain import execution, logs as log_store
from app.domain.jobs import utcnow
from app.domain.scheduling import ADMISSION_LOCK, AdmissionResult, SnapshotCache, admit, requeue_unclaimed
from app.models import Job, JobEvent, OutboxMessage
from config import Settings
from tests.conftest import ApiClient, wait_for
from tests.test_snapshot_cache import statements_sent


def backend_pids(database: Database, application: str, *, waiting_on_lock: bool = False, query_like: str = "%") -> list[int]:
    """Server processes of the sessions that `application` (application_name, LIKE pattern) has open."""
    with database.engine.connect() as conn:
        return list(conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE :app"
                " AND pid <> pg_backend_pid()"
                " AND query ILIKE :query" + (" AND wait_event_type = 'Lock'" if waiting_on_lock else "")
            ),
            {"app": application, "query": query_like},
        ).scalars())


def signal_backend(database: Database, pid: int, function: str = "pg_terminate_backend") -> None:
    assert function in ("pg_terminate_backend", "pg_cancel_backend")
    with database.engine.connect() as conn:
        assert conn.execute(text(f"SELECT {function}(:pid)"), {"pid": pid}).scalar()


def events(database: Database, job_id: str) -> list[JobEvent]:
    with database.session() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def register(database: Database, name: str = "node-a", slots: int = 2) -> None:
    with database.session() as s:
        execution.register_node(s, cluster="local", name=name, gpu_indices=[], gpu_type=None, cpu_millis=8000,
                                memory_bytes=16 * 2**30, slots=slots)


def admitted_job(api: ApiClient, database: Database, settings: Settings, **fields: Any) -> tuple[str, str]:
    """A job admitted to node-a (no worker listens): (job id, dispatch token)."""
    register(database)
    job = api.submit(command=["true"], **fields)
    with database.session() as s:
        assert job["id"] in admit(s, settings).admitted
        return job["id"], s.get(Job, job["id"]).dispatch_token


# --- the retry helper ---------------------------------------------------------------------------------

def test_a_terminated_session_is_retried_on_a_new_connection(database: Database) -> None:
    db = Database(database.url, pool_size=1, application_name="jobservice-test-retry")
    try:
        with db.session() as s:
            first_pid = s.scalar(text("SELECT pg_backend_pid()"))
            s.rollback()  # back to the pool, idle
        tries: list[int] = []

        def work(session: Any) -> int:
            pid = session.scalar(text("SELECT pg_backend_pid()"))
            tries.append(pid)
            if len(tries) == 1:
                signal_backend(database, pid)  # dies under its own statement, as pg_terminate_backend does in a drill
                session.execute(text("SELECT 1"))
            return pid

        pid = db.retrying(work, what="test", sleep=lambda _: None)
        assert len(tries) == 2 and pid != first_pid and pid == tries[1]
    finally:
        db.dispose()


def test_a_connection_idle_past_the_ping_bound_is_replaced_before_use(database: Database) -> None:
    db = Database(database.url, pool_size=1, application_name="jobservice-test-idle-ping", ping_idle_after=0.0)
    try:
        with db.session() as s:
            first_pid = s.scalar(text("SELECT pg_backend_pid()"))
        signal_backend(database, first_pid)  # dies while idle in the pool
        with db.session() as s:  # pinged at checkout, found dead, replaced: no error reaches the caller
            assert s.scalar(text("SELECT pg_backend_pid()")) != first_pid
    finally:
        db.dispose()


def test_a_connection_in_use_a_moment_ago_is_not_pinged_and_its_death_is_retried(database: Database) -> None:
    db = Database(database.url, pool_size=1, application_name="jobservice-test-idle-ping", ping_idle_after=3600.0)
    try:
        with db.session() as s:
            first_pid = s.scalar(text("SELECT pg_backend_pid()"))
        signal_backend(database, first_pid)
        with pytest.raises(Exception) as raised:  # not pinged: the caller's statement meets the dead connection
            with db.session() as s:
                s.scalar(text("SELECT 1"))
        assert is_connection_error(raised.value)  # what Database.retrying retries, on a new connection:
        pid = db.retrying(lambda session: session.scalar(text("SELECT pg_backend_pid()")), what="test", sleep=lambda _: None)
        assert pid != first_pid
    finally:
        db.dispose()


def test_errors_other_than_a_dropped_connection_are_never_retried(database: Database) -> None:
    calls: list[int] = []

    def duplicate_key() -> None:
        calls.append(1)
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at)"
                              " VALUES ('local', 'dup', '{}', 1, 1, 1, true, now(), now())"))
            conn.execute(text("INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at)"
                              " VALUES ('local', 'dup', '{}', 1, 1, 1, true, now(), now())"))

    with pytest.raises(IntegrityError) as raised:
        retry_on_disconnect(duplicate_key, what="test", sleep=lambda _: None)
    assert calls == [1] and not is_connection_error(raised.value)


def test_a_cancelled_statement_is_not_a_connection_error(database: Database) -> None:
    with database.engine.connect() as conn:
        conn.execute(text("SET statement_timeout = '10ms'"))
        with pytest.raises(Exception) as raised:
            conn.execute(text("SELECT pg_sleep(1)"))
    assert not is_connection_error(raised.value)


def test_retrying_gives_up_after_its_bound(database: Database) -> None:
    db = Database("postgresql://postgres@127.0.0.1:1/nothing", pool_size=1)  # nothing listens there
    try:
        slept: list[float] = []
        with pytest.raises(Exception) as raised:
            db.retrying(lambda s: s.scalar(text("SELECT 1")), what="test", give_up_after=0.3, sleep=slept.append)
        assert is_connection_error(raised.value) and slept and max(slept) <= 2.0
    finally:
        db.dispose()


# --- idempotent claim and end --------------------------------------------------------------------------

def test_a_claim_retried_after_its_commit_gets_the_job_back_and_no_one_else_does(api: ApiClient, database: Database, settings: Settings) -> None:
    job_id, token = admitted_job(api, database, settings)
    with database.session() as s:
        first = execution.claim(s, job_id, token, "worker-a-1", claim_id="c1")
    assert first is not None
    with database.session() as s:  # the same claim again: its acknowledgement was lost
        again = execution.claim(s, job_id, token, "worker-a-1", claim_id="c1")
        other_delivery = execution.claim(s, job_id, token, "worker-a-1", claim_id="c2")
        other_worker = execution.claim(s, job_id, token, "worker-b-1", claim_id="c1")
        stale = execution.claim(s, job_id, "stale", "worker-a-1", claim_id="c1")
    assert again == first
    assert other_delivery is None and other_worker is None and stale is None
    assert [e.to_status for e in events(database, job_id)].count("running") == 1


def test_an_end_report_retried_after_its_commit_returns_what_was_recorded(api: ApiClient, database: Database, settings: Settings) -> None:
    job_id, token = admitted_job(api, database, settings)
    with database.session() as s:
        execution.claim(s, job_id, token, "worker-a-1", claim_id="c1")
    report = dict(succeeded=True, retryable=False, reason="exited with code 0", actor="worker-a-1", exit_code=0)
    with database.session() as s:
        assert execution.end(s, settings, job_id, token, **report) == "succeeded"
    with database.session() as s:  # the retry of a report whose acknowledgement was lost
        assert execution.end(s, settings, job_id, token, **{**report, "succeeded": False, "retryable": True}) == "succeeded"
    assert [e.to_status for e in events(database, job_id)] == ["pending", "queued", "running", "succeeded"]


def test_a_claim_and_a_successful_end_are_executed_by_name_each_in_one_round_trip(api: ApiClient, database: Database, settings: Settings) -> None:
    """Issue 14: a worker's claim and end, the statements of every job, are prepared once per database session
    (planning them cost PostgreSQL more than running them), each sent alone in autocommit (app.db.run_alone: no BEGIN,
    no COMMIT, no SET), and stay compare-and-sets: a duplicate claim, a stale token and a repeated end change nothing."""
    from sqlalchemy.engine import make_url

    job_id, token = admitted_job(api, database, settings)
    url = make_url(settings.database_url or "")
    proxy = QueryCountingProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port, query={**url.query, "sslmode": "disable", "gssencmode": "disable"})
    worker_db = Database(proxied.render_as_string(hide_password=False), pool_size=1, ping_idle_after=3600)
    report = dict(succeeded=True, retryable=False, reason="exited with code 0", actor="worker-a-1", exit_code=0)
    try:
        with worker_db.session() as s:  # connects: the dialect's own first statements, not counted
            s.execute(text("SELECT 1"))
        proxy.queries.clear()
        with worker_db.session() as s:
            assert execution.claim(s, job_id, token, "worker-a-1", claim_id="c1") is not None
        with worker_db.session() as s:
            assert execution.end(s, settings, job_id, token, **report) == "succeeded"
        sent = [" ".join(q.decode().split()[:2]) for q in proxy.queries]
        assert sent == ["PREPARE jobservice_claim", "EXECUTE jobservice_claim", "PREPARE jobservice_succeed",
                        "EXECUTE jobservice_succeed"], sent
        proxy.queries.clear()
        with worker_db.session() as s:
            assert execution.claim(s, job_id, token, "worker-b-1", claim_id="c2") is None
            assert execution.claim(s, job_id, "stale", "worker-a-1", claim_id="c1") is None
            assert execution.end(s, settings, job_id, token, **report) == "succeeded"
        # Prepared once per database session: the second claim went by name alone.
        assert "PREPARE jobservice_claim" not in [" ".join(q.decode().split()[:2]) for q in proxy.queries]
    finally:
        worker_db.dispose()
        proxy.close()
    assert [e.to_status for e in events(database, job_id)] == ["pending", "queued", "running", "succeeded"]


def test_a_statement_run_alone_is_one_round_trip_and_its_errors_are_sqlalchemy_s(settings: Settings) -> None:
    """app.db.run_alone: the EXECUTE alone on the wire (after the PREPARE, once per database session), its rows with their
    columns as attributes, the connection back in the pool as it was (the next transaction a plain BEGIN); a refused
    statement is a DBAPIError that leaves the connection usable; a dropped connection is a connection error that
    invalidates it, and the next statement runs on a new one. In a session already in a transaction it joins it."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.engine import make_url

    from app.db import Prepared, run_alone

    divide = Prepared("jobservice_test_divide", "SELECT :a::int / :b::int AS quotient, pg_backend_pid() AS pid",
                      {"a": "integer", "b": "integer"})
    url = make_url(settings.database_url or "")
    proxy = QueryCountingProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port, query={**url.query, "sslmode": "disable", "gssencmode": "disable"})
    database = Database(proxied.render_as_string(hide_password=False), pool_size=1, ping_idle_after=3600)
    try:
        with database.session() as s:
            s.execute(text("SELECT 1"))
        proxy.queries.clear()
        with database.session() as s:
            first = run_alone(s, divide, {"a": 7, "b": 2})
        with database.session() as s:
            second = run_alone(s, divide, {"a": 9, "b": 3})
        assert [(r.quotient, r.pid) for r in first + second] == [(3, first[0].pid), (3, first[0].pid)]
        with database.session() as s:
            assert s.execute(text("SELECT current_setting('transaction_isolation')")).scalar() == "read committed"
        sent = [q.decode() for q in proxy.queries]
        assert [" ".join(q.split()[:2]) for q in sent[:3]] == ["PREPARE jobservice_test_divide", "EXECUTE jobservice_test_divide",
                                                                "EXECUTE jobservice_test_divide"], sent
        assert sent[3:] == ["BEGIN", "SELECT current_setting('transaction_isolation')", "ROLLBACK"], sent

        with database.session() as s, pytest.raises(sa_exc.DBAPIError) as refused:
            run_alone(s, divide, {"a": 1, "b": 0})
        assert "division by zero" in str(refused.value) and not is_connection_error(refused.value)
        with database.session() as s:
            assert run_alone(s, divide, {"a": 4, "b": 2})[0].pid == first[0].pid  # the same connection, still good

        admin = psycopg2.connect(settings.database_url)
        try:
            admin.autocommit = True  # each read of pg_stat_activity a fresh snapshot
            with admin.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", (first[0].pid,))

                def gone() -> bool:
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (first[0].pid,))
                    return cursor.fetchone()[0] == 0

                wait_for(gone, timeout=10, message="the terminated backend gone")  # before the next statement
        finally:
            admin.close()
        with database.session() as s, pytest.raises(sa_exc.DBAPIError) as dropped:
            run_alone(s, divide, {"a": 1, "b": 1})
        assert is_connection_error(dropped.value) and dropped.value.connection_invalidated
        with database.session() as s:
            again = run_alone(s, divide, {"a": 8, "b": 4})
        assert again[0].quotient == 2 and again[0].pid != first[0].pid

        with database.session() as s:  # in a transaction: the statement joins it, and its rollback undoes it
            s.execute(text("CREATE TEMPORARY TABLE alone_probe (n int)"))
            joined = Prepared("jobservice_test_insert", "INSERT INTO alone_probe VALUES (:n) RETURNING n", {"n": "integer"})
            assert run_alone(s, joined, {"n": 5})[0].n == 5
            assert s.execute(text("SELECT count(*) FROM alone_probe")).scalar() == 1
            s.rollback()
    finally:
        database.dispose()
        proxy.close()


def test_a_prepared_statement_is_planned_again_once_its_plan_is_a_minute_old(
    settings: Settings, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generic plan made while `jobs` was empty (a sequential scan, the cheapest then) is kept by PostgreSQL until the
    table's statistics change; with autovacuum off they never do. Prepared again after PREPARED_MAX_AGE_SECONDS, the
    statement is planned from the table's size on disk: by its primary key. In a run alone too (app.db.run_alone)."""
    from app import db as app_db
    from app.db import GENERIC_PLAN, Prepared, run_alone

    pending = Prepared("jobservice_test_pending", "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS text[])) AND status = 'pending'",
                       {"ids": "text[]"}, plan=GENERIC_PLAN)
    alone = Prepared("jobservice_test_status", "SELECT status FROM jobs WHERE id = :id", {"id": "text"})
    own = Database(settings.database_url or "", pool_size=1, application_name="reprepare-test")

    def plan_of(statement: Prepared, parameters: str) -> str:
        with own.session() as s, transaction(s):
            if statement.plan:
                s.execute(text(statement.plan))
            return "\n".join(s.execute(text(f"EXPLAIN EXECUTE {statement.name} ({parameters})")).scalars())

    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ALTER TABLE jobs SET (autovacuum_enabled = false)"))  # statistics stay those of the empty table
        conn.execute(text("ANALYZE jobs"))
    try:
        with own.session() as s, transaction(s):
            assert pending.execute(s, {"ids": ["none"]}).all() == []
        for _ in range(6):  # PostgreSQL's auto mode keeps the generic plan after five custom ones as good
            with own.session() as s:
                assert run_alone(s, alone, {"id": "none"}) == []
        with database.engine.begin() as conn:
            conn.execute(text(
                """INSERT INTO jobs (id, owner, job_type, priority, queue, status, created_at, updated_at, pending_since)
                   SELECT 'bulk-' || g, 'local', 'bulk', 1, 'default', 'pending', now(), now(), now()
                   FROM generate_series(1, 20000) AS g"""))
        assert "Seq Scan on jobs" in plan_of(pending, "'{bulk-7}'")  # the empty table's plans, still cached
        assert "Seq Scan on jobs" in plan_of(alone, "'bulk-7'")

        monkeypatch.setattr(app_db, "PREPARED_MAX_AGE_SECONDS", 0.0)  # they are now that old (the suite keeps them: conftest)
        with own.session() as s, transaction(s):
            assert [row.id for row in pending.execute(s, {"ids": ["bulk-7", "none"]})] == ["bulk-7"]
        with own.session() as s:
            assert [row.status for row in run_alone(s, alone, {"id": "bulk-7"})] == ["pending"]
        for statement, parameters in ((pending, "'{bulk-7}'"), (alone, "'bulk-7'")):
            plan = plan_of(statement, parameters)
            assert "Seq Scan" not in plan and "pk_jobs" in plan, plan
    finally:
        own.dispose()
        with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ALTER TABLE jobs RESET (autovacuum_enabled)"))


def test_a_late_end_report_never_ends_a_later_attempt(api: ApiClient, database: Database, settings: Settings) -> None:
    job_id, token = admitted_job(api, database, settings, retry_policy={"max_retries": 1})
    with database.session() as s:
        execution.claim(s, job_id, token, "worker-a-1", claim_id="c1")
    failed = dict(succeeded=False, retryable=True, reason="exited with code 1", actor="worker-a-1", exit_code=1)
    with database.session() as s:
        assert execution.end(s, settings, job_id, token, **failed) == "pending"
        s.execute(text("UPDATE jobs SET not_before = NULL WHERE id = :id"), {"id": job_id})
        s.commit()
        assert job_id in admit(s, settings).admitted
        second_token = s.get(Job, job_id, populate_existing=True).dispatch_token
        assert execution.claim(s, job_id, second_token, "worker-a-2", claim_id="c2") is not None
    with database.session() as s:  # attempt 0's report retried late: it answers what it recorded, and changes nothing
        assert execution.end(s, settings, job_id, token, **failed) == "pending"
        job = s.get(Job, job_id)
        assert job.status == "running" and job.retry_count == 1 and job.dispatch_token == second_token and job.holds_resources


def test_a_log_batch_retried_after_its_commit_is_stored_once(api: ApiClient, database: Database) -> None:
    job = api.submit(command=["true"])
    now = utcnow()
    batch = [(now, "stdout", 0, "one"), (now, "stdout", 0, "two")]
    with database.session() as s:
        assert log_store.append_once(s, job["id"], 0, batch, retry=False)
    with database.session() as s:  # the retry of a flush whose acknowledgement was lost
        assert not log_store.append_once(s, job["id"], 0, batch, retry=True)
        assert log_store.append_once(s, job["id"], 0, [(now, "stdout", 0, "three")], retry=True)
        assert log_store.append_once(s, job["id"], 1, batch, retry=True)  # another attempt's lines are its own
    with database.session() as s:
        assert [line.line for line in log_store.tail(s, job["id"], 10)] == ["one", "two", "three", "one", "two"]


@pytest.mark.parametrize("accrual_due", [True, False], ids=["lock-alone", "lock-with-the-nodes-read"])
def test_a_pass_deletes_the_outbox_rows_published_since_the_last_one_even_when_locked_out(
        api: ApiClient, database: Database, settings: Settings, accrual_due: bool) -> None:
    """Both ways a pass takes the lock: alone, before the accrual that is due, or (none due: the scheduler's cache
    knows) in the nodes read's round trip, which then reads nothing while another pass holds the lock."""
    first, _ = admitted_job(api, database, settings)
    second, _ = admitted_job(api, database, settings)
    cache = SnapshotCache()

    def admitting(s: Session, published: list[int]) -> AdmissionResult:
        cache.accrued_at = None if accrual_due else utcnow()
        return admit(s, settings, published=published, cache=cache)

    with database.session() as s:
        rows = dict(s.execute(select(OutboxMessage.job_id, OutboxMessage.id)).tuples().all())
        api.submit(command=["true"], retry_policy={"max_retries": 1})
        waiting = s.scalar(select(Job.id).where(Job.status == "pending"))
        s.execute(text("UPDATE jobs SET not_before = now() + interval '1 hour' WHERE id = :id"), {"id": waiting})
        s.commit()
    with database.engine.connect() as holder:  # another scheduler's pass holds the admission lock
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})
        with statements_sent(database) as sent, database.session() as s:
            assert admitting(s, [rows[first]]).locked_out
        # No backlog statement of its own (the one read with the nodes is read only under the lock: test_snapshot_cache).
        assert not any("jobservice_backlog" in statement or statement.startswith("WITH RECURSIVE") for statement in sent), sent
        holder.rollback()
    with database.session() as s:
        assert dict(s.execute(select(OutboxMessage.job_id, OutboxMessage.id)).tuples().all()) == {second: rows[second]}
        result = admitting(s, [rows[second]])
        assert not result.locked_out and result.admitted == []
        assert s.scalar(select(OutboxMessage.id)) is None
        # The earliest backoff expiry: when the scheduler wakes next without being told.
        assert result.next_wakeup == s.scalar(select(Job.not_before).where(Job.id == waiting))


def test_the_scheduler_deletes_what_it_published(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    start_worker("node-a")
    start_scheduler()
    job = api.submit(command=["true"])
    wait_for(lambda: api.get(f"/jobs/{job['id']}").json()["status"] == "succeeded", 60, message="the job succeeded")

    def outbox_empty() -> bool:
        with database.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM outbox")).scalar() == 0

    # Its pass published it, and the next pass (the job's end wakes one; else one comes within half a second) deleted it.
    wait_for(outbox_empty, 30, message="the outbox emptied")


# --- no job stays queued without a worker that owns it --------------------------------------------------

def test_an_unclaimed_queued_job_returns_to_the_backlog_and_its_late_claim_is_a_no_op(api: ApiClient, database: Database, settings: Settings) -> None:
    job_id, token = admitted_job(api, database, settings)
    fresh_id, _ = admitted_job(api, database, settings)
    with database.session() as s:
        s.execute(text("UPDATE jobs SET queued_at = :at WHERE id = :id"), {"id": job_id, "at": utcnow() - timedelta(seconds=60)})
        s.commit()
        assert requeue_unclaimed(s, settings.with_overrides(claim_timeout_seconds=10)) == [job_id]
    with database.session() as s:
        job, fresh = s.get(Job, job_id), s.get(Job, fresh_id)
        assert job.status == "pending" and job.dispatch_token is None and job.node is None and not job.holds_resources
        assert job.retry_count == 0  # it never started: no retry spent
        assert fresh.status == "queued"  # within its bound: left alone
        assert s.scalar(select(OutboxMessage.id).where(OutboxMessage.job_id == job_id)) is None
        assert execution.claim(s, job_id, token, "worker-late-1", claim_id="c1") is None
    last = events(database, job_id)[-1]
    assert (last.from_status, last.to_status, last.actor) == ("queued", "pending", "system")
    assert "not claimed by a worker within 10s" in last.reason and last.details["unclaimed_seconds"] >= 60
    with database.session() as s:  # the next admission gives it a new token
        assert job_id in admit(s, settings).admitted
        new_token = s.get(Job, job_id).dispatch_token
        assert new_token and new_token != token
        assert execution.claim(s, job_id, token, "worker-late-1", claim_id="c1") is None


# --- an answer reflects what was committed --------------------------------------------------------------

def test_submit_answers_201_when_its_queue_position_cannot_be_read(api: ApiClient, database: Database) -> None:
    """The position read fails (statement cancelled) while the job's insert succeeds: 201, position null."""
    answer: dict[str, Any] = {}
    with database.engine.connect() as conn:
        locked = conn.begin()
        conn.execute(text("LOCK TABLE job_counts IN ACCESS EXCLUSIVE MODE"))  # only the position read touches it
        submit = threading.Thread(target=lambda: answer.update(response=api.post("/jobs/", json={"job_type": "t", "image": "i:1"})))
        submit.start()
        pid = wait_for(lambda: backend_pids(database, "jobservice-api", waiting_on_lock=True), 10, message="the position read")[0]
        signal_backend(database, pid, "pg_cancel_backend")
        submit.join(30)
        locked.rollback()
    response = answer["response"]
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["queue_position"] is None and body["status"] == "pending"
    with database.session() as s:
        assert s.get(Job, body["id"]) is not None
    assert api.get(f"/jobs/{body['id']}").json()["queue_position"] == 1


def test_a_request_whose_database_session_is_terminated_answers_503_in_the_envelope(api: ApiClient, database: Database) -> None:
    """A dropped connection is the database's absence, not a bug of ours: 503 with Retry-After, not 500."""
    job = api.submit()
    answer: dict[str, Any] = {}
    with database.engine.connect() as conn:
        locked = conn.begin()
        conn.execute(text("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE"))
        read = threading.Thread(target=lambda: answer.update(response=api.get(f"/jobs/{job['id']}")))
        read.start()
        # The request's own session: its statement names the job (other API sessions may be waiting too).
        reading = lambda: backend_pids(database, "jobservice-api", waiting_on_lock=True, query_like=f"%{job['id']}%")  # noqa: E731
        pid = wait_for(reading, 10, message="the API's read")[0]
        signal_backend(database, pid)
        read.join(30)
        locked.rollback()
    response = answer["response"]
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert api.get(f"/jobs/{job['id']}").status_code == 200  # the pool replaced the dead connection


def test_the_outbox_sweep_publishes_outside_any_transaction_and_survives_a_row_published_meanwhile(
    api: ApiClient, database: Database, settings: Settings
) -> None:
    """The sweep reads the stale messages, ends its read, then publishes. Another publisher (the admitting
    scheduler's own publish) may delete a row meanwhile: that message goes out twice, which the claim's
    compare-and-set ignores, and the sweep must neither fail nor reopen a transaction per message."""
    from app.dispatch import publish_stale

    register(database, slots=2)
    jobs = [api.submit(command=["true"])["id"] for _ in range(2)]
    with database.session() as s:
        assert sorted(admit(s, settings).admitted) == sorted(jobs)
        s.execute(text("UPDATE outbox SET created_at = created_at - interval '1 hour'"))
        s.commit()
        queued = {row.job_id: row.id for row in s.scalars(select(OutboxMessage))}

    sweep = database.sessions()
    published: list[tuple[str, bool]] = []

    class Publisher:
        def publish(self, task_name: str, queue: str, args: list[object]) -> None:
            published.append((str(args[0]), sweep.in_transaction()))
            if len(published) == 1:  # the other publisher: it sent the rest and deleted their rows
                with database.session() as other:
                    other.execute(text("DELETE FROM outbox"))
                    other.commit()

    try:
        assert publish_stale(sweep, Publisher(), settings) == 2
    finally:
        sweep.close()
    assert sorted(job_id for job_id, _ in published) == sorted(queued)
    assert not any(in_transaction for _, in_transaction in published), published
    with database.session() as s:
        assert s.scalars(select(OutboxMessage)).all() == []


def test_every_session_of_the_service_runs_without_jit(database: Database) -> None:
    with database.engine.connect() as conn:
        assert conn.execute(text("SHOW jit")).scalar() == "off"
    with database.session() as session:
        assert session.execute(text("SHOW jit")).scalar() == "off"


def test_a_prepared_statement_is_prepared_once_per_database_session_and_again_on_a_new_one(
        settings: Settings, database: Database) -> None:
    """app.db.Prepared (the scheduler's pass, the submit's INSERT): PREPAREd the first time a pooled connection runs it,
    then EXECUTEd by name, also after a rolled-back transaction (PREPARE is not undone by it); a connection that died
    is replaced, and the statement is prepared again on the new session instead of failing as unknown."""
    from sqlalchemy import event

    from app.db import Prepared

    with pytest.raises(ValueError, match="untyped parameters"):
        Prepared("test_untyped", "SELECT :a + :b", {"a": "int"})
    double = Prepared("test_double", "SELECT CAST(:n AS bigint) * 2 AS doubled, :label AS label", {"n": "bigint", "label": "text"})
    pooled = Database(settings.database_url or "", pool_size=1, application_name="test-prepared")
    sent: list[str] = []
    event.listen(pooled.engine, "before_cursor_execute", lambda _c, _cur, statement, *_: sent.append(statement.split()[0]))
    try:
        with pooled.session() as session:
            assert double.execute(session, {"n": 21, "label": "a"}).one() == (42, "a")
            session.rollback()
            assert double.execute(session, {"n": 5, "label": "b"}).one() == (10, "b")
        with pooled.session() as session:  # the same pooled connection
            assert double.execute(session, {"n": 1, "label": "c"}).one() == (2, "c")
        assert sent.count("PREPARE") == 1 and sent.count("EXECUTE") == 3, sent
        pid = backend_pids(database, "test-prepared")[0]
        signal_backend(database, pid)
        with pooled.session() as session:  # pinged at checkout: the dead session is replaced
            assert double.execute(session, {"n": 3, "label": "d"}).one() == (6, "d")
        assert sent.count("PREPARE") == 2, sent
    finally:
        pooled.dispose()


_PROTOCOL_3 = 196608  # the startup message's protocol version field for 3.0


class QueryCountingProxy:
    """A TCP proxy in front of the real PostgreSQL that counts the simple-query ('Q') messages its clients send: each
    is a round trip psycopg2 waits on, whether SQLAlchemy sent it or psycopg2 itself did (a SET it owes the server)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.queries: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(server, client, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, server, bytearray()), daemon=True).start()

    def _pipe(self, source: Any, sink: Any, frontend: bytearray | None) -> None:
        # Untyped messages first (an SSL or GSSAPI encryption request, then the startup message, protocol 3.0); every
        # frontend message after the startup message starts with its type byte.
        started = False
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                if frontend is None:
                    continue
                frontend += chunk
                while True:
                    if not started:
                        if len(frontend) < 4 or len(frontend) < int.from_bytes(frontend[:4], "big"):
                            break
                        size = int.from_bytes(frontend[:4], "big")
                        started = int.from_bytes(frontend[4:8], "big") == _PROTOCOL_3
                        del frontend[:size]
                        continue
                    if len(frontend) < 5 or len(frontend) < 1 + int.from_bytes(frontend[1:5], "big"):
                        break
                    size = 1 + int.from_bytes(frontend[1:5], "big")
                    if frontend[:1] == b"Q":
                        self.queries.append(bytes(frontend[5:size]).rstrip(b"\0"))
                    del frontend[:size]
        except OSError:
            pass
        finally:
            # shutdown before close: the other direction's thread may be blocked in recv on one of them, and a close
            # alone neither wakes it nor sends the peer its end of stream (a client would wait for an answer forever).
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    end.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_a_one_statement_autocommit_transaction_is_one_round_trip_and_leaves_the_connection_as_it_was(settings: Settings) -> None:
    """Issue 14: the worker's claim and end run in autocommit (app.db.autocommit_connection). psycopg2 switched back
    with `SET default_transaction_isolation TO DEFAULT`, a round trip before the connection's next statement: each
    one-statement transaction took two. Now only the statement goes, and the next transaction on the pooled connection
    is a plain one (BEGIN, in the server's default isolation)."""
    from sqlalchemy.engine import make_url

    from app.db import autocommit_connection

    url = make_url(settings.database_url or "")
    proxy = QueryCountingProxy(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port, query={**url.query, "sslmode": "disable", "gssencmode": "disable"})
    # Not pinged at checkout (a pre-ping is a round trip of its own, and the one the workers' pool skips too).
    database = Database(proxied.render_as_string(hide_password=False), pool_size=1, ping_idle_after=3600)
    try:
        with database.session() as s:  # connects: the dialect's own first statements, not counted
            s.execute(text("SELECT 1"))
        proxy.queries.clear()
        for n in range(3):
            with database.session() as s:
                assert autocommit_connection(s).execute(text(f"SELECT {n}")).scalar() == n
        with database.session() as s:
            assert s.execute(text("SELECT current_setting('transaction_isolation')")).scalar() == "read committed"
            assert s.connection().connection.dbapi_connection.autocommit is False
        sent = [q.decode() for q in proxy.queries]
        assert sent[:3] == ["SELECT 0", "SELECT 1", "SELECT 2"], sent
        assert sent[3:] == ["BEGIN", "SELECT current_setting('transaction_isolation')", "ROLLBACK"], sent
    finally:
        database.dispose()
        proxy.close()
