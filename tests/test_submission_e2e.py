"""The scheduler is woken by a submit's post-commit NOTIFY (app.wakeup), not by its interval tick."""
from __future__ import annotations

import time

from tests.conftest import ApiClient, wait_for_status

JOB = {"job_type": "sweep", "command": ["true"], "priority": 10}


def test_an_idle_scheduler_admits_a_submit_and_a_batch_at_once(api: ApiClient, start_scheduler, start_worker) -> None:
    start_worker("node-a")
    start_scheduler(SCHEDULER_INTERVAL_SECONDS="120")  # its safety-net tick will not come during this test
    time.sleep(1.0)  # let it settle into its wait (the worker's registration woke it once)
    single = api.submit(**JOB)
    wait_for_status(api, single["id"], "succeeded", timeout=60)
    batch = api.post("/jobs/batch", json={"jobs": [JOB] * 3}).json()["jobs"]
    for job in batch:  # the timeouts are half the interval: only a NOTIFY can have woken it
        wait_for_status(api, job["id"], "succeeded", timeout=60)
