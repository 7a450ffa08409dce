"""Running one attempt of a job: claim it, launch it, watch it, report how it ended.

The task that calls this was acknowledged when it started (no acks_late), so the broker never
redelivers a long job; the job's lease (heartbeats in PostgreSQL) is what detects a dead worker.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from app.db import Database
from app.domain import execution, logs as log_store
from app.domain.execution import ClaimedJob
from app.domain.jobs import utcnow
from config import Settings
from workers.executors.base import EndKind, Execution, Executor, JobSpec, LogLine, LogSink, Outcome
from workers.log_budget import LogBudget

log = logging.getLogger("jobservice.worker")

# Short jobs are noticed at once, long ones cost little: the poll interval grows from 5 ms to 100 ms.
FIRST_POLL_SECONDS = 0.005
MAX_POLL_SECONDS = 0.1
STATUS_CHECK_SECONDS = 1.0
LOG_FLUSH_SECONDS = 0.2
LOG_FLUSH_LINES = 500


class LogWriter:
    """Collects lines from the executor's threads and stores them in batches."""

    def __init__(self, database: Database, job_id: str, attempt: int) -> None:
        self.database = database
        self.job_id = job_id
        self.attempt = attempt
        self._pending: list[LogLine] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._run, daemon=True)
        self._flusher.start()

    def __call__(self, lines: list[LogLine]) -> None:
        with self._lock:
            self._pending.extend(lines)
            full = len(self._pending) >= LOG_FLUSH_LINES
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            with self.database.session() as session:
                log_store.append(session, self.job_id, self.attempt, [(l.at, l.stream, l.member, l.line) for l in batch])

    def _run(self) -> None:
        while not self._stop.wait(LOG_FLUSH_SECONDS):
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep the lines; the next flush retries
                log.exception("storing log lines failed", extra={"job_id": self.job_id})

    def close(self) -> None:
        self._stop.set()
        self._flusher.join()
        self.flush()


class Lease(threading.Thread):
    """Renews a running attempt's lease in PostgreSQL and notices when the attempt no longer owns the job."""

    def __init__(self, database: Database, job_id: str, dispatch_token: str, heartbeat_seconds: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.database = database
        self.job_id = job_id
        self.dispatch_token = dispatch_token
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_heartbeat = time.monotonic()
        while not self._stop_event.wait(min(STATUS_CHECK_SECONDS, self.heartbeat_seconds)):
            now = time.monotonic()
            beat = now - last_heartbeat >= self.heartbeat_seconds
            try:
                with self.database.session() as session:
                    owned = execution.still_running(session, self.job_id, self.dispatch_token, heartbeat=beat)
            except Exception:  # noqa: BLE001 - a database blip must not stop a running job
                log.exception("lease renewal failed", extra={"job_id": self.job_id})
                continue
            if beat:
                last_heartbeat = now
            if not owned:
                self.lost.set()
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@dataclass
class Runner:
    settings: Settings
    database: Database
    executor: Executor
    worker_id: str

    def run(self, job_id: str, dispatch_token: str) -> str:
        with self.database.session() as session:
            job = execution.claim(session, job_id, dispatch_token, self.worker_id)
        if job is None:
            log.info("ignoring stale or duplicate delivery", extra={"job_id": job_id, "worker_id": self.worker_id})
            return "ignored"
        log.info("running attempt %d", job.attempt, extra={"job_id": job_id, "worker_id": self.worker_id})
        writer = LogWriter(self.database, job.job_id, job.attempt)
        logs = LogBudget.start(writer, self.settings, job.attempt)
        try:
            outcome = self._watch(job, dispatch_token, logs)
        finally:
            logs.close()
            writer.close()
        return self._report(job, dispatch_token, outcome)

    def adopt(self, job_id: str, dispatch_token: str) -> str:
        """Take over a running job whose worker went silent (a restart): watch its execution again."""
        silent_since = utcnow() - timedelta(seconds=2 * self.settings.job_heartbeat_seconds)
        with self.database.session() as session:
            job = execution.take_over(session, job_id, dispatch_token, self.worker_id, silent_since)
            logs_since = log_store.last_line_at(session, job_id, job.attempt) if job else None
            logs_used = log_store.attempt_usage(session, job_id, job.attempt) if job else (0, 0)
        adopt = getattr(self.executor, "adopt", None)
        if job is None or adopt is None:
            return "ignored"
        log.info("re-adopting attempt %d", job.attempt, extra={"job_id": job_id, "worker_id": self.worker_id})
        writer = LogWriter(self.database, job.job_id, job.attempt)
        logs = LogBudget(writer, self.settings, *logs_used)
        try:
            handle = adopt(to_spec(job), logs, logs_since=logs_since)
            if handle is None:
                outcome = Outcome(EndKind.LOST, "its execution vanished while no worker watched it")
            else:
                outcome = self._watch(job, dispatch_token, logs, handle)
        finally:
            logs.close()
            writer.close()
        return self._report(job, dispatch_token, outcome)

    def _watch(self, job: ClaimedJob, dispatch_token: str, writer: LogSink, handle: Execution | None = None) -> Outcome:
        # The lease is kept by its own thread: an executor's poll may block a while (draining a pod's
        # last log lines) and the job must not look abandoned meanwhile.
        lease = Lease(self.database, job.job_id, dispatch_token, self.settings.job_heartbeat_seconds)
        lease.start()
        try:
            handle = handle or self.executor.launch(to_spec(job), writer)
            stopping = False
            interval = FIRST_POLL_SECONDS
            while True:
                outcome = handle.poll()
                if outcome is not None:
                    return outcome
                if lease.lost.is_set() and not stopping:
                    stopping = True  # cancelled, or taken over: stop everything it started
                    handle.cancel(EndKind.CANCELLED, "cancelled")
                time.sleep(interval)
                interval = min(MAX_POLL_SECONDS, interval * 1.5)
        finally:
            lease.stop()

    def _report(self, job: ClaimedJob, dispatch_token: str, outcome: Outcome) -> str:
        details = {"end": outcome.kind.value, **outcome.details}
        with self.database.session() as session:
            status = execution.end(
                session, self.settings, job.job_id, dispatch_token,
                succeeded=outcome.succeeded, retryable=outcome.retryable, reason=outcome.reason,
                actor=self.worker_id, exit_code=outcome.exit_code, details=details,
                requeue=outcome.kind == EndKind.UNPLACED,
            )
        log.info("attempt %d ended: %s -> %s", job.attempt, outcome.reason, status, extra={"job_id": job.job_id, "worker_id": self.worker_id})
        return status


def to_spec(job: ClaimedJob) -> JobSpec:
    return JobSpec(**dataclasses.asdict(job))
