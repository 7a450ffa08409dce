"""Per-process worker state, built after the prefork pool forks (database connections don't survive a fork)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from app.db import Database
from config import Settings
from workers.executors.local import LocalExecutor
from workers.runner import Runner


@dataclass
class WorkerContext:
    settings: Settings
    database: Database
    runner: Runner


@lru_cache(maxsize=None)
def _context_for(pid: int) -> WorkerContext:
    settings = Settings.from_env()
    database = Database(settings.database_url or "", pool_size=2)
    executor = LocalExecutor(settings.worker_workdir, settings.kill_grace_seconds)
    runner = Runner(settings, database, executor, worker_id=f"worker-{settings.worker_node}-{pid}")
    return WorkerContext(settings, database, runner)


def worker_context() -> WorkerContext:
    return _context_for(os.getpid())
