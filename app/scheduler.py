"""The scheduler process: woken by PostgreSQL NOTIFY (submit, job end), and periodically as a safety net.

Each tick recovers lost work, admits what fits, publishes the admitted jobs' tasks, and re-publishes
any outbox message a crashed publisher left behind. Several schedulers may run; one admits at a time.
"""
from __future__ import annotations

import enum
import gc
import logging
import math
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

import psycopg2
import psycopg2.extensions
from sqlalchemy.orm import Session

from app import heartbeat
from app.db import Database, first_line, is_connection_error, retried_on_disconnect, vacuum
from app.dispatch import CeleryPublisher, TaskPublisher, delete_published, publish_only, publish_stale
from app.domain import counters, idempotency, liveness, logs as log_store, pools
from app.domain.jobs import SCHEDULER_CHANNEL, SUBMIT_WAKEUP, utcnow
from app.domain.scheduling import AdmissionResult, SnapshotCache, admit, recover_lost, requeue_unclaimed
from config import Settings

log = logging.getLogger("jobservice.scheduler")
PURGE_EVERY_SECONDS = 3600.0
SCHEDULER_APPLICATION = "jobservice-scheduler"  # application_name of its database sessions
PASS_RECORD_EVERY_SECONDS = 1.0  # a burst of NOTIFY wake-ups records its pass once
# The outbox rows of published tasks are deleted by the next pass's first statement; with no wake-up
# meanwhile, a pass comes this soon anyway (well before OUTBOX_REPUBLISH_AFTER_SECONDS would resend them).
DELETE_PUBLISHED_WITHIN_SECONDS = 0.5
STOP_CHECK_SECONDS = 0.5  # how soon a waiting scheduler sees a stop request
# A tick's pooled connections are not pinged before use: the ping was a round trip of every pass (0.9 ms of a lone
# submit's way to its worker on an idle stack). A tick that meets a dead one runs again at once, on pinged connections
# (Scheduler._tick); the liveness records outside ticks are pinged as before.
TICK_PING_IDLE_AFTER_SECONDS = math.inf
# Passes asked by submits alone, one after another, start at most this often however many API processes ask (each
# one's waker sends at most one NOTIFY per app.wakeup.MIN_INTERVAL_SECONDS, so N processes asked N times as many): under
# a submit load on a full fleet, each such pass read and weighed the backlog to admit nothing. A submit after a quiet
# spell, and every other wake-up (an attempt's end frees a slot), is passed at once.
SUBMIT_PASSES_MIN_INTERVAL_SECONDS = 0.05


class Woken(enum.Enum):
    TIMEOUT = "timeout"  # the interval, or the next due time of a pass's decisions
    SUBMITS = "submits"  # NOTIFYs of submits alone
    OTHER = "other"  # any other NOTIFY (an attempt ended, a cancel, a node changed), or a stop


# Tables that every submit, admission or end appends to and a fold or pass deletes from (or updates in place).
# Their dead rows are what the submit's position read and the pass scan: autovacuum comes a minute late at best
# (and some servers run with it off), so at hundreds of submits a second tens of thousands of dead rows pile up
# (53,000 seen in job_count_deltas). Vacuumed by the scheduler, small as they are, a few ms each time.
CHURN_TABLES = ("job_count_deltas", "job_stats_deltas", "pool_demand_deltas", "outbox", "job_counts", "pool_demand",
                "fair_share_usage", "scheduler_state", "scheduler_heartbeats")
VACUUM_CHURN_EVERY_SECONDS = 10.0
# The counters' deltas are folded by the sweep, and by passes woken between sweeps this long after the last fold: every
# submit reads the unfolded deltas of its queue (its position), and at 500 submits a second a sweep's two seconds left
# a thousand of them to add up, about 0.3 ms of PostgreSQL CPU per submit. An idle scheduler folds with its sweep alone.
FOLD_EVERY_SECONDS = 0.25


