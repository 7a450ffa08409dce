"""The service's database sessions are terminated (pg_terminate_backend) under real workers and a real scheduler.

Each window is made deterministic with a PostgreSQL lock the test holds: the worker's statement waits on
it, the test terminates exactly that session, then lets go. Commands record start and end with $JOB_ID.
"""
from __future__ import annotations

import logging
import random
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import text

from app.db import Database
from app.dispatch import CeleryPublisher, publish
from app.domain.scheduling import admit
from app.models import Job
from config import Settings
from tests.conftest import ApiClient, wait_for, wait_for_status
from tests.test_db_resilience import backend_pids, events, register, signal_backend

WORKER = "jobservice-worker/%"


def recorder(record: Path, body: str = "") -> list[str]:
    """A command that appends `start <job> <attempt>` and `end <job> <attempt>` around `body`."""
    mark = f'echo "%s $JOB_ID $JOB_ATTEMPT" >> {record}'
    return ["sh", "-c", f"{mark % 'start'}; {body} {mark % 'end'}"]


def records(record: Path) -> list[tuple[str, str, str]]:
    return [tuple(line.split()) for line in record.read_text().splitlines()] if record.exists() else []  # type: ignore[misc]


class Lock:
    """A transaction of the test's holding a PostgreSQL lock until released."""

    def __init__(self, database: Database, statement: str, **params: Any) -> None:
        self.conn = database.engine.connect()
        self.transaction = self.conn.begin()
        self.conn.execute(text(statement), params)

    def release(self) -> None:
        self.transaction.rollback()
        self.conn.close()


def terminate_waiting(database: Database, query_like: str, application: str = WORKER) -> int:
    """Terminate the session whose statement waits on the test's lock; returns its pid."""
    pid = wait_for(
        lambda: backend_pids(database, application, waiting_on_lock=True, query_like=query_like), 15,
        message=f"a session of {application} waiting on the lock in {query_like}",
    )[0]
    signal_backend(database, pid)
    return pid


