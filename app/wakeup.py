"""Wake the schedulers after a submit commits, with one NOTIFY for many submits.

A NOTIFY inside the submit's own transaction serialises submits: PostgreSQL commits the transactions
that notified one at a time, each holding a database-wide lock across its WAL flush, so concurrent
submits stop sharing (group-committing) their flushes. Measured here (benchmarks/dispatch.py
--submit-only, 16 clients): 124 submits/s with it, 183/s without it, nothing else changed.

So submits commit without notifying (except one after a quiet spell: below), and a per-process thread
sends the wake-up, in a transaction of its own: `poke()` only sets a flag; the thread sends one NOTIFY,
then one more if pokes came while it was sending. A NOTIFY that fails (the database restarting) is
retried every half second until one goes through.

Under a sustained load the thread also waits MIN_INTERVAL_SECONDS between two NOTIFYs: each one costs
the scheduler a whole admission pass, and at hundreds of submits a second, a NOTIFY per free moment of
the thread made the scheduler and its database session burn a third of the 2 cores the submits ran on
(benchmarks/dispatch.py --submit-only, 16 clients). The first poke after a quiet spell is sent at once;
under load a job waits at most that long more for a pass that admits every job submitted meanwhile.

A lone submit after a quiet spell carries the NOTIFY in its own transaction instead (`at_commit()`), in the
round trip of its INSERT: PostgreSQL delivers it at the commit, sparing the wake-up thread's round trip and the
switch to it (about 1 ms of a lone submit's way to its worker). At most one such submit per process per
MIN_INTERVAL_SECONDS, as for the thread's NOTIFYs: the commits stay unserialised under load. One that rolls back
created nothing, so no wake-up is owed.

Nothing is lost by moving it out of the transaction: a NOTIFY never was the guarantee. If this
process dies between a commit and its NOTIFY, or the NOTIFY fails, the scheduler's safety-net tick
(SCHEDULER_INTERVAL_SECONDS) admits the job, exactly as when its LISTEN session is reconnecting.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from app.db import first_line, is_connection_error
from app.domain.jobs import SCHEDULER_CHANNEL, SUBMIT_WAKEUP

log = logging.getLogger("jobservice.wakeup")

MIN_INTERVAL_SECONDS = 0.05  # between two NOTIFYs of one process: at most 20 passes a second asked by each


class SchedulerWaker:
    def __init__(self, engine: Engine, reason: str = SUBMIT_WAKEUP, *, min_interval: float = MIN_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self._engine = engine
        self._reason = reason
        self._min_interval = min_interval
        self._clock = clock
        self._sleep = sleep
        self._last_sent: float | None = None
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._connection: Connection | None = None  # the waker thread's own (see _send)

    def at_commit(self) -> bool:
        """Whether the caller's transaction should carry the NOTIFY itself (then counted as sent now): only when this
        process sent none within the minimum interval and none is owed, as the thread would then send it at once."""
        with self._lock:
            now = self._clock()
            if self._wanted.is_set() or (self._last_sent is not None and now - self._last_sent < self._min_interval):
                return False
            self._last_sent = now
            return True

    def poke(self) -> None:
        """Ask for a wake-up; returns at once, never raises."""
        self._wanted.set()
        if self._thread is None or not self._thread.is_alive():
            # Started on first use, so that a forking server (gunicorn) starts one per worker process.
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="scheduler-waker", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wait_out_min_interval()
            self._wanted.clear()  # pokes from now on ask for another NOTIFY after this one
            self._notify()

    def _wait_out_min_interval(self) -> None:
        """Pokes that come meanwhile are answered by the NOTIFY sent after the wait."""
        if self._last_sent is not None:
            remaining = self._last_sent + self._min_interval - self._clock()
            if remaining > 0:
                self._sleep(remaining)

    def _notify(self) -> None:
        try:
            try:
                self._send()
            except Exception as exc:  # noqa: BLE001
                if not is_connection_error(exc):
                    raise
                self._send()  # its kept connection was dropped (a restart, a drill): once more on a new one
            with self._lock:  # never earlier than a slot at_commit() reserved meanwhile
                self._last_sent = max(self._clock(), self._last_sent or 0.0)
            self._failures = 0
        except Exception as exc:  # noqa: BLE001 - never raise into the submit path; try again below
            self._failures += 1
            if self._failures % 100 == 1:
                log.warning("could not wake the scheduler (%d tries); retrying, and its interval tick admits the job "
                            "meanwhile: %s", self._failures, first_line(exc))
            time.sleep(0.5)  # the database is down or restarting: do not spin on it
            self._wanted.set()  # the wake-up is still owed

    def _send(self) -> None:
        """NOTIFY on a connection this thread keeps: a pooled one per NOTIFY cost the pool's pre-ping, a
        round trip of its own, on the way from a submit's commit to the scheduler. A connection that
        fails is dropped here, and the next send opens a new one."""
        try:
            if self._connection is None:
                self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._connection.execute(
                text("SELECT pg_notify(:channel, :reason)"), {"channel": SCHEDULER_CHANNEL, "reason": self._reason}
            )
        except Exception:
            connection, self._connection = self._connection, None
            if connection is not None:
                try:
                    connection.invalidate()  # never back to the pool: it may be the dead one
                    connection.close()
                except Exception:  # noqa: BLE001 - it is gone either way
                    pass
            raise
