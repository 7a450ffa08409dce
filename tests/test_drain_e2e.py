"""Drain, not kill: real workers, the real scheduler, the API over real HTTP.

A worker given SIGTERM (to its main process, as `jobservice run` and Kubernetes send it) marks its node
draining, lets running jobs finish for WORKER_DRAIN_SECONDS, then stops the rest and returns them to the
backlog without spending a retry. Operators cordon, uncordon and drain nodes through /api/v1/nodes.
"""
from __future__ import annotations

import signal
import time
from typing import Any

from sqlalchemy import text

from tests.conftest import LiveServer, make_token, wait_for, wait_for_status
from tests.test_supervisor_e2e import run_env, runs  # noqa: F401 - fixtures: `jobservice run` as a subprocess

LONG = ["sh", "-c", "echo started; sleep 120"]


def events(api: Any, job_id: str) -> list[dict[str, Any]]:
    body = api.get(f"/jobs/{job_id}/events").json()
    return body["events"] if isinstance(body, dict) else body


def node_state(database: Any, name: str) -> str | None:
    with database.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM nodes WHERE name = :n"), {"n": name}).scalar()


def stay_pending(api: Any, job_id: str, seconds: float) -> None:
    """The scheduler ticks every 0.5 s in these tests: a few seconds pending means it placed nothing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert api.get(f"/jobs/{job_id}").json()["status"] == "pending"
        time.sleep(0.2)


def test_sigterm_drains_a_long_job_back_to_the_backlog_without_spending_a_retry(api, database, start_worker, start_scheduler) -> None:
    worker = start_worker("node-a", concurrency=1, WORKER_DRAIN_SECONDS="1")
    start_scheduler()
    job = api.submit(command=LONG, retry_policy={"max_retries": 2})
    wait_for_status(api, job["id"], "running")

    worker.process.send_signal(signal.SIGTERM)  # the leader only: its pool children keep their jobs
    # Drained: back to pending with its retries untouched (WORKER_DRAIN_SECONDS=1, KILL_GRACE_SECONDS=2).
    pending = wait_for_status(api, job["id"], "pending", timeout=30)
    assert pending["retry_count"] == 0
    assert worker.process.wait(30) == 0, worker.log_path.read_text()[-3000:]
    drained = [e for e in events(api, job["id"]) if e["from_status"] == "running" and e["to_status"] == "pending"]
    assert len(drained) == 1 and "drained from node local/node-a" in drained[0]["reason"], drained
    # The node left the registry after its jobs were handed back; nothing was left running for the lease.
    assert node_state(database, "node-a") is None
    with database.engine.connect() as conn:
        audit = conn.execute(text("SELECT to_state, actor FROM node_events WHERE node = 'node-a' ORDER BY id")).all()
    assert audit and audit[0][0] == "draining"

    # Then it runs elsewhere, at once (no backoff), still on its first attempt.
    start_worker("node-b", concurrency=1)
    running = wait_for_status(api, job["id"], "running", timeout=30)
    assert running["retry_count"] == 0
    api.delete(f"/jobs/{job['id']}")


def test_a_job_that_ends_within_the_drain_window_finishes_and_nothing_new_is_placed(api, database, start_worker, start_scheduler) -> None:
    worker = start_worker("node-a", concurrency=2, WORKER_DRAIN_SECONDS="60")
    start_scheduler()
    job = api.submit(command=["sh", "-c", "sleep 3; echo done"])
    wait_for_status(api, job["id"], "running")

    worker.process.send_signal(signal.SIGTERM)
    wait_for(lambda: node_state(database, "node-a") == "draining", 10, message="node-a draining")
    later = api.submit(command=["true"])  # a free slot remains on node-a, but it drains
    finished = wait_for_status(api, job["id"], {"succeeded", "failed", "pending"}, timeout=30)
    assert finished["status"] == "succeeded", finished
    assert worker.process.wait(30) == 0, worker.log_path.read_text()[-3000:]
    assert api.get(f"/jobs/{later['id']}").json()["status"] == "pending"
    assert node_state(database, "node-a") is None


def test_cordon_stops_placement_and_uncordon_resumes(api, database, start_worker, start_scheduler) -> None:
    start_worker("node-a", concurrency=2)
    start_scheduler()
    cordoned = api.post("/nodes/local/node-a/cordon", json={"reason": "bad fan"})
    assert cordoned.status_code == 200, cordoned.text
    assert cordoned.json()["state"] == "cordoned" and cordoned.json()["events"][0]["reason"] == "bad fan"
    assert api.get("/clusters/local").json()["nodes"][0]["state"] == "cordoned"
    assert api.get("/clusters/").json()["clusters"][0]["cordoned_nodes"] == 1
    assert 'jobservice_node_state{cluster="local",node="node-a",state="cordoned"} 1.0' in api.get(f"{api.base_url}/metrics").text

    job = api.submit(command=["true"])
    stay_pending(api, job["id"], 3)
    explained = api.get(f"/jobs/{job['id']}/explain").json()
    assert explained["reason"] == "NO_NODES" and "local/node-a cordoned by local (bad fan)" in explained["message"], explained

    assert api.post("/nodes/local/node-a/uncordon").json()["state"] == "ready"
    wait_for_status(api, job["id"], "succeeded", timeout=30)


def test_drain_through_the_api_requeues_running_jobs_after_the_grace(api, database, start_worker, start_scheduler) -> None:
    start_worker("node-a", concurrency=1)
    start_scheduler()
    job = api.submit(command=LONG, retry_policy={"max_retries": 1})
    wait_for_status(api, job["id"], "running")
    listed = api.get("/nodes/").json()["nodes"]
    assert [(n["name"], n["state"], [j["id"] for j in n["jobs"]]) for n in listed] == [("node-a", "ready", [job["id"]])]

    drained = api.post("/nodes/local/node-a/drain", json={"grace_seconds": 1, "reason": "kernel update"})
    assert drained.status_code == 200, drained.text
    assert drained.json()["state"] == "draining" and drained.json()["drain_deadline"]
    # The node's worker notices on its job's lease renewal, stops the job, and requeues it.
    pending = wait_for_status(api, job["id"], "pending", timeout=30)
    assert pending["retry_count"] == 0
    assert any("drained from node local/node-a" in e["reason"] for e in events(api, job["id"]))
    stay_pending(api, job["id"], 2)  # the node still drains: nothing is placed back there
    assert api.get("/nodes/local/node-a").json()["jobs"] == []

    assert api.post("/nodes/local/node-a/uncordon").status_code == 200
    wait_for_status(api, job["id"], "running", timeout=30)
    api.delete(f"/jobs/{job['id']}")


def test_sigterm_keeps_an_operators_cordon_for_the_next_worker(api, database, start_worker, start_scheduler) -> None:
    worker = start_worker("node-a", concurrency=1, WORKER_DRAIN_SECONDS="1")
    assert api.post("/nodes/local/node-a/cordon").status_code == 200
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(30) == 0
    assert node_state(database, "node-a") == "cordoned"
    start_worker("node-a", concurrency=1)
    start_scheduler()
    job = api.submit(command=["true"])
    stay_pending(api, job["id"], 2)


def test_the_operators_api_is_admin_only_and_checks_its_input(settings, database) -> None:
    server = LiveServer(settings.with_overrides(auth_enabled=True))
    try:
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO nodes (cluster, name, cpu_millis, memory_bytes, slots) VALUES ('local', 'node-x', 1000, 1000, 1)"
            ))
        from tests.conftest import ApiClient

        user = ApiClient(server.url, {"Authorization": f"Bearer {make_token('alice', 'jobs:read jobs:write')}"})
        admin = ApiClient(server.url, {"Authorization": f"Bearer {make_token('ops', 'admin')}"})
        for method, path in [("GET", "/nodes/"), ("GET", "/nodes/local/node-x"), ("POST", "/nodes/local/node-x/cordon"),
                             ("POST", "/nodes/local/node-x/uncordon"), ("POST", "/nodes/local/node-x/drain")]:
            refused = user.request(method, path)
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json()["error"]["code"] == "FORBIDDEN"
        assert admin.post("/nodes/local/nope/cordon").json()["error"]["code"] == "NOT_FOUND"
        for body, field in [({"grace_seconds": -1}, "grace_seconds"), ({"grace_seconds": 1.5}, "grace_seconds"),
                            ({"grace_seconds": 10**9}, "grace_seconds"), ({"reason": "a\nb"}, "reason"),
                            ({"reason": "x" * 513}, "reason"), ({"colour": "red"}, "colour")]:
            bad = admin.post("/nodes/local/node-x/drain", json=body)
            assert bad.status_code == 400, (body, bad.text)
            assert bad.json()["error"]["details"][0]["field"].endswith(field), bad.json()
        assert node_state(database, "node-x") == "ready"  # nothing refused changed anything

        assert admin.post("/nodes/local/node-x/drain", json={"grace_seconds": 30}).json()["state"] == "draining"
        detail = admin.get("/nodes/local/node-x").json()
        assert [(e["to_state"], e["actor"]) for e in detail["events"]] == [("draining", "ops")]
        assert detail["state_by"] == "ops" and detail["state_reason"] == "drained by ops"
    finally:
        server.stop()


def test_ctrl_c_of_jobservice_run_drains_its_worker(api, database, runs) -> None:
    run = runs(
        "scheduler", "worker", WORKER_NODE="node-run", WORKER_CONCURRENCY="1", WORKER_DRAIN_SECONDS="1",
        KILL_GRACE_SECONDS="2", JOB_HEARTBEAT_SECONDS="0.5", WORKER_GPU_COUNT="0",
    )
    run.wait_started("scheduler", "worker")
    wait_for(lambda: node_state(database, "node-run") == "ready", 60, message=f"node-run registered:\n{run.output}")
    job = api.submit(command=LONG, retry_policy={"max_retries": 3})
    wait_for_status(api, job["id"], "running", timeout=60)

    # Ctrl-C reaches the supervisor alone (its processes run in sessions of their own); it sends SIGTERM
    # to the worker's main process and waits past WORKER_DRAIN_SECONDS + KILL_GRACE_SECONDS.
    assert run.stop(signal.SIGINT, timeout=60) == 0, run.output
    after = api.get(f"/jobs/{job['id']}").json()
    assert after["status"] == "pending" and after["retry_count"] == 0, (after, run.output[-3000:])
    assert any("drained from node local/node-run" in e["reason"] for e in events(api, job["id"]))
    assert node_state(database, "node-run") is None