class Scheduler:
    def __init__(self, settings: Settings, database: Database, publisher: TaskPublisher) -> None:
        self.settings = settings
        self.database = database
        self.publisher = publisher
        self._last_sweep = 0.0
        self._last_purge = 0.0
        self._last_vacuum = float("-inf")
        self._last_fold = float("-inf")
        self._listen_failures = 0
        self._last_pass_recorded = float("-inf")
        self._published: list[int] = []  # outbox rows whose tasks were sent, to delete in the next pass
        self.name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.snapshots = SnapshotCache()  # rows decoded in earlier passes, reused while unchanged (a pass's main cost)

    def tick(self) -> AdmissionResult:
        """One pass. Each job is handled on its own (app.domain.scheduling.isolated): a job whose handling
        raises is failed and the pass goes on; only trouble with the database itself fails the pass."""
        with self.database.session() as session:
            now_mono = time.monotonic()
            # Admission first, the periodic sweep after it: a pass woken by a submit publishes its job
            # without waiting behind the sweep's recovery, outbox and counter work (which was the tail of
            # the idle submit -> running latency whenever the two coincided).
            failed: Exception | None = None
            try:
                result = self._admit(session)
            except Exception as exc:  # noqa: BLE001 - the sweep still runs (recovery, outbox), as when it came first
                if is_connection_error(exc):
                    raise
                failed, result = exc, AdmissionResult()
            if now_mono - self._last_sweep >= self.settings.scheduler_interval_seconds:
                self._last_sweep = now_mono
                recovered = recover_lost(session, self.settings)
                for job_id in recovered:
                    log.warning("recovered a lost job: its worker or node stopped heartbeating", extra={"job_id": job_id})
                requeued = requeue_unclaimed(session, self.settings)
                for job_id in requeued:
                    log.warning("returned a queued job to the backlog: no worker claimed it within %gs",
                                self.settings.claim_timeout_seconds, extra={"job_id": job_id})
                publish_stale(session, self.publisher, self.settings)
                self._last_fold = now_mono
                self._fold_counters(session)
                if now_mono - self._last_vacuum >= VACUUM_CHURN_EVERY_SECONDS:
                    self._last_vacuum = now_mono
                    self._vacuum_churn()
                if (recovered or requeued) and failed is None:  # what it freed or sent back is admitted now, as before
                    result = self._admit(session)
            elif now_mono - self._last_fold >= FOLD_EVERY_SECONDS:  # woken between sweeps: a load is on
                self._last_fold = now_mono
                self._fold_counters(session)
            if now_mono - self._last_purge >= PURGE_EVERY_SECONDS:
                self._last_purge = now_mono
                log_store.purge_older_than(session, self.settings.log_retention_days)
                idempotency.purge_expired(session, utcnow())
            if failed is not None:
                raise failed  # after the sweep and purge, as before; the pass is not recorded as a success
            if now_mono - self._last_pass_recorded >= PASS_RECORD_EVERY_SECONDS:
                liveness.passed(session, self.name)
                self._last_pass_recorded = now_mono
            return result

    def _tick(self) -> AdmissionResult:
        """A tick on connections not pinged when in use a moment ago; if one of them turned out dead (a database
        restart, a dropped session), the tick runs again at once on a pinged one. Nothing the first try did is
        undone or done twice: each of its transactions committed or not, and the next pass reads what is there (a
        pass whose commit's answer was lost has its tasks published by the outbox sweep, as before)."""
        try:
            with retried_on_disconnect():
                return self.tick()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            log.info("a scheduler tick met a dropped database connection; running it again: %s", first_line(exc))
        return self.tick()

    def _admit(self, session: Session) -> AdmissionResult:
        result = admit(session, self.settings, cache=self.snapshots, published=self._published)
        self._published = []  # deleted in the pass's transaction, which committed
        if result.admitted:
            # Sent right after the admission committed, from this process: no transaction of their own for the
            # outbox rows' delete on the way to the worker (the next pass deletes them).
            self._published = publish_only(self.publisher, result.messages)
            for job_id in result.admitted:
                log.info("admitted", extra={"job_id": job_id})
        return result

    def _record(self, record: Callable[[Session], None], what: str = "the scheduler's liveness") -> None:
        """Best effort: the liveness rows must never be what stops the scheduler."""
        try:
            with self.database.session() as session:
                record(session)
        except Exception:  # noqa: BLE001
            log.warning("could not record %s", what, exc_info=True)

    @staticmethod
    def _fold_counters(session: Session) -> None:
        """Keep the counters' delta tables short (readers add them up); never at admission's expense."""
        try:
            counters.fold(session)
            pools.fold(session)
        except Exception:  # noqa: BLE001 - stale deltas only make reads a little slower; admission goes on
            log.exception("folding the job counters failed")

    def _vacuum_churn(self) -> None:
        """Best effort, like the fold: a VACUUM refused (not the tables' owner) or failed only leaves dead rows."""
        try:
            vacuum(self.database.engine, CHURN_TABLES)
        except Exception as exc:  # noqa: BLE001
            log.warning("vacuuming the scheduler's churn tables failed: %s", first_line(exc))

    def run_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self._record(lambda session: liveness.started(session, self.name))
        listener = self._reconnect()
        heartbeat_file = heartbeat.path_for(self.settings, "scheduler")
        woken = Woken.OTHER
        while not stop.is_set():
            pass_started = time.monotonic()
            try:
                result = self._tick()
                heartbeat.touch(heartbeat_file)  # only a tick that worked proves liveness
            except Exception as exc:  # noqa: BLE001 - a scheduler must outlive a bad tick (database restart, broker blip)
                if is_connection_error(exc):
                    log.warning("scheduler tick lost its database connection; the next tick retries: %s", first_line(exc))
                else:
                    log.exception("scheduler tick failed")
                self._record(lambda session: liveness.failed(session, self.name, f"{type(exc).__name__}: {first_line(exc)}"))
                result = AdmissionResult()
                time.sleep(1)
            timeout = self.settings.scheduler_interval_seconds
            if result.next_wakeup is not None:
                timeout = max(0.0, min(timeout, (result.next_wakeup - utcnow()).total_seconds()))
            if self._published:
                timeout = min(timeout, DELETE_PUBLISHED_WITHIN_SECONDS)
            if listener is None:  # no LISTEN session: tick on the interval until one is back
                stop.wait(timeout)
                listener = self._reconnect()
                continue
            submits_not_before = pass_started + SUBMIT_PASSES_MIN_INTERVAL_SECONDS if woken is Woken.SUBMITS else 0.0
            try:
                woken = self._wait(listener, timeout, stop, submits_not_before)
            except psycopg2.Error as exc:
                # The server ended the LISTEN session (restart, pg_terminate_backend): expected, not a bug.
                log.warning("lost the LISTEN connection; reconnecting: %s", first_line(exc))
                listener.close()
                listener = self._reconnect()
        if listener is not None:
            listener.close()
        published, self._published = self._published, []
        # Else the sweep of another scheduler (or the next) resends them, and the claims ignore them.
        self._record(lambda session: delete_published(session, published), "the published tasks' outbox delete")
        self._record(lambda session: liveness.stopped(session, self.name))

    def _reconnect(self) -> psycopg2.extensions.connection | None:
        """A new LISTEN session, or None (one WARNING line for the first failure and every 30th after)."""
        try:
            listener = self._listen()
        except psycopg2.Error as exc:
            self._listen_failures += 1
            if self._listen_failures % 30 == 1:
                log.warning("LISTEN reconnect failed (%d tries); ticking on the interval meanwhile: %s",
                            self._listen_failures, first_line(exc))
            return None
        self._listen_failures = 0
        return listener

    def _listen(self) -> psycopg2.extensions.connection:
        url = self.database.engine.url.render_as_string(hide_password=False).replace("+psycopg2", "")
        connection = psycopg2.connect(url, application_name=SCHEDULER_APPLICATION)
        connection.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
        connection.cursor().execute(f"LISTEN {SCHEDULER_CHANNEL}")
        return connection

    @staticmethod
    def _wait(listener: psycopg2.extensions.connection, timeout: float, stop: threading.Event,
              submits_not_before: float = 0.0) -> Woken:
        """Sleep until a notification, the timeout or `stop`; a burst of notifications makes one wake-up. Submits'
        notifications alone wake it no earlier than `submits_not_before` (time.monotonic()): any other wakes it at once.

        The sleep is sliced because select() is resumed after a signal handler (PEP 475): SIGTERM would
        otherwise wait out a long SCHEDULER_INTERVAL_SECONDS before the loop saw `stop`."""
        deadline = time.monotonic() + timeout
        submitted = False
        while not stop.is_set():
            now = time.monotonic()
            if submitted and now >= submits_not_before:
                return Woken.SUBMITS
            remaining = (min(deadline, submits_not_before) if submitted else deadline) - now
            if now >= deadline:
                return Woken.SUBMITS if submitted else Woken.TIMEOUT
            if select.select([listener], [], [], min(remaining, STOP_CHECK_SECONDS)) != ([], [], []):
                listener.poll()
                reasons = {notification.payload for notification in listener.notifies}
                listener.notifies.clear()
                if reasons - {SUBMIT_WAKEUP}:
                    return Woken.OTHER
                submitted = bool(reasons) or submitted
        return Woken.OTHER


