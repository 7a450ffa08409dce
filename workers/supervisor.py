"""Supervising running Kubernetes attempts without a thread each.

A Kubernetes attempt runs in the cluster for hours; its worker only has to notice how it ends. So the
Celery task that starts it (`jobservice.execute_job`, or `jobservice.adopt_job` after a restart) claims
the job, launches (or finds) its Kubernetes Job, hands it to this process's `Supervisor` and returns: the
Celery thread is free again. One supervisor per worker process then, for every attempt it holds:

- polls it when the shared informers (2 watches per cluster) report a change to its Job or pods, and in a
  sweep every `SWEEP_SECONDS` for what time alone decides (its timeout, the gang-start timeout);
- renews all leases in one statement per round (`app.domain.leases.check_many`), and stops an attempt
  that no longer owns its job (cancelled, preempted, taken over) or whose node drains;
- stores every attempt's log lines, one INSERT per flush for all of them;
- reports each end in its own transaction with its event (the runner's compare-and-set `_report`), on a
  small pool of threads so that one slow report does not hold the others.

How many attempts a process supervises is bounded by `KUBERNETES_MAX_SUPERVISED` (the slot count the
worker gives its cluster's nodes), not by the Celery pool. A worker that dies leaves its attempts running
in the cluster; their leases go silent and a worker of the cluster re-adopts them (`ClusterMembership`).
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app.db import Database, first_line, is_connection_error
from app.domain import execution, leases, logs as log_store
from app.domain.execution import ClaimedJob
from app.domain.jobs import utcnow
from config import Settings
from workers.executors.base import EndKind, Execution, Executor, LogLine, LogSink, Outcome
from workers.log_budget import LogBudget
from workers.runner import (
    LOG_FAILURES_PER_WARNING,
    LOG_FLUSH_LINES,
    LOG_FLUSH_SECONDS,
    LOG_RETRY_SECONDS,
    STATUS_CHECK_SECONDS,
    Runner,
    to_spec,
)

log = logging.getLogger("jobservice.worker")

SWEEP_SECONDS = 1.0  # every attempt is polled at least this often (timeouts); changes are polled at once
SWEEP_CHUNK = 64  # a sweep polls this many attempts per pool task (one task each would cost more than the polls)
REPORT_THREADS = 8  # polls that may call the API (confirming pods, deleting a Job) and end reports


class SupervisedLogs:
    """The log lines of every attempt a process supervises, stored by one flusher thread: one statement and
    one transaction per flush, whatever the number of attempts. Lines that meet a dropped connection are
    kept (in order) for the next flush; lines the database refuses otherwise are dropped and logged."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._pending: dict[tuple[str, int], list[LogLine]] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time keeps each attempt's lines in order
        self._full = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self.flushes = 0
        self._thread = threading.Thread(target=self._run, name="supervised-logs", daemon=True)
        self._thread.start()

    def sink(self, job_id: str, attempt: int) -> LogSink:
        key = (job_id, attempt)

        def add(lines: list[LogLine]) -> None:
            with self._lock:
                self._pending.setdefault(key, []).extend(lines)
                self._count += len(lines)
                full = self._count >= LOG_FLUSH_LINES
            if full:
                self._full.set()  # the flusher stores them now rather than at its next tick

        return add

    @property
    def pending(self) -> int:
        return self._count

    def flush(self, give_up_after: float | None = LOG_RETRY_SECONDS) -> None:
        with self._flushing:
            self._flush(give_up_after)

    def flush_attempt(self, job_id: str, attempt: int) -> None:
        """Once this returns, every line of the attempt is stored (retried while this worker lives). Holding the
        flush lock means no flush is under way, so lines absent from `pending` are stored already: most ends
        cost no write here (the periodic flush took their lines)."""
        with self._flushing:
            with self._lock:
                waiting = (job_id, attempt) in self._pending
            if waiting:
                self._flush(give_up_after=None)

    def _flush(self, give_up_after: float | None) -> None:
        with self._lock:
            batch, self._pending, self._count = self._pending, {}, 0
        if not batch:
            return
        rows = [(job_id, attempt, [(l.at, l.stream, l.member, l.line) for l in lines])
                for (job_id, attempt), lines in batch.items()]
        tries = 0

        def store(session: Session) -> None:
            nonlocal tries
            tries += 1
            # A try after a dropped connection may follow one that committed unacknowledged.
            log_store.append_many_once(session, rows, retry=tries > 1)

        try:
            self.database.retrying(store, what="storing log lines", give_up_after=give_up_after,
                                   quiet=give_up_after is not None, log_every=LOG_FAILURES_PER_WARNING)
            self.flushes += 1
        except Exception as exc:
            if is_connection_error(exc):
                with self._lock:
                    for key, lines in batch.items():
                        self._pending[key] = lines + self._pending.get(key, [])
                        self._count += len(lines)
                raise
            log.exception("storing %d log lines of %d attempts failed; they are dropped",
                          sum(len(r[2]) for r in rows), len(rows))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._full.wait(LOG_FLUSH_SECONDS)
            self._full.clear()
            try:
                self.flush()
                self._failures = 0
            except Exception as exc:  # noqa: BLE001 - the lines are kept; the next flush retries
                self._failures += 1
                if self._failures % LOG_FAILURES_PER_WARNING == 1:
                    log.warning("storing log lines failed %d times; kept for the next flush: %s", self._failures,
                                first_line(exc))

    def stop(self) -> None:
        self._stop.set()
        self._full.set()
        self._thread.join(timeout=5)


