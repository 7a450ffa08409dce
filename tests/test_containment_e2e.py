"""Contained processes, bounded logs and a clean shutdown, with real workers, scheduler, processes and HTTP."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from sqlalchemy import text

from app.db import Database
from app.models import Job
from tests.conftest import ApiClient, wait_for, wait_for_status
from tests.test_execution_e2e import process_alive, sh

# setsid: a new session; ( ... & ): a double fork whose parent exits at once.
ESCAPES = "setsid sleep 231 & echo $! >> {pids}; (sleep 232 & echo $! >> {pids}); "


def pids_in(path: Path, count: int) -> list[int]:
    def read() -> list[int] | None:
        pids = [int(p) for p in path.read_text().split()] if path.exists() else []
        return pids if len(pids) >= count else None

    return wait_for(read, 10, message=f"{count} pids in {path}")


def released(database: Database, job_id: str) -> bool:
    with database.session() as s:
        return not s.get(Job, job_id, populate_existing=True).holds_resources


def test_cancel_kills_processes_that_left_the_job_before_its_gpu_is_released(api: ApiClient, start_scheduler, start_worker, tmp_path: Path, database: Database) -> None:
    start_worker("gpu-host", gpus=1)
    start_scheduler()
    pids = tmp_path / "pids"
    job = api.submit(command=sh(ESCAPES.format(pids=pids) + "sleep 100"), resources={"gpu": 1})
    wait_for_status(api, job["id"], "running")
    escaped = pids_in(pids, 2)
    assert all(process_alive(p) for p in escaped)
    assert api.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    wait_for(lambda: released(database, job["id"]), 20, interval=0.02, message="the GPU to be released")
    # The attempt's end is reported only after everything it started is gone.
    assert [p for p in escaped if process_alive(p)] == []


def test_timeout_kills_processes_that_left_the_job(api: ApiClient, start_scheduler, start_worker, tmp_path: Path, database: Database) -> None:
    start_worker("node-a")
    start_scheduler()
    pids = tmp_path / "pids"
    job = api.submit(command=sh(ESCAPES.format(pids=pids) + "sleep 100"), timeout_seconds=2)
    done = wait_for_status(api, job["id"], "failed", timeout=30)
    assert "timed out" in done["status_reason"]
    wait_for(lambda: released(database, job["id"]), 10, message="resources released")
    assert [p for p in pids_in(pids, 2) if process_alive(p)] == []


@pytest.mark.parametrize("cgroup", ["auto", "off"])  # a cgroup per attempt where the host has one, and without
def test_processes_a_killed_worker_left_behind_die_when_a_worker_starts_on_the_host(api: ApiClient, start_scheduler, start_worker, tmp_path: Path, cgroup: str) -> None:
    doomed = start_worker("node-doomed", WORKER_CGROUP=cgroup)
    start_scheduler()
    pids = tmp_path / "pids"
    job = api.submit(command=sh(ESCAPES.format(pids=pids) + "sleep 100"))
    wait_for_status(api, job["id"], "running")
    escaped = pids_in(pids, 2)
    os.killpg(doomed.process.pid, signal.SIGKILL)  # no shutdown of any kind
    doomed.process.wait(10)
    assert all(process_alive(p) for p in escaped), "PDEATHSIG only reaches the members themselves"
    start_worker("node-b", WORKER_CGROUP=cgroup)  # any worker on this host sweeps before it takes jobs
    assert [p for p in escaped if process_alive(p)] == []


def test_a_log_is_capped_with_one_line_saying_what_was_dropped(api: ApiClient, start_scheduler, start_worker, database: Database) -> None:
    start_worker("node-a", LOG_MAX_LINES_PER_ATTEMPT="1000")
    start_scheduler()
    job = api.submit(command=sh("yes | head -n 20000; echo done"))
    wait_for_status(api, job["id"], "succeeded", timeout=60)
    with database.engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM job_log_lines WHERE job_id = :j"), {"j": job["id"]}).scalar()
    assert stored == 1001
    lines = api.get(f"/jobs/{job['id']}/logs", params={"tail": 2000, "timestamps": "false"}).text.splitlines()
    assert lines[:1000] == ["y"] * 1000
    # 19,000 more "y" lines and "done": counted up to the end, 2 bytes each.
    assert lines[-1] == "[log truncated: 19001 more lines (19004 bytes) were dropped; an attempt keeps at most 1000 lines and 10485760 bytes]"


def test_a_worker_stopped_with_sigterm_leaves_cleanly(api: ApiClient, start_worker, database: Database) -> None:
    worker = start_worker("node-stopping")
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(30) == 0
    log = worker.log_path.read_text()
    assert "Traceback" not in log and "Error" not in log and " ERROR " not in log, log[-3000:]
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM nodes WHERE name = 'node-stopping'")).scalar() == 0
