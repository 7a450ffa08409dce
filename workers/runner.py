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

from app.db import Database
from app.domain import execution, logs as log_store
from app.domain.execution import ClaimedJob
from config import Settings
from workers.executors.base import EndKind, Executor, JobSpec, LogLine, Outcome

log = logging.getLogger("jobservice.worker")

POLL_SECONDS = 0.05
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
            log.info("ignoring stale or duplicate delivery", extra={"job_id": job_id})
            return "ignored"
        log.info("running attempt %d", job.attempt, extra={"job_id": job_id, "worker_id": self.worker_id})
        writer = LogWriter(self.database, job.job_id, job.attempt)
        try:
            outcome = self._watch(job, dispatch_token, writer)
        finally:
            writer.close()
        return self._report(job, dispatch_token, outcome)

    def _watch(self, job: ClaimedJob, dispatch_token: str, writer: LogWriter) -> Outcome:
        handle = self.executor.launch(to_spec(job), writer)
        last_check = last_heartbeat = time.monotonic()
        while True:
            outcome = handle.poll()
            if outcome is not None:
                return outcome
            now = time.monotonic()
            if now - last_check >= STATUS_CHECK_SECONDS:
                last_check = now
                beat = now - last_heartbeat >= self.settings.job_heartbeat_seconds
                if beat:
                    last_heartbeat = now
                try:
                    with self.database.session() as session:
                        owned = execution.still_running(session, job.job_id, dispatch_token, heartbeat=beat)
                except Exception:  # noqa: BLE001 - a database blip must not kill a running job
                    log.exception("status check failed", extra={"job_id": job.job_id})
                    owned = True
                if not owned:
                    handle.cancel(EndKind.CANCELLED, "cancelled")
            time.sleep(POLL_SECONDS)

    def _report(self, job: ClaimedJob, dispatch_token: str, outcome: Outcome) -> str:
        details = {"end": outcome.kind.value, **outcome.details}
        with self.database.session() as session:
            status = execution.end(
                session, self.settings, job.job_id, dispatch_token,
                succeeded=outcome.succeeded, retryable=outcome.retryable, reason=outcome.reason,
                actor=self.worker_id, exit_code=outcome.exit_code, details=details,
            )
        log.info("attempt %d ended: %s -> %s", job.attempt, outcome.reason, status, extra={"job_id": job.job_id})
        return status


def to_spec(job: ClaimedJob) -> JobSpec:
    return JobSpec(**dataclasses.asdict(job))
