"""Wake the schedulers after a submit commits, with one NOTIFY for many submits.

A NOTIFY inside the submit's own transaction serialises submits: PostgreSQL commits the transactions
that notified one at a time, each holding a database-wide lock across its WAL flush, so concurrent
submits stop sharing (group-committing) their flushes. Measured here (benchmarks/dispatch.py
--submit-only, 16 clients): 124 submits/s with it, 183/s without it, nothing else changed.

So submits commit without notifying, and a per-process thread sends the wake-up on a connection of
its own: `poke()` only sets a flag; the thread sends one NOTIFY, then one more if pokes came while
it was sending. A burst of submits costs a handful of NOTIFYs, an idle submit one round trip.

Nothing is lost by moving it out of the transaction: a NOTIFY never was the guarantee. If this
process dies between a commit and its NOTIFY, or the NOTIFY fails, the scheduler's safety-net tick
(SCHEDULER_INTERVAL_SECONDS) admits the job, exactly as when its LISTEN session is reconnecting.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from app.db import first_line
from app.domain.jobs import SCHEDULER_CHANNEL

log = logging.getLogger("jobservice.wakeup")


class SchedulerWaker:
    def __init__(self, engine: Engine, reason: str = "submit") -> None:
        self._engine = engine
        self._reason = reason
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._connection: Any = None
        self._failures = 0

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
            self._wanted.clear()  # pokes from now on ask for another NOTIFY after this one
            self._notify()

    def _notify(self) -> None:
        try:
            if self._connection is None:
                self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._connection.execute(text("SELECT pg_notify(:channel, :reason)"), {"channel": SCHEDULER_CHANNEL, "reason": self._reason})
            self._failures = 0
        except Exception as exc:  # noqa: BLE001 - the scheduler's interval tick covers a lost wake-up
            self._failures += 1
            if self._failures % 100 == 1:
                log.warning("could not wake the scheduler (%d tries); its interval tick admits the job: %s",
                            self._failures, first_line(exc))
            if self._connection is not None:
                try:
                    self._connection.invalidate()
                    self._connection.close()
                except Exception:  # noqa: BLE001 - a broken connection may refuse even this
                    pass
                self._connection = None
            time.sleep(0.5)  # the database is down or restarting: do not spin on it
