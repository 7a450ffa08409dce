"""Running Kubernetes attempts are supervised by one loop per worker process, not by a Celery thread each
(issue #12): the task claims and launches, then returns. Real worker, scheduler, PostgreSQL, Flower and the
real kubernetes client against the fake API server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

from app.db import Database
from tests.conftest import ApiClient, free_port, wait_for, wait_for_status
from tests.k8s_fake import FakeKubernetes, Script
from tests.test_kubernetes_e2e import CLUSTER, NAMESPACE, fake, kube_api, kube_env  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


def running_count(database: Database, ids: list[str]) -> int:
    with database.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = 'running'"), {"ids": ids}).scalar() or 0)


def test_one_celery_thread_supervises_many_running_jobs_up_to_its_bound_and_flower_shows_them(
    kube_api: ApiClient, kube_env: dict[str, str], start_worker, start_scheduler, fake: FakeKubernetes,
    database: Database, e2e_env: dict[str, str], tmp_path: Path,
) -> None:
    """Before, each running attempt held a Celery thread for its whole life: one thread ran one job at a time.
    Now one thread launches them all, the supervisor watches them, and KUBERNETES_MAX_SUPERVISED (the nodes'
    slot count) is the bound."""
    fake.scripts["test/slow"] = Script(lines=[f"tick {i}" for i in range(8)], line_interval=0.5)
    start_worker("k8s-one-thread", concurrency=1, registers="gpu-node-1", WORKER_EXECUTOR="kubernetes", WORKER_CLUSTER=CLUSTER,
                 KUBERNETES_MAX_SUPERVISED="3", **kube_env)
    with database.engine.connect() as conn:
        slots = set(conn.execute(text("SELECT slots FROM nodes WHERE cluster = :c"), {"c": CLUSTER}).scalars())
    assert slots == {3}, slots  # what the scheduler sees is the supervisor's bound, not the Celery threads
    start_scheduler()
    jobs = [kube_api.submit(image="test/slow", resources={"cpu": "1", "memory": "1Gi"})["id"] for _ in range(4)]

    most = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, running_count(database, jobs))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        wait_for(lambda: running_count(database, jobs) == 3, 30, message="three jobs running at once under one Celery thread")

        port = free_port()
        log = open(tmp_path / "flower.log", "wb")
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "--app", "workers.celery_app", "flower", f"--port={port}", "--address=127.0.0.1"],
            env={**e2e_env, **kube_env, "WORKER_EXECUTOR": "kubernetes", "WORKER_CLUSTER": CLUSTER, "FLOWER_UNAUTHENTICATED_API": "true"},
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            def supervised() -> dict[str, Any] | None:
                try:
                    workers = requests.get(f"http://127.0.0.1:{port}/api/workers", params={"refresh": "1"}, timeout=10).json()
                except (requests.RequestException, ValueError):
                    return None
                info = next((i for name, i in workers.items() if name.startswith("k8s-one-thread@")), None)
                shown = ((info or {}).get("stats") or {}).get("supervised")
                return shown if shown and shown["running"] >= 1 else None

            shown = wait_for(supervised, 60, 0.5, "Flower to show the supervised jobs")
            assert shown["capacity"] == 3 and shown["running"] + shown["ending"] <= 3, shown
            assert set(shown["jobs"]) <= set(jobs) and shown["jobs"], shown
        finally:
            os.killpg(flower.pid, signal.SIGTERM)
            flower.wait(10)
            log.close()

        for job_id in jobs:
            done = wait_for_status(kube_api, job_id, {"succeeded", "failed"}, timeout=90)
            assert done["status"] == "succeeded", done
    finally:
        stop.set()
        sampler.join(5)
    assert most == 3, most  # never more than the bound at once
    for job_id in jobs:
        lines = kube_api.get(f"/jobs/{job_id}/logs", params={"timestamps": "false"}).text.splitlines()
        assert lines == [f"tick {i}" for i in range(8)], (job_id, lines)