@dataclass(eq=False)
class Supervised:
    """One attempt this process supervises."""

    job: ClaimedJob
    dispatch_token: str
    logs: LogBudget
    handle: Execution | None = None  # None while its Job is being created
    lost: bool = False  # the attempt no longer owns the job (cancelled, preempted, taken over)
    drain_deadline: datetime | None = None  # a node it runs on drains: stop it then
    stopping: bool = False
    outcome: Outcome | None = None  # known: being reported
    busy: bool = False  # a pool thread is working on it (one at a time)
    again: bool = False  # it changed while busy
    since: float = field(default_factory=time.monotonic)


class Supervisor:
    """Every running Kubernetes attempt of one worker process; see the module's docstring."""

    def __init__(self, settings: Settings, database: Database, report: Callable[[ClaimedJob, str, Outcome], str],
                 capacity: int) -> None:
        self.settings = settings
        self.database = database
        self.capacity = capacity
        self._report = report
        self.logs = SupervisedLogs(database)
        self._attempts: dict[str, Supervised] = {}  # by job id: a job has one running attempt
        self._reserved = 0
        self._room = threading.Condition()
        self._dirty: set[Supervised] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._work = ThreadPoolExecutor(REPORT_THREADS, thread_name_prefix="supervisor")
        self.ended = 0
        self.lease_rounds = 0
        self._loop_thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._lease_thread = threading.Thread(target=self._leases, name="supervisor-leases", daemon=True)
        self._loop_thread.start()
        self._lease_thread.start()

    # -- room ---------------------------------------------------------------------------------------------

    def reserve(self, timeout: float) -> bool:
        """Room for one more attempt, waiting up to `timeout` seconds for one to end; False if none came."""
        with self._room:
            ok = self._room.wait_for(lambda: len(self._attempts) + self._reserved < self.capacity, timeout)
            if ok:
                self._reserved += 1
            return ok

    def release(self) -> None:
        """Give back a reservation that `register` did not take (the claim found nothing to run)."""
        with self._room:
            self._reserved -= 1
            self._room.notify()

    # -- attempts -----------------------------------------------------------------------------------------

    def register(self, job: ClaimedJob, dispatch_token: str, logs: LogBudget) -> Supervised:
        """Supervise a claimed attempt from now on (its lease is renewed while its Job is being created); takes
        the reservation."""
        entry = Supervised(job, dispatch_token, logs)
        with self._room:
            self._reserved -= 1
            replaced = self._attempts.get(job.job_id)
            self._attempts[job.job_id] = entry
        if replaced is not None and replaced is not entry:
            log.warning("attempt %d replaces one this worker still supervised", job.attempt, extra={"job_id": job.job_id})
        return entry

    def launched(self, entry: Supervised, handle: Execution) -> None:
        on_change = getattr(handle, "on_change", False)
        if on_change is not False:
            handle.on_change = lambda: self._touch(entry)  # type: ignore[attr-defined]
        entry.handle = handle
        self._touch(entry)

    def finish_now(self, entry: Supervised, outcome: Outcome) -> str:
        """An attempt that ended before it ran (its Job could not be created or found): reported at once."""
        entry.outcome = outcome
        return self._finish(entry, outcome)

    def forget(self, entry: Supervised) -> None:
        """Stop supervising without a report: its lease lapses and a worker of the cluster adopts it later."""
        with self._room:
            if self._attempts.get(entry.job.job_id) is entry:
                del self._attempts[entry.job.job_id]
            self._room.notify()

    def _touch(self, entry: Supervised) -> None:
        with self._lock:
            self._dirty.add(entry)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        """What the worker supervises (shown by Flower through the worker's stats)."""
        with self._room:
            entries = list(self._attempts.values())
            reserved = self._reserved
        return {
            "running": sum(1 for e in entries if e.handle is not None and e.outcome is None),
            "launching": sum(1 for e in entries if e.handle is None) + reserved,
            "ending": sum(1 for e in entries if e.outcome is not None),
            "capacity": self.capacity,
            "ended": self.ended,
            "log_lines_pending": self.logs.pending,
            "jobs": sorted(e.job.job_id for e in entries)[:100],
        }

    def __len__(self) -> int:
        return len(self._attempts)

    def stop(self) -> None:
        """Stop supervising (the attempts go on in the cluster; their leases lapse and they are re-adopted)."""
        self._stop.set()
        self._wake.set()
        self._loop_thread.join(timeout=5)
        self._lease_thread.join(timeout=5)
        self._work.shutdown(wait=False, cancel_futures=True)
        self.logs.stop()

    # -- the loop -----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_sweep = 0.0
        while not self._stop.is_set():
            self._wake.wait(SWEEP_SECONDS)
            self._wake.clear()
            now = time.monotonic()
            sweep = now - last_sweep >= SWEEP_SECONDS
            with self._lock:
                if sweep:
                    last_sweep = now
                    with self._room:
                        due = list(self._attempts.values())
                else:
                    due = list(self._dirty)
                self._dirty.clear()
            ready = []
            for entry in due:
                if entry.handle is None or entry.outcome is not None:
                    continue
                if entry.busy:
                    entry.again = True  # changed while being polled: polled again once that poll is done
                    continue
                entry.busy = True  # only the loop thread sets it, only the pool thread clears it
                ready.append(entry)
            # A change is polled on its own at once; a sweep (time alone decides) in chunks.
            size = SWEEP_CHUNK if sweep else 1
            for start in range(0, len(ready), size):
                self._work.submit(self._steps, ready[start:start + size])

    def _steps(self, entries: list[Supervised]) -> None:
        for entry in entries:
            self._step(entry)

    def _step(self, entry: Supervised) -> None:
        """Poll one attempt; stop it if it lost its job or its node drains; report its end once known."""
        try:
            handle = entry.handle
            assert handle is not None
            outcome = handle.poll()
            if outcome is not None:
                entry.outcome = outcome
                self._finish(entry, outcome)
                return
            if entry.lost and not entry.stopping:
                entry.stopping = True  # cancelled, or taken over: stop everything it started
                handle.cancel(EndKind.CANCELLED, "cancelled")
            elif entry.drain_deadline is not None and entry.drain_deadline <= utcnow() and not entry.stopping:
                entry.stopping = True  # its node drains: stopped, then requeued without spending a retry
                log.info("node draining: stopping the attempt to requeue it", extra={"job_id": entry.job.job_id})
                handle.cancel(EndKind.DRAINED, f"drained from node {entry.job.cluster}/{entry.job.node or '*'}")
        except Exception:  # noqa: BLE001 - one attempt's trouble must not stop the others; the sweep polls again
            log.exception("supervising the attempt failed", extra={"job_id": entry.job.job_id})
        finally:
            entry.busy = False
            if entry.again:
                entry.again = False
                self._touch(entry)

    def _finish(self, entry: Supervised, outcome: Outcome) -> str:
        """The attempt's last lines stored, then its end recorded (retried while this worker lives), then it
        leaves: its lease is renewed until the end is recorded, so a reporting worker is never lost."""
        entry.logs.close()
        self.logs.flush_attempt(entry.job.job_id, entry.job.attempt)
        try:
            return self._report(entry.job, entry.dispatch_token, outcome)
        finally:
            with self._room:
                if self._attempts.get(entry.job.job_id) is entry:
                    del self._attempts[entry.job.job_id]
                self.ended += 1
                self._room.notify()

    # -- leases -------------------------------------------------------------------------------------------

    def _leases(self) -> None:
        heartbeat = self.settings.job_heartbeat_seconds
        last_heartbeat = time.monotonic()
        failures = 0
        while not self._stop.wait(min(STATUS_CHECK_SECONDS, heartbeat)):
            with self._room:
                entries = [e for e in self._attempts.values() if e.outcome is None]
            if not entries:
                continue
            now = time.monotonic()
            beat = now - last_heartbeat >= heartbeat
            pairs = [(e.job.job_id, e.dispatch_token) for e in entries]
            try:
                owned = self.database.retrying(
                    lambda session: leases.check_many(session, pairs, heartbeat=beat),
                    what="lease renewal", give_up_after=heartbeat, quiet=True,
                )
            except Exception as exc:  # noqa: BLE001 - a database blip must not stop running jobs
                failures += 1
                if not is_connection_error(exc):
                    log.exception("lease renewal of %d attempts failed", len(pairs))
                elif failures % LOG_FAILURES_PER_WARNING == 1:
                    log.warning("lease renewal of %d attempts failed %d times: %s", len(pairs), failures, first_line(exc))
                continue
            failures = 0
            self.lease_rounds += 1
            if beat:
                last_heartbeat = now
            for entry in entries:
                if entry.job.job_id not in owned:
                    if not entry.lost:
                        entry.lost = True
                        self._touch(entry)
                elif (deadline := owned[entry.job.job_id]) != entry.drain_deadline:
                    entry.drain_deadline = deadline
                    self._touch(entry)
                elif deadline is not None and deadline <= utcnow() and not entry.stopping:
                    self._touch(entry)


