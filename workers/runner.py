"""Running one attempt of a job: claim it, launch it, watch it, report how it ended.

The task that calls this was acknowledged when it started (no acks_late), so the broker never
redelivers a long job; the job's lease (heartbeats in PostgreSQL) is what detects a dead worker.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.db import Database, first_line, is_connection_error
from app.domain import execution, logs as log_store, nodes
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
LOG_RETRY_SECONDS = 2.0  # a flush gives up after this; its lines stay for the next one
LOG_FAILURES_PER_WARNING = 20  # a long outage logs one line per this many failures, not one per try
REPORT_MAX_BACKOFF_SECONDS = 5.0
LAZY_LEASE_SECONDS = 0.5  # a local job's lease thread starts once the job has run this long


class LogWriter:
    """Collects lines from the executor's threads and stores them in batches.

    A batch that meets a dropped connection is kept and stored by a later flush, once; a batch the
    database refuses for another reason is dropped (and logged) so that it cannot block the lines after it.
    """

    def __init__(self, database: Database, job_id: str, attempt: int) -> None:
        self.database = database
        self.job_id = job_id
        self.attempt = attempt
        self._pending: list[LogLine] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time keeps the lines in order
        self._failures = 0
        self._stop = threading.Event()
        # Started with the first lines: a job that prints nothing (most short jobs) costs no thread.
        self._flusher: threading.Thread | None = None

    def __call__(self, lines: list[LogLine]) -> None:
        with self._lock:
            self._pending.extend(lines)
            full = len(self._pending) >= LOG_FLUSH_LINES
            if self._flusher is None and not self._stop.is_set():
                self._flusher = threading.Thread(target=self._run, daemon=True)
                self._flusher.start()
        if full:
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the lines are kept; the flusher thread retries and logs
                pass

    def flush(self, give_up_after: float | None = LOG_RETRY_SECONDS) -> None:
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            rows = [(l.at, l.stream, l.member, l.line) for l in batch]
            tries = 0

            def store(session: Session) -> None:
                nonlocal tries
                tries += 1
                # A try after a dropped connection may follow one that committed unacknowledged.
                log_store.append_once(session, self.job_id, self.attempt, rows, retry=tries > 1)

            try:
                self.database.retrying(store, what="storing log lines", give_up_after=give_up_after,
                                       quiet=give_up_after is not None, log_every=LOG_FAILURES_PER_WARNING,
                                       extra={"job_id": self.job_id})
            except Exception as exc:
                if is_connection_error(exc):
                    with self._lock:
                        self._pending[:0] = batch
                    raise
                log.exception("storing %d log lines failed; they are dropped", len(batch), extra={"job_id": self.job_id})

    def _run(self) -> None:
        while not self._stop.wait(LOG_FLUSH_SECONDS):
            try:
                self.flush()
                self._failures = 0
            except Exception as exc:  # noqa: BLE001 - the lines are kept; the next flush retries
                self._failures += 1
                if self._failures % LOG_FAILURES_PER_WARNING == 1:
                    log.warning("storing log lines failed %d times; kept for the next flush: %s", self._failures,
                                first_line(exc), extra={"job_id": self.job_id})

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            flusher = self._flusher
        if flusher is not None:
            flusher.join()
        self.flush(give_up_after=None)  # while this worker lives, its lines are stored before the attempt's end


class Lease(threading.Thread):
    """Renews a running attempt's lease in PostgreSQL and notices when the attempt no longer owns the job."""

    def __init__(self, database: Database, job_id: str, dispatch_token: str, heartbeat_seconds: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.database = database
        self.job_id = job_id
        self.dispatch_token = dispatch_token
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = threading.Event()
        # Set once a node the attempt runs on drains and its deadline has passed (app.domain.nodes).
        self.drain = threading.Event()
        self._stop_event = threading.Event()
        self._since = time.monotonic()  # the claim: it renewed the lease (heartbeat_at) at this time
        self._start_lock = threading.Lock()

    def ensure_started(self) -> None:
        """Start the thread if it is not running yet (idempotent; never after stop)."""
        with self._start_lock:
            if not self.is_alive() and self.ident is None and not self._stop_event.is_set():
                self.start()

    def run(self) -> None:
        # Started late (a job that ran past LAZY_LEASE_SECONDS): the first check comes when it would have.
        last_heartbeat = self._since
        first = max(0.0, min(STATUS_CHECK_SECONDS, self.heartbeat_seconds) - (time.monotonic() - self._since))
        failures = 0
        while not self._stop_event.wait(first if first is not None else min(STATUS_CHECK_SECONDS, self.heartbeat_seconds)):
            first = None
            now = time.monotonic()
            beat = now - last_heartbeat >= self.heartbeat_seconds
            try:
                owned, deadline = self.database.retrying(
                    lambda session: nodes.lease_check(session, self.job_id, self.dispatch_token, heartbeat=beat),
                    what="lease renewal", give_up_after=self.heartbeat_seconds, quiet=True, extra={"job_id": self.job_id},
                )
            except Exception as exc:  # noqa: BLE001 - a database blip must not stop a running job
                failures += 1
                if is_connection_error(exc):
                    if failures % LOG_FAILURES_PER_WARNING == 1:
                        log.warning("lease renewal failed %d times: %s", failures, first_line(exc), extra={"job_id": self.job_id})
                else:
                    log.exception("lease renewal failed", extra={"job_id": self.job_id})
                continue
            failures = 0
            if beat:
                last_heartbeat = now
            if not owned:
                self.lost.set()
                return
            if deadline is not None and deadline <= utcnow():
                self.drain.set()

    def stop(self) -> None:
        with self._start_lock:
            self._stop_event.set()
        if self.ident is not None:
            self.join(timeout=5)


@dataclass
class Runner:
    settings: Settings
    database: Database
    executor: Executor
    worker_id: str

    def run(self, job_id: str, dispatch_token: str) -> str:
        claim_id = secrets.token_hex(8)
        try:
            job = self.database.retrying(
                lambda session: execution.claim(session, job_id, dispatch_token, self.worker_id, claim_id=claim_id),
                what="claim", give_up_after=self.settings.claim_timeout_seconds,
                extra={"job_id": job_id, "worker_id": self.worker_id},
            )
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            # Unclaimed, it holds no worker: the scheduler returns it to the backlog (CLAIM_TIMEOUT_SECONDS).
            log.error("could not claim the job: %s", first_line(exc), extra={"job_id": job_id, "worker_id": self.worker_id})
            return "unclaimed"
        if job is None:
            log.info("ignoring stale or duplicate delivery", extra={"job_id": job_id, "worker_id": self.worker_id})
            return "ignored"
        log.info("running attempt %d", job.attempt, extra={"job_id": job_id, "worker_id": self.worker_id})
        # The lease lives until the end is recorded: a worker retrying its report is not a lost worker.
        # Its thread starts once the job has run LAZY_LEASE_SECONDS (or the report must retry): a job of a
        # few milliseconds needs no renewal (the claim renewed it) and costs no thread.
        lease = self._lease(job, dispatch_token, lazy=self._quick_polls)
        try:
            writer = LogWriter(self.database, job.job_id, job.attempt)
            logs = LogBudget.start(writer, self.settings, job.attempt)
            try:
                outcome = self._watch(job, dispatch_token, logs, lease)
            finally:
                logs.close()
                writer.close()
            return self._report(job, dispatch_token, outcome, lease)
        finally:
            lease.stop()

    def adopt(self, job_id: str, dispatch_token: str) -> str:
        """Take over a running job whose worker went silent (a restart): watch its execution again."""
        silent_since = utcnow() - timedelta(seconds=2 * self.settings.job_heartbeat_seconds)

        def take_over(session: Session) -> tuple[ClaimedJob | None, datetime | None, tuple[int, int]]:
            job = execution.take_over(session, job_id, dispatch_token, self.worker_id, silent_since)
            if job is None:
                return None, None, (0, 0)
            return job, log_store.last_line_at(session, job_id, job.attempt), log_store.attempt_usage(session, job_id, job.attempt)

        job, logs_since, logs_used = self.database.retrying(
            take_over, what="adoption", extra={"job_id": job_id, "worker_id": self.worker_id}
        )
        adopt = getattr(self.executor, "adopt", None)
        if job is None or adopt is None:
            return "ignored"
        log.info("re-adopting attempt %d", job.attempt, extra={"job_id": job_id, "worker_id": self.worker_id})
        lease = self._lease(job, dispatch_token)
        try:
            writer = LogWriter(self.database, job.job_id, job.attempt)
            # A re-adopted attempt continues the budget its earlier watcher used.
            logs = LogBudget(writer, self.settings, *logs_used)
            try:
                handle = adopt(to_spec(job), logs, logs_since=logs_since)
                if handle is None:
                    outcome = Outcome(EndKind.LOST, "its execution vanished while no worker watched it")
                else:
                    outcome = self._watch(job, dispatch_token, logs, lease, handle)
            finally:
                logs.close()
                writer.close()
            return self._report(job, dispatch_token, outcome)
        finally:
            lease.stop()

    @property
    def _quick_polls(self) -> bool:
        # Only the local executor's poll never blocks, so that the watch loop itself can start the lease's
        # thread in time; another executor's poll may block a while (draining a pod's last log lines).
        return getattr(self.executor, "name", None) == "local"

    def _lease(self, job: ClaimedJob, dispatch_token: str, *, lazy: bool = False) -> Lease:
        # The lease is kept by its own thread: an executor's poll may block a while (draining a pod's
        # last log lines) and the job must not look abandoned meanwhile.
        lease = Lease(self.database, job.job_id, dispatch_token, self.settings.job_heartbeat_seconds)
        if not lazy:
            lease.start()
        return lease

    def _watch(self, job: ClaimedJob, dispatch_token: str, logs: LogSink, lease: Lease, handle: Execution | None = None) -> Outcome:
        handle = handle or self.executor.launch(to_spec(job), logs)
        stopping = False
        interval = FIRST_POLL_SECONDS
        # An execution that can wait for its processes returns as soon as one ends, instead of sleeping the interval.
        wait = getattr(handle, "wait", time.sleep)
        began = time.monotonic()
        while True:
            outcome = handle.poll()
            if outcome is not None:
                return outcome
            if time.monotonic() - began >= LAZY_LEASE_SECONDS:
                lease.ensure_started()
            if lease.lost.is_set() and not stopping:
                stopping = True  # cancelled, or taken over: stop everything it started
                handle.cancel(EndKind.CANCELLED, "cancelled")
            elif lease.drain.is_set() and not stopping:
                stopping = True  # its node drains: stopped gracefully (SIGTERM, the kill grace), then requeued
                log.info("node draining: stopping the attempt to requeue it", extra={"job_id": job.job_id, "worker_id": self.worker_id})
                handle.cancel(EndKind.DRAINED, f"drained from node {job.cluster}/{job.node or '*'}")
            wait(interval)
            interval = min(MAX_POLL_SECONDS, interval * 1.5)

    def _report(self, job: ClaimedJob, dispatch_token: str, outcome: Outcome, lease: Lease | None = None) -> str:
        """Record the outcome; kept and retried on connection errors for as long as this worker lives.
        The end is a compare-and-set on the dispatch token, so a retry never ends the job twice."""
        details = {"end": outcome.kind.value, **outcome.details}
        if outcome.kind == EndKind.DRAINED:
            # Back to the backlog without spending a retry: the job did nothing wrong.
            status = self.database.retrying(
                lambda session: nodes.requeue_drained(
                    session, job.job_id, dispatch_token, actor=self.worker_id, reason=outcome.reason,
                    exit_code=outcome.exit_code, details=details,
                ),
                what=f"requeueing drained attempt {job.attempt}", give_up_after=None, max_delay=REPORT_MAX_BACKOFF_SECONDS,
                log_every=LOG_FAILURES_PER_WARNING, extra={"job_id": job.job_id, "worker_id": self.worker_id},
            )
            log.info("attempt %d drained -> %s", job.attempt, status, extra={"job_id": job.job_id, "worker_id": self.worker_id})
            return status
        tries = 0

        def report(session: Session) -> str:
            nonlocal tries
            tries += 1
            if tries > 1 and lease is not None:
                lease.ensure_started()  # retrying for a while: the lease must not expire meanwhile
            return execution.end(
                session, self.settings, job.job_id, dispatch_token,
                succeeded=outcome.succeeded, retryable=outcome.retryable, reason=outcome.reason,
                actor=self.worker_id, exit_code=outcome.exit_code, details=details,
                requeue=outcome.kind == EndKind.UNPLACED,
            )

        status = self.database.retrying(
            report,
            what=f"recording the end of attempt {job.attempt}", give_up_after=None, max_delay=REPORT_MAX_BACKOFF_SECONDS,
            log_every=LOG_FAILURES_PER_WARNING, extra={"job_id": job.job_id, "worker_id": self.worker_id},
        )
        log.info("attempt %d ended: %s -> %s", job.attempt, outcome.reason, status, extra={"job_id": job.job_id, "worker_id": self.worker_id})
        return status


def to_spec(job: ClaimedJob) -> JobSpec:
    # Field by field, not dataclasses.asdict: its recursive deep copy cost a tenth of a millisecond per job,
    # and the claimed job is the runner's own (nothing else holds its lists and dicts).
    return JobSpec(**{name: getattr(job, name) for name in _SPEC_FIELDS})


_SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(ClaimedJob))