def test_a_session_dropped_during_the_claim_does_not_leave_the_job_queued(
    api: ApiClient, start_worker, database: Database, e2e_settings: Settings, tmp_path: Path
) -> None:
    start_worker("node-a")
    record = tmp_path / "record"
    job = api.submit(command=recorder(record))
    with database.session() as s:  # admitted as the scheduler does; its task is sent once the row is locked
        result = admit(s, e2e_settings)
        assert result.admitted == [job["id"]]
    lock = Lock(database, "SELECT 1 FROM jobs WHERE id = :id FOR UPDATE", id=job["id"])
    try:
        publisher = CeleryPublisher(e2e_settings)
        with database.session() as s:
            assert publish(s, publisher, result.messages) == 1
        publisher.close()
        terminate_waiting(database, "%EXECUTE jobservice_claim%")  # the claim's transaction dies (its prepared statement)
    finally:
        lock.release()
    done = wait_for_status(api, job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["status"] == "succeeded"
    assert [e.to_status for e in events(database, job["id"])] == ["pending", "queued", "running", "succeeded"]
    assert records(record) == [("start", job["id"], "0"), ("end", job["id"], "0")]


def test_sessions_dropped_during_log_writes_and_heartbeats_lose_nothing(
    api: ApiClient, start_worker, start_scheduler, database: Database, tmp_path: Path
) -> None:
    start_worker("node-a")
    start_scheduler()
    go = tmp_path / "go"
    job = api.submit(command=["sh", "-c", f'i=0; while [ ! -e {go} ]; do i=$((i+1)); echo "line $i"; sleep 0.02; done; echo last'])
    wait_for_status(api, job["id"], "running")
    logs = lambda: api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines()  # noqa: E731
    wait_for(lambda: len(logs()) >= 5, 15, message="first lines stored")
    for _ in range(2):
        lock = Lock(database, "LOCK TABLE job_log_lines IN SHARE MODE")  # a log write waits: its session is ended
        try:
            terminate_waiting(database, "INSERT INTO job_log_lines%")
        finally:
            lock.release()
        lock = Lock(database, "SELECT 1 FROM jobs WHERE id = :id FOR UPDATE", id=job["id"])  # so does a heartbeat
        try:
            terminate_waiting(database, "UPDATE jobs SET heartbeat_at%")
        finally:
            lock.release()
    go.touch()
    done = wait_for_status(api, job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["status"] == "succeeded" and done["retry_count"] == 0
    lines = logs()
    assert lines[-1] == "last"
    assert lines[:-1] == [f"line {i}" for i in range(1, len(lines))], "log lines lost or stored twice"
    assert [e.to_status for e in events(database, job["id"])].count("running") == 1


def test_a_session_dropped_during_the_end_report_neither_reruns_nor_fails_a_finished_job(
    api: ApiClient, start_worker, start_scheduler, database: Database, tmp_path: Path
) -> None:
    start_worker("node-a")
    start_scheduler()
    record, go = tmp_path / "record", tmp_path / "go"
    job = api.submit(command=recorder(record, f"while [ ! -e {go} ]; do sleep 0.05; done;"), retry_policy={"max_retries": 0})
    wait_for(lambda: records(record), 20, message="the job to start")
    lock = Lock(database, "SELECT 1 FROM jobs WHERE id = :id FOR UPDATE", id=job["id"])
    try:
        go.touch()
        terminate_waiting(database, "%EXECUTE jobservice_succeed%")  # the end report's transaction dies (its prepared statement)
    finally:
        lock.release()
    done = wait_for_status(api, job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["status"] == "succeeded", done
    assert [e.to_status for e in events(database, job["id"])] == ["pending", "queued", "running", "succeeded"]
    assert records(record) == [("start", job["id"], "0"), ("end", job["id"], "0")]


def test_a_worker_retrying_its_end_report_keeps_the_lease_and_records_the_outcome(
    api: ApiClient, start_worker, start_scheduler, database: Database, tmp_path: Path
) -> None:
    """For 5 s (longer than the 3 s lease) every try of the end report loses its session: a trigger ends
    the worker session that writes the attempt's end event. Heartbeats still get through, so the scheduler
    does not declare the worker lost (which, with max_retries 0, would fail a job that succeeded)."""
    worker = start_worker("node-a")
    start_scheduler()
    record, go = tmp_path / "record", tmp_path / "go"
    job = api.submit(command=recorder(record, f"while [ ! -e {go} ]; do sleep 0.05; done;"), retry_policy={"max_retries": 0})
    wait_for(lambda: records(record), 20, message="the job to start")
    with database.engine.begin() as conn:
        until = conn.execute(text("SELECT (clock_timestamp() + interval '5 seconds')::text")).scalar()
        conn.execute(text(
            "CREATE OR REPLACE FUNCTION test_drop_end_report() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.job_id = TG_ARGV[0] AND NEW.from_status = 'running' AND clock_timestamp() < TG_ARGV[1]::timestamptz"
            " AND current_setting('application_name') LIKE 'jobservice-worker/%'"
            " THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; RETURN NEW; END $$"
        ))
        conn.execute(text(
            f"CREATE TRIGGER test_drop_end_report BEFORE INSERT ON job_events FOR EACH ROW"
            f" EXECUTE FUNCTION test_drop_end_report('{job['id']}', '{until}')"
        ))
    try:
        go.touch()
        done = wait_for_status(api, job["id"], {"succeeded", "failed"}, timeout=40)
    finally:
        with database.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS test_drop_end_report ON job_events"))
            conn.execute(text("DROP FUNCTION IF EXISTS test_drop_end_report()"))
    assert done["status"] == "succeeded", done
    assert [e.to_status for e in events(database, job["id"])] == ["pending", "queued", "running", "succeeded"]
    assert records(record) == [("start", job["id"], "0"), ("end", job["id"], "0")]
    log = worker.log_path.read_text()
    assert "recording the end of attempt 0: database connection lost" in log, "the fault window was missed"


def test_a_job_whose_task_never_arrives_is_admitted_again(
    api: ApiClient, start_worker, start_scheduler, database: Database, e2e_settings: Settings, tmp_path: Path
) -> None:
    start_worker("node-a")
    record = tmp_path / "record"
    job = api.submit(command=recorder(record))
    with database.session() as s:  # admitted, then the broker "loses" the message: nothing will claim it
        assert admit(s, e2e_settings).admitted == [job["id"]]
        first_token = s.get(Job, job["id"]).dispatch_token
        s.execute(text("DELETE FROM outbox"))
        s.commit()
    start_scheduler(CLAIM_TIMEOUT_SECONDS="1")
    done = wait_for_status(api, job["id"], {"succeeded", "failed"}, timeout=30)
    assert done["status"] == "succeeded"
    timeline = events(database, job["id"])
    assert [e.to_status for e in timeline] == ["pending", "queued", "pending", "queued", "running", "succeeded"]
    assert "not claimed by a worker within 1s" in timeline[2].reason
    with database.session() as s:
        assert s.get(Job, job["id"]).dispatch_token != first_token
    assert records(record) == [("start", job["id"], "0"), ("end", job["id"], "0")]


def test_repeated_session_drops_under_load(api: ApiClient, start_worker, start_scheduler, database: Database, tmp_path: Path) -> None:
    """A short chaos run: every session of the workers and the scheduler is ended every 50 to 400 ms while jobs run.

    The interval is random, not a fixed 50 ms: on a loaded 2-core host a fixed period shorter than one
    reconnect plus transaction ends every try (a livelock of the drill, not of the service)."""
    timings = {"JOB_LEASE_SECONDS": "5"}
    start_worker("node-a", concurrency=3, **timings)
    start_worker("node-b", concurrency=3, **timings)
    start_scheduler(**timings)
    record = tmp_path / "record"
    stop = threading.Event()
    dropped = [0]

    def drop_sessions() -> None:
        while not stop.wait(random.uniform(0.05, 0.4)):
            for application in (WORKER, "jobservice-scheduler"):
                for pid in backend_pids(database, application):
                    with database.engine.connect() as conn:
                        dropped[0] += bool(conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar())

    submitted = [
        api.submit(command=recorder(record, "sleep 0.2;"), retry_policy={"max_retries": i % 2}, priority=(i * 37) % 100)
        for i in range(24)
    ]
    killer = threading.Thread(target=drop_sessions, daemon=True)
    killer.start()
    try:
        wait_for(lambda: len([r for r in records(record) if r[0] == "end"]) >= 16, 120, message="most jobs to run")
    finally:
        stop.set()
        killer.join(10)
    finished = {job["id"]: wait_for_status(api, job["id"], {"succeeded", "failed", "cancelled"}, timeout=60) for job in submitted}
    assert dropped[0] >= 10, "the drill did not drop sessions"
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    for kind, job_id, _ in records(record):
        (starts if kind == "start" else ends)[job_id] = (starts if kind == "start" else ends).get(job_id, 0) + 1
    retries = {job["id"]: i % 2 for i, job in enumerate(submitted)}
    for job_id, done in finished.items():
        assert done["status"] == "succeeded", done  # every command succeeds; a session drop must not change that
        assert ends.get(job_id, 0) >= 1, (job_id, "succeeded without its command's end")
        assert starts[job_id] <= 1 + retries[job_id], (job_id, starts[job_id])
        if retries[job_id] == 0:
            assert starts[job_id] == 1 and done["retry_count"] == 0


def test_the_scheduler_reconnects_its_listen_session_with_one_warning(api: ApiClient, start_scheduler, database: Database) -> None:
    records_seen: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records_seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("jobservice.scheduler")
    logger.addHandler(handler)
    try:
        register(database)  # a node (no worker): an admitted job just stays queued
        start_scheduler(SCHEDULER_INTERVAL_SECONDS="30")  # only NOTIFY wakes it in time
        listen = lambda: backend_pids(database, "jobservice-scheduler", query_like="LISTEN%")  # noqa: E731
        old = wait_for(listen, 10, message="the LISTEN session")
        signal_backend(database, old[0])
        wait_for(lambda: listen() and listen() != old, 10, message="a new LISTEN session")
        job = api.submit(command=["true"])
        wait_for_status(api, job["id"], "queued", timeout=10)  # admitted at once: the new session hears NOTIFY
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records_seen if r.levelno == logging.WARNING and "LISTEN" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None, [r.getMessage() for r in records_seen]
    assert not [r for r in records_seen if r.levelno >= logging.ERROR], [r.getMessage() for r in records_seen]
