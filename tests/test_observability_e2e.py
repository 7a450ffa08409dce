"""Observability against what really happened: real scheduler, real Celery workers, real HTTP, real PostgreSQL.

Every figure the endpoints report is checked against the truth recorded independently (job
timestamps, the events' own times, the jobs table), never against a constant typed into the test.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from app.db import Database
from app.domain import counters, execution
from app.domain.scheduling import admit
from config import Settings, parse_queues
from tests.conftest import ApiClient, LiveServer, free_port, make_token, wait_for, wait_for_status

ROOT = Path(__file__).resolve().parent.parent
TINY = {"cpu": "100m", "memory": "64Mi", "gpu": 0}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def explain(api: ApiClient, job_id: str) -> dict[str, Any]:
    response = api.get(f"/jobs/{job_id}/explain")
    assert response.status_code == 200, response.text
    return response.json()


def timeline(api: ApiClient, job_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200, response.text
    return response.json()["events"]


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def close_to(reported: float | None, truth: float, relative: float = 0.10, absolute: float = 0.0) -> bool:
    """Roll-up percentiles are bucket means (buckets ~9% wide): within 10% of the exact value."""
    return reported is not None and abs(reported - truth) <= relative * truth + absolute


def scrape(base_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics parsed by prometheus_client's own parser: {sample name: {sorted labels: value}}."""
    response = requests.get(f"{base_url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def sample(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def sse_events(response: requests.Response) -> Iterator[dict[str, str]]:
    event: dict[str, str] = {}
    for raw in response.iter_lines(decode_unicode=True):
        if raw:
            if not raw.startswith(":"):
                key, _, value = raw.partition(": ")
                event[key] = value
            continue
        if event:
            yield event
        event = {}


@pytest.fixture
def serve(settings: Settings, database: Database) -> Iterator[Any]:
    """serve(**setting overrides) -> another API server (its own app and process state), stopped after the test."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(settings.with_overrides(**overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# --- queues: depth, processing, oldest age, backlog order, explain while saturated ----------------


def test_queue_figures_and_reasons_while_the_queues_are_saturated(serve, start_worker, start_scheduler, database: Database) -> None:
    queues = "high-priority:50-100:1,default:0-49:100"
    api = ApiClient(serve(queues=parse_queues(queues)).url)
    start_worker("node-sat", concurrency=2, JOB_QUEUES=queues)
    start_scheduler(JOB_QUEUES=queues)
    h1 = api.submit(command=sh("sleep 2"), priority=60, resources=TINY)
    d1 = api.submit(command=sh("sleep 2"), priority=10, resources=TINY)
    wait_for_status(api, h1["id"], "running")
    wait_for_status(api, d1["id"], "running")
    h2 = api.submit(command=sh("sleep 0.2"), priority=70, resources=TINY)
    d2 = api.submit(command=sh("sleep 0.2"), priority=10, resources=TINY)
    d3 = api.submit(command=sh("sleep 0.2"), priority=20, resources=TINY)
    d4 = api.submit(command=sh("sleep 0.2"), priority=10, resources=TINY)

    before = time.time()
    overview = api.get("/queues/").json()
    after = time.time()
    by_name = {q["name"]: q for q in overview["queues"]}
    assert [q["name"] for q in overview["queues"]] == ["high-priority", "default"]
    assert by_name["high-priority"] | {"oldest_job_age_seconds": None} == {
        "name": "high-priority", "depth": 1, "processing": 1, "queued": 0, "max_concurrency": 1, "oldest_job_age_seconds": None,
    }
    assert {k: by_name["default"][k] for k in ("depth", "processing", "queued", "max_concurrency")} == {
        "depth": 3, "processing": 1, "queued": 0, "max_concurrency": 100,
    }
    assert overview["total_pending"] == 4 and overview["total_processing"] == 2
    for name, oldest in (("high-priority", h2), ("default", d2)):
        created = ts(oldest["created_at"]).timestamp()
        age = by_name[name]["oldest_job_age_seconds"]
        assert before - created - 0.002 <= age <= after - created + 0.002, (name, age)

    # Why each one waits: the scheduler's own rules, replayed.
    limit = explain(api, h2["id"])
    assert limit["reason"] == "QUEUE_CONCURRENCY_LIMIT" and "1 of 1" in limit["message"], limit
    slots = explain(api, d3["id"])  # first in the default queue's order (priority 20)
    assert slots["reason"] == "NO_FREE_SLOTS", slots
    assert slots["blocking"] == {"resource": "slots", "requested": 1, "free": 0, "node": "local/node-sat"}
    assert slots["queue_position"] == 1
    for waiting, position in ((d2, 2), (d4, 3)):
        behind = explain(api, waiting["id"])
        assert behind["reason"] == "HIGHER_PRIORITY_AHEAD" and behind["queue_position"] == position, behind
        assert behind["blocked_by"]["job_id"] == d3["id"] and behind["blocked_by"]["reason"] == "NO_FREE_SLOTS"
    running = explain(api, d1["id"])
    assert running["reason"] == "RUNNING" and running["node"] == "node-sat" and running["since"]

    # The backlog in admission order (priority, then age), keyset-paginated.
    page1 = api.get("/queues/default", params={"limit": 2}).json()
    assert [j["id"] for j in page1["jobs"]] == [d3["id"], d2["id"]] and page1["next"]
    assert page1["jobs"][0] == {"id": d3["id"], "priority": 20, "queued_at": d3["created_at"], "retry_at": None}
    page2 = api.get("/queues/default", params={"limit": 2, "after": page1["next"]}).json()
    assert [j["id"] for j in page2["jobs"]] == [d4["id"]] and page2["next"] is None
    assert api.get("/queues/default", params={"limit": 101}).status_code == 400
    missing = api.get("/queues/no-such-queue")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"

    done = [wait_for_status(api, j["id"], "succeeded", timeout=40) for j in (h1, d1, h2, d2, d3, d4)]
    # The last hour of the default queue, against the jobs' own timelines.
    durations, waits = [], []
    for job in (d1, d2, d3, d4):
        events = timeline(api, job["id"])
        start = next(e for e in events if e["to_status"] == "running")
        end = events[-1]
        durations.append((ts(end["at"]) - ts(start["at"])).total_seconds())
        waits.append((ts(start["at"]) - ts(events[0]["at"])).total_seconds())
    detail = api.get("/queues/default").json()
    assert detail["depth"] == 0 and detail["processing"] == 0 and detail["jobs"] == [] and detail["oldest_job_age_seconds"] is None
    assert detail["stats"]["jobs_processed_1h"] == 4
    assert detail["stats"]["avg_processing_time_seconds"] == pytest.approx(sum(durations) / 4, abs=0.001)
    assert detail["stats"]["avg_wait_time_seconds"] == pytest.approx(sum(waits) / 4, abs=0.001)
    assert api.get("/queues/high-priority").json()["stats"]["jobs_processed_1h"] == 2
    assert all(d["status"] == "succeeded" for d in done)


# --- system metrics and Prometheus, against the jobs' recorded times ------------------------------------


def test_metrics_agree_with_what_ran(api: ApiClient, serve, start_worker, start_scheduler, database: Database) -> None:
    start_worker("node-m", concurrency=3, gpus=2)
    start_scheduler()
    gpu_job = api.submit(command=sh("sleep 2"), resources={**TINY, "gpu": 1})
    wait_for_status(api, gpu_job["id"], "running")
    held = scrape(api.base_url)
    assert sample(held, "jobservice_gpus", cluster="local", state="used") == 1
    assert sample(held, "jobservice_gpus", cluster="local", state="free") == 1
    assert sample(held, "jobservice_queue_processing", queue="high-priority") == 1
    assert sample(held, "jobservice_jobs", queue="high-priority", state="running") == 1

    submitted = [gpu_job]
    submitted += [api.submit(command=sh("sleep 0.2"), priority=20, resources=TINY) for _ in range(4)]
    submitted += [api.submit(command=sh("sleep 1"), priority=20, resources=TINY) for _ in range(2)]
    submitted.append(api.submit(command=sh("exit 2"), priority=20, resources=TINY))
    finals = [wait_for_status(api, j["id"], {"succeeded", "failed"}, timeout=40) for j in submitted]
    assert Counter(f["status"] for f in finals) == {"succeeded": 7, "failed": 1}

    dispatch_ms, execution_s = [], []
    for job in submitted:
        events = timeline(api, job["id"])
        first_run = next(e for e in events if e["to_status"] == "running")
        dispatch_ms.append((ts(first_run["at"]) - ts(events[0]["at"])).total_seconds() * 1000)
        execution_s.append((ts(events[-1]["at"]) - ts(first_run["at"])).total_seconds())
    metrics = api.get("/metrics/").json()
    assert metrics["jobs"] == {"total_submitted_24h": 8, "total_completed_24h": 7, "total_failed_24h": 1, "success_rate": round(7 / 8, 4)}
    latency = metrics["latency"]
    assert close_to(latency["dispatch_p50_ms"], nearest_rank(dispatch_ms, 0.5), absolute=0.1), (latency, sorted(dispatch_ms))
    assert close_to(latency["dispatch_p99_ms"], nearest_rank(dispatch_ms, 0.99), absolute=0.1), (latency, sorted(dispatch_ms))
    assert close_to(latency["execution_p50_seconds"], nearest_rank(execution_s, 0.5), absolute=0.001), (latency, sorted(execution_s))
    assert close_to(latency["execution_p99_seconds"], nearest_rank(execution_s, 0.99), absolute=0.001), (latency, sorted(execution_s))
    # And against the known sleeps: the median job slept 0.2 s, the longest 2 s.
    assert 0.2 <= latency["execution_p50_seconds"] < 1.0 and 2.0 * 0.9 <= latency["execution_p99_seconds"] < 3.0
    # All 8 ended within the last minute (they ran for a few seconds just now).
    assert metrics["throughput"] == {"jobs_per_second": round(8 / 60, 4), "peak_jobs_per_second": round(8 / 60, 4)}

    # Prometheus, from a second API server: nothing is kept in one process's memory.
    other = serve()
    for base_url in (api.base_url, other.url):
        samples = scrape(base_url)
        assert sample(samples, "jobservice_submit_latency_seconds_count") == 8  # the 8 POST /jobs/ above
        assert sample(samples, "jobservice_submit_latency_seconds_bucket", le="+Inf") == 8
        assert sample(samples, "jobservice_executions_total", queue="default", outcome="succeeded") == 6
        assert sample(samples, "jobservice_executions_total", queue="default", outcome="failed") == 1
        assert sample(samples, "jobservice_executions_total", queue="high-priority", outcome="succeeded") == 1
        assert sample(samples, "jobservice_jobs", queue="default", state="succeeded") == 6
        assert sample(samples, "jobservice_jobs", queue="default", state="failed") == 1
        assert sample(samples, "jobservice_queue_depth", queue="default") == 0
        dispatch_count = sum(sample(samples, "jobservice_dispatch_latency_seconds_count", queue=q) for q in ("default", "high-priority"))
        assert dispatch_count == 8
        execution_sum = sum(sample(samples, "jobservice_execution_duration_seconds_sum", queue=q) for q in ("default", "high-priority"))
        assert execution_sum == pytest.approx(sum(execution_s), abs=0.01)
        # Cumulative buckets: the seven jobs that ran under 2 s (all but the GPU job) are below le=2.
        under_2s = sum(sample(samples, "jobservice_execution_duration_seconds_bucket", queue=q, le="2.0") for q in ("default", "high-priority"))
        assert under_2s == sum(1 for s in execution_s if s < 2.0)
        assert 0 <= sample(samples, "jobservice_node_heartbeat_age_seconds", cluster="local", node="node-m") < 6  # NODE_LEASE_SECONDS
        assert sample(samples, "jobservice_node_alive", cluster="local", node="node-m") == 1
        assert sample(samples, "jobservice_gpus", cluster="local", state="free") == 2


# --- a job's timeline: retried then succeeded, streamed live, resumed -----------------------------------


def test_timeline_of_a_retried_job_streams_live_and_resumes(api: ApiClient, start_worker, start_scheduler, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jobservice.scheduler")
    worker = start_worker("node-t", RETRY_BACKOFF_BASE_SECONDS="0.3", LOG_FORMAT="json")
    start_scheduler()
    job = api.submit(command=sh('if [ "$JOB_ATTEMPT" = 0 ]; then exit 3; fi; sleep 0.3'), retry_policy={"max_retries": 2})
    streamed: list[dict[str, str]] = []
    with requests.get(api.url(f"/jobs/{job['id']}/events"), params={"follow": "true"}, stream=True, timeout=30) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        for event in sse_events(stream):
            streamed.append(event)
            if event.get("event") == "end":
                break
    assert streamed[-1] == {"event": "end", "data": "succeeded"}
    live = [json.loads(e["data"]) for e in streamed[:-1]]
    assert [int(e["id"]) for e in streamed[:-1]] == [e["id"] for e in live]

    events = timeline(api, job["id"])
    assert events == live
    assert [(e["from_status"], e["to_status"], e["attempt"]) for e in events] == [
        (None, "pending", 0), ("pending", "queued", 0), ("queued", "running", 0), ("running", "pending", 0),
        ("pending", "queued", 1), ("queued", "running", 1), ("running", "succeeded", 1),
    ]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert [ts(e["at"]) for e in events] == sorted(ts(e["at"]) for e in events)
    retry = events[3]
    assert retry["exit_code"] == 3 and retry["details"]["backoff_seconds"] == pytest.approx(0.3)
    assert "retry 1 of 2" in retry["reason"] and retry["actor"].startswith("worker-node-t-")
    assert events[1]["actor"] == "scheduler" and events[4]["actor"] == "scheduler"
    assert events[2]["worker_id"].startswith("worker-node-t-") and events[2]["node"] == "node-t"
    assert events[6]["exit_code"] == 0 and events[6]["cluster"] == "local"
    assert (ts(events[4]["at"]) - ts(events[3]["at"])).total_seconds() >= 0.3  # waited its backoff

    resumed = requests.get(
        api.url(f"/jobs/{job['id']}/events"), params={"follow": "true"}, headers={"Last-Event-ID": str(events[3]["id"])}, timeout=30
    )
    tail = list(sse_events(resumed))
    assert [int(e["id"]) for e in tail[:-1]] == [e["id"] for e in events[4:]] and tail[-1]["event"] == "end"

    final = explain(api, job["id"])
    assert final["reason"] == "SUCCEEDED" and final["exit_code"] == 0 and final["attempt"] == 1 and final["since"]

    # Structured logs: the worker's JSON lines and the scheduler's records name the job.
    lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("job_id") == job["id"]]
    assert {"running attempt 0", "running attempt 1"} <= {line["message"] for line in mine}
    assert any(line["message"].startswith("attempt 1 ended") for line in mine)
    assert all(line["worker_id"].startswith("worker-node-t-") for line in mine)
    admitted = [r for r in caplog.records if r.name == "jobservice.scheduler" and r.getMessage() == "admitted"]
    assert [getattr(r, "job_id", None) for r in admitted].count(job["id"]) == 2


# --- explain: each capacity reason, reproduced with a real worker ------------------------------------------


def test_explain_reproduces_each_capacity_reason(api: ApiClient, start_worker, start_scheduler) -> None:
    start_worker("gpu-node", concurrency=3, gpus=4, WORKER_CPU="4", WORKER_MEMORY="4Gi", RETRY_BACKOFF_BASE_SECONDS="60")
    start_scheduler()

    # BACKOFF: a failed attempt waits out its retry delay.
    flaky = api.submit(command=sh("exit 1"), retry_policy={"max_retries": 1}, resources=TINY)
    wait_for(lambda: api.get(f"/jobs/{flaky['id']}").json()["retry_count"] == 1, 20, message="the first attempt to fail")
    retry_event = timeline(api, flaky["id"])[-1]
    assert retry_event["to_status"] == "pending"
    backoff = explain(api, flaky["id"])
    assert backoff["reason"] == "BACKOFF", backoff
    assert (ts(backoff["retry_at"]) - ts(retry_event["at"])).total_seconds() == pytest.approx(retry_event["details"]["backoff_seconds"], abs=0.002)
    assert ts(backoff["estimated_start_at"]) >= ts(backoff["retry_at"])  # one attempt ended: a throughput to estimate from
    backlog = api.get("/queues/high-priority").json()["jobs"]
    assert backlog == [{"id": flaky["id"], "priority": 50, "queued_at": retry_event["at"], "retry_at": backoff["retry_at"]}]

    big = api.submit(command=sh("sleep 60"), priority=45, resources={"gpu": 3, "cpu": "3", "memory": "3Gi"})
    wait_for_status(api, big["id"], "running")

    # GANG_INCOMPLETE: 2 members of 1 GPU each, 1 GPU free.
    gang = api.submit(command=["true"], priority=44, resources={**TINY, "gpu": 1}, gang={"enabled": True, "min_members": 2})
    incomplete = explain(api, gang["id"])
    assert incomplete["reason"] == "GANG_INCOMPLETE", incomplete
    assert incomplete["blocking"] == {"resource": "gang_members", "requested": 2, "free": 1, "node": "local/gpu-node"}

    # HIGHER_PRIORITY_AHEAD: strict order; the gang blocks everything behind it.
    two_gpus = api.submit(command=["true"], priority=43, resources={**TINY, "gpu": 2})
    behind = explain(api, two_gpus["id"])
    assert behind["reason"] == "HIGHER_PRIORITY_AHEAD", behind
    assert behind["blocked_by"]["job_id"] == gang["id"] and behind["blocked_by"]["reason"] == "GANG_INCOMPLETE"

    # INSUFFICIENT_GPUS once the gang is gone.
    assert api.delete(f"/jobs/{gang['id']}").status_code == 200
    gpus = explain(api, two_gpus["id"])
    assert gpus["reason"] == "INSUFFICIENT_GPUS", gpus
    assert gpus["blocking"] == {"resource": "gpus", "requested": 2, "free": 1, "node": "local/gpu-node"}
    assert api.delete(f"/jobs/{two_gpus['id']}").status_code == 200

    cpu = api.submit(command=["true"], priority=40, resources={"cpu": "2", "memory": "64Mi"})
    assert explain(api, cpu["id"])["blocking"] == {"resource": "cpu", "requested": "2", "free": "1", "node": "local/gpu-node"}
    assert explain(api, cpu["id"])["reason"] == "INSUFFICIENT_CPU"
    assert api.delete(f"/jobs/{cpu['id']}").status_code == 200

    memory = api.submit(command=["true"], priority=40, resources={"cpu": "100m", "memory": "2Gi"})
    short = explain(api, memory["id"])
    assert short["reason"] == "INSUFFICIENT_MEMORY" and short["blocking"] == {
        "resource": "memory", "requested": "2Gi", "free": "1Gi", "node": "local/gpu-node",
    }
    assert api.delete(f"/jobs/{memory['id']}").status_code == 200

    # NO_FREE_SLOTS: three jobs hold the worker's three slots.
    fillers = [api.submit(command=sh("sleep 60"), priority=30, resources=TINY) for _ in range(2)]
    for filler in fillers:
        wait_for_status(api, filler["id"], "running")
    no_slot = explain(api, api.submit(command=["true"], priority=30, resources=TINY)["id"])
    assert no_slot["reason"] == "NO_FREE_SLOTS" and no_slot["blocking"]["free"] == 0, no_slot
    gpu_view = scrape(api.base_url)
    assert sample(gpu_view, "jobservice_gpus", cluster="local", state="used") == 3


# --- explain without workers: no nodes; placed and waiting for a worker -----------------------------------


def test_explain_without_nodes_and_while_waiting_for_a_worker(api: ApiClient, database: Database, settings: Settings) -> None:
    job = api.submit(command=["true"], resources=TINY)
    nodes = explain(api, job["id"])
    assert nodes["reason"] == "NO_NODES" and nodes["queue_position"] == 1
    assert nodes["estimated_start_at"] is None and nodes["estimate_basis"]

    with database.session() as s:
        execution.register_node(s, cluster="local", name="idle-host", gpu_indices=[], gpu_type=None,
                                cpu_millis=1000, memory_bytes=2**30, slots=1)
    assert explain(api, job["id"])["reason"] == "WAITING_FOR_SCHEDULER"
    with database.session() as s:
        assert admit(s, settings).admitted == [job["id"]]  # admitted, but no worker consumes the task
    placed = explain(api, job["id"])
    assert placed["reason"] == "WAITING_FOR_WORKER" and placed["node"] == "idle-host" and placed["since"]
    assert api.get("/queues/").json()["queues"][0]["queued"] == 1


# --- counters, positions and pages agree with the rows, under concurrent writers --------------------------


def test_counters_positions_and_pages_agree_with_the_rows(api: ApiClient, database: Database) -> None:
    def submit_many(priorities: list[int]) -> None:
        client = ApiClient(api.base_url)
        for p in priorities:
            client.submit(command=["true"], priority=p)

    threads = [threading.Thread(target=submit_many, args=([(i * 7 + k) % 101 for k in range(12)],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with database.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM jobs ORDER BY id"))]
    for job_id in ids[::4]:
        assert api.delete(f"/jobs/{job_id}").status_code == 200

    def truth() -> dict[str, dict[str, int]]:
        with database.engine.connect() as conn:
            rows = conn.execute(text("SELECT queue, status, count(*) FROM jobs GROUP BY queue, status")).all()
        out: dict[str, dict[str, int]] = {}
        for queue, status, n in rows:
            out.setdefault(queue, {})[status] = n
        return out

    with database.session() as s:
        assert counters.counts_by_queue_and_status(s) == truth()
        counters.fold(s)
        assert counters.counts_by_queue_and_status(s) == truth()
        assert s.execute(text("SELECT count(*) FROM job_count_deltas")).scalar() == 0
    overview = api.get("/queues/").json()
    assert overview["total_pending"] == sum(c.get("pending", 0) for c in truth().values()) == 72 - 18

    for queue in ("high-priority", "default"):
        with database.engine.connect() as conn:
            order = [r[0] for r in conn.execute(text(
                "SELECT id FROM jobs WHERE status = 'pending' AND queue = :q ORDER BY priority DESC, created_at, id"), {"q": queue})]
        paged, after = [], None
        while True:
            page = api.get(f"/queues/{queue}", params={"limit": 7, **({"after": after} if after else {})}).json()
            paged += [j["id"] for j in page["jobs"]]
            after = page["next"]
            if after is None:
                break
        assert paged == order
        for position, job_id in enumerate(order, 1):
            assert api.get(f"/jobs/{job_id}").json()["queue_position"] == position

    # A priority level deeper than the counters' short scans on both sides of a job: still exact.
    with database.engine.begin() as conn:
        conn.execute(text(
            """INSERT INTO jobs (id, owner, job_type, priority, queue, status, created_at, updated_at, pending_since)
               SELECT 'deep-' || lpad(g::text, 6, '0'), 'local', 'bulk', 3, 'default', 'pending',
                      now() - interval '1 day' + g * interval '1 ms', now(), now()
               FROM generate_series(1, :n) AS g"""), {"n": 2 * counters.SAME_PRIORITY_SCAN_LIMIT + 50})
    with database.engine.connect() as conn:
        higher = conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'pending' AND queue = 'default' AND priority > 3")).scalar()
    for rank in (10, counters.SAME_PRIORITY_SCAN_LIMIT + 25, 2 * counters.SAME_PRIORITY_SCAN_LIMIT + 50):
        assert api.get(f"/jobs/deep-{rank:06d}").json()["queue_position"] == higher + rank


# --- authorization ------------------------------------------------------------------------------------


def test_who_may_see_what(serve, database: Database) -> None:
    server = serve(auth_enabled=True)

    def as_user(sub: str, scopes: str | None = "jobs:read jobs:write") -> ApiClient:
        return ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub, scopes)}"})

    alice, bob, scopeless = as_user("alice"), as_user("bob"), as_user("carol", None)
    job = alice.submit(command=["true"], resources=TINY)
    for path in ("/queues/", "/queues/default", "/metrics/"):
        assert ApiClient(server.url).get(path).status_code == 401
        assert scopeless.get(path).status_code == 200  # any valid token
    for path in (f"/jobs/{job['id']}/events", f"/jobs/{job['id']}/explain"):
        assert alice.get(path).status_code == 200
        hidden = bob.get(path)
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "NOT_FOUND"
        assert scopeless.get(path).status_code == 403
    assert requests.get(f"{server.url}/metrics", timeout=30).status_code == 200  # scrapers carry no token


# --- Flower shows the service's workers and their queues ------------------------------------------------


def test_flower_shows_the_workers_and_their_queues(e2e_env: dict[str, str], start_worker, tmp_path: Path) -> None:
    start_worker("flower-node")
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--app", "workers.celery_app", "flower", f"--port={port}", "--address=127.0.0.1"],
        env={**e2e_env, "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def worker_seen() -> dict[str, Any] | None:
            try:
                workers = requests.get(f"http://127.0.0.1:{port}/api/workers", params={"refresh": "1"}, timeout=10).json()
            except (requests.RequestException, ValueError):
                return None
            return next((info for name, info in workers.items() if name.startswith("flower-node@") and info.get("active_queues")), None)

        info = wait_for(worker_seen, 60, 0.5, "Flower to list the worker")
        assert {q["name"] for q in info["active_queues"]} == {"high-priority.local.flower-node", "default.local.flower-node"}
        assert "jobservice.execute_job" in info["registered"]
        lengths = requests.get(f"http://127.0.0.1:{port}/api/queues/length", timeout=10).json()["active_queues"]
        assert {"high-priority.local.flower-node", "default.local.flower-node"} <= {q["name"] for q in lengths}
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(10)
        log.close()