class SupervisingRunner(Runner):
    """The runner of a Kubernetes worker: a task claims and launches (or adopts), then returns; this process's
    `Supervisor` watches the attempt to its end."""

    def __init__(self, settings: Settings, database: Database, executor: Executor, worker_id: str) -> None:
        super().__init__(settings, database, executor, worker_id)
        self.supervisor = Supervisor(settings, database, self._report, settings.kubernetes_max_supervised)

    def run(self, job_id: str, dispatch_token: str) -> str:
        extra = {"job_id": job_id, "worker_id": self.worker_id}
        # Beyond the bound the delivery waits a while for room; if none comes it is left unclaimed, and the
        # scheduler puts the job back in the backlog (CLAIM_TIMEOUT_SECONDS).
        if not self.supervisor.reserve(timeout=self.settings.claim_timeout_seconds / 2):
            log.warning("supervising %d attempts already: leaving the job unclaimed", len(self.supervisor), extra=extra)
            return "no room"
        claim_id = secrets.token_hex(8)
        try:
            job = self.database.retrying(
                lambda session: execution.claim(session, job_id, dispatch_token, self.worker_id, claim_id=claim_id),
                what="claim", give_up_after=self.settings.claim_timeout_seconds, extra=extra,
            )
        except Exception as exc:
            self.supervisor.release()
            if not is_connection_error(exc):
                raise
            log.error("could not claim the job: %s", first_line(exc), extra=extra)
            return "unclaimed"
        if job is None:
            self.supervisor.release()
            log.info("ignoring stale or duplicate delivery", extra=extra)
            return "ignored"
        log.info("launching attempt %d", job.attempt, extra=extra)
        sink = self.supervisor.logs.sink(job.job_id, job.attempt)
        entry = self.supervisor.register(job, dispatch_token, LogBudget.start(sink, self.settings, job.attempt))
        try:
            handle = self.executor.launch(to_spec(job), entry.logs)
        except Exception as exc:  # noqa: BLE001 - reported as the attempt's end, as a watching runner would
            log.exception("launching failed", extra=extra)
            return self.supervisor.finish_now(entry, Outcome(EndKind.LOST, f"launch failed: {first_line(exc)}"))
        self.supervisor.launched(entry, handle)
        return "launched"

    def adopt(self, job_id: str, dispatch_token: str) -> str:
        """Take over a running job whose worker went silent (a restart), and supervise it from here."""
        extra = {"job_id": job_id, "worker_id": self.worker_id}
        adopt = getattr(self.executor, "adopt", None)
        if adopt is None or not self.supervisor.reserve(timeout=0):
            return "ignored"  # no room here: another worker of the cluster (or a later sync) adopts it
        silent_since = utcnow() - timedelta(seconds=2 * self.settings.job_heartbeat_seconds)

        def take_over(session: Session) -> tuple[ClaimedJob | None, datetime | None, tuple[int, int]]:
            job = execution.take_over(session, job_id, dispatch_token, self.worker_id, silent_since)
            if job is None:
                return None, None, (0, 0)
            return job, log_store.last_line_at(session, job_id, job.attempt), log_store.attempt_usage(session, job_id, job.attempt)

        try:
            job, logs_since, logs_used = self.database.retrying(take_over, what="adoption", extra=extra)
        except Exception:
            self.supervisor.release()
            raise
        if job is None:
            self.supervisor.release()
            return "ignored"
        log.info("re-adopting attempt %d", job.attempt, extra=extra)
        # A re-adopted attempt continues the budget its earlier watcher used.
        sink = self.supervisor.logs.sink(job.job_id, job.attempt)
        entry = self.supervisor.register(job, dispatch_token, LogBudget(sink, self.settings, *logs_used))
        try:
            handle = adopt(to_spec(job), entry.logs, logs_since=logs_since)
        except Exception as exc:  # noqa: BLE001 - the API is away: let the lease lapse so a later sync retries
            log.warning("re-adoption failed: %s", first_line(exc), extra=extra)
            self.supervisor.forget(entry)
            raise
        if handle is None:
            return self.supervisor.finish_now(entry, Outcome(EndKind.LOST, "its execution vanished while no worker watched it"))
        self.supervisor.launched(entry, handle)
        return "adopted"