def scheduler_database(settings: Settings) -> Database:
    """The scheduler's pool: two connections, named in pg_stat_activity, not pinged inside ticks (Scheduler._tick)."""
    return Database(settings.database_url or "", pool_size=2, application_name=SCHEDULER_APPLICATION,
                    retried_ping_idle_after=TICK_PING_IDLE_AFTER_SECONDS)


def run_forever(settings: Settings) -> None:
    database = scheduler_database(settings)
    publisher = CeleryPublisher(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("scheduler started; queues: %s", ", ".join(f"{q.name} (max {q.max_concurrency})" for q in settings.queues))
    seed_quotas(settings, database)
    scheduler = Scheduler(settings, database, publisher)
    freeze_startup_objects()
    try:
        scheduler.run_forever(stop)
    finally:
        publisher.close()
        database.dispose()


def freeze_startup_objects() -> None:
    """Leave what startup made (modules, the ORM's mappings, the Celery app: ~100,000 objects) out of the cyclic
    garbage collector's full collections. A pass makes tens of thousands of objects, so every few passes one
    triggers a full collection, which traversed all of them: 60 ms added to that pass at 100,000 pending jobs
    and 1,000 nodes (benchmarks/scheduler_pass.py), 10 ms with them frozen. They live as long as the process."""
    gc.collect()
    gc.freeze()


def seed_quotas(settings: Settings, database: Database) -> list[str]:
    """QUOTAS_FILE's quotas for the tenants that have none yet (the API's changes win over the file).

    A file that cannot be read or validated is logged and ignored: scheduling goes on with the quotas
    already in PostgreSQL rather than stopping every tenant's jobs.
    """
    if not settings.quotas_file:
        return []
    from app.api.quotas import parse_file_entries  # the API's validation, so the file means what a PUT means
    from app.domain import quotas

    try:
        with database.session() as session:
            seeded = quotas.seed(session, settings.quotas_file, parse_file_entries, utcnow())
    except (OSError, ValueError) as exc:
        log.error("QUOTAS_FILE %s not applied: %s", settings.quotas_file, first_line(exc))
        return []
    if seeded:
        log.info("quotas seeded from %s for %s", settings.quotas_file, ", ".join(seeded))
    return seeded
