"""The scheduling policy on the real service: reservations with backfill, pools, fair share (issue 10)."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from app.db import Database
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token, wait_for, wait_for_status
from tests.test_observability_e2e import sample, scrape

TINY = {"cpu": "100m", "memory": "64Mi"}


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def explain(api: ApiClient, job_id: str) -> dict[str, Any]:
    response = api.get(f"/jobs/{job_id}/explain")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def api(e2e_settings: Settings, database: Database) -> Iterator[ApiClient]:
    """The API with the scheduler's own settings (kill grace, leases), so explain plans as the scheduler does."""
    server = LiveServer(e2e_settings)
    yield ApiClient(server.url)
    server.stop()


def test_a_big_job_is_reserved_short_jobs_backfill_and_it_starts_on_time(api: ApiClient, start_worker, start_scheduler) -> None:
    start_worker("gpu-a", concurrency=4, gpus=4, WORKER_CPU="8", WORKER_MEMORY="8Gi")
    start_scheduler()
    holder = api.submit(command=sh("sleep 6"), priority=50, timeout_seconds=8, resources={**TINY, "gpu": 2})
    holder = wait_for_status(api, holder["id"], "running")
    big = api.submit(command=sh("sleep 1"), priority=90, timeout_seconds=30, resources={**TINY, "gpu": 4})
    short = api.submit(command=sh("sleep 1"), priority=10, timeout_seconds=2, resources={**TINY, "gpu": 1})
    long = api.submit(command=sh("sleep 1"), priority=10, timeout_seconds=120, resources={**TINY, "gpu": 1})

    reserved = wait_for(lambda: (e := explain(api, big["id"]))["reason"] == "RESERVED" and e, 10, message="a reservation")
    assert reserved["reserved_nodes"] == ["local/gpu-a"]
    # The latest the holder can end: its start + its timeout + the kill grace (FAST_TIMINGS: 2 s).
    promised = ts(reserved["reserved_start_at"])
    assert abs((promised - ts(holder["started_at"])).total_seconds() - 10) < 0.01, reserved
    assert reserved["estimated_start_at"] == reserved["reserved_start_at"]

    # The short job fits around the reservation and runs now; the long one would still hold its GPU then.
    assert wait_for_status(api, short["id"], {"succeeded", "failed"})["status"] == "succeeded"
    waiting = explain(api, long["id"])
    assert api.get(f"/jobs/{big['id']}").json()["status"] == "pending", "the holder ended before the check"
    assert waiting["reason"] == "BACKFILL_WINDOW" and waiting["blocked_by"]["job_id"] == big["id"], waiting

    started_big = wait_for_status(api, big["id"], {"running", "succeeded"}, timeout=30)
    assert ts(started_big["started_at"]) <= promised  # never later than without backfill
    done_long = wait_for_status(api, long["id"], {"succeeded", "failed"}, timeout=30)
    assert ts(done_long["started_at"]) >= ts(started_big["started_at"])
    done_short = api.get(f"/jobs/{short['id']}").json()
    assert ts(done_short["started_at"]) < ts(started_big["started_at"])


def test_a_blocked_gpu_job_holds_back_its_pool_but_not_cpu_jobs(api: ApiClient, start_worker, start_scheduler) -> None:
    start_worker("gpu-a", concurrency=4, gpus=2, WORKER_CPU="8", WORKER_MEMORY="8Gi")
    start_worker("cpu-b", concurrency=2, gpus=0, WORKER_CPU="8", WORKER_MEMORY="8Gi")
    start_scheduler()
    holder = api.submit(command=sh("sleep 60"), priority=50, resources={**TINY, "gpu": 2})  # no timeout: no end known
    wait_for_status(api, holder["id"], "running")
    gpu_job = api.submit(command=["true"], priority=90, resources={**TINY, "gpu": 2})
    behind = api.submit(command=["true"], priority=80, resources={**TINY, "gpu": 1})
    cpu_job = api.submit(command=sh("echo cpu"), priority=10, resources=TINY)

    assert wait_for_status(api, cpu_job["id"], {"succeeded", "failed"})["status"] == "succeeded"
    blocked = explain(api, gpu_job["id"])
    assert blocked["reason"] == "INSUFFICIENT_GPUS" and "no timeout" in blocked["message"], blocked
    held_back = explain(api, behind["id"])
    assert held_back["reason"] == "HIGHER_PRIORITY_AHEAD" and held_back["blocked_by"]["job_id"] == gpu_job["id"], held_back
    assert api.get(f"/jobs/{behind['id']}").json()["status"] == "pending"
    assert api.delete(f"/jobs/{holder['id']}").status_code == 200
    assert wait_for_status(api, gpu_job["id"], {"succeeded", "failed"})["status"] == "succeeded"


@pytest.fixture
def auth_api(e2e_settings: Settings, database: Database) -> Iterator[LiveServer]:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True))
    yield server
    server.stop()


def test_a_light_users_job_overtakes_a_burst_at_equal_priority_only(auth_api: LiveServer, start_worker, start_scheduler) -> None:
    heavy = ApiClient(auth_api.url, {"Authorization": f"Bearer {make_token('heavy')}"})
    light = ApiClient(auth_api.url, {"Authorization": f"Bearer {make_token('light')}"})
    admin = ApiClient(auth_api.url, {"Authorization": f"Bearer {make_token('ops', 'admin')}"})
    start_worker("solo", concurrency=1, gpus=0)
    start_scheduler()
    burst = [heavy.submit(command=sh("sleep 1.5"), priority=50, resources=TINY)]
    wait_for_status(heavy, burst[0]["id"], "running")
    burst += [heavy.submit(command=sh("sleep 1.5"), priority=50, resources=TINY) for _ in range(3)]
    mine = light.submit(command=sh("sleep 1.5"), priority=50, resources=TINY)
    urgent = heavy.submit(command=sh("sleep 1.5"), priority=60, resources=TINY)

    ranked = explain(heavy, burst[1]["id"])
    assert ranked["fair_share"]["owner"] == "heavy" and ranked["fair_share"]["rank"] == 2, ranked
    assert explain(light, mine["id"])["fair_share"]["rank"] == 1
    everyone = {row["owner"]: row for row in admin.get("/fairness/").json()["owners"]}
    assert everyone["light"]["rank"] == 1 and everyone["heavy"]["rank"] == 2 and everyone["heavy"]["pending"] == 4
    assert everyone["heavy"]["share"] > everyone["light"]["share"] == 0
    assert [row["owner"] for row in light.get("/fairness/").json()["owners"]] == ["light"]
    metrics = scrape(auth_api.url)
    assert sample(metrics, "jobservice_fair_share_backlog", owner="heavy") == 4
    assert sample(metrics, "jobservice_fair_share", owner="heavy") > sample(metrics, "jobservice_fair_share", owner="light") == 0

    done = {job["id"]: wait_for_status(admin, job["id"], {"succeeded", "failed"}, timeout=60) for job in [*burst, mine, urgent]}
    order = sorted(done, key=lambda job_id: done[job_id]["started_at"])
    # Priority dominates (the urgent job first), then the light user's job overtakes the rest of the burst.
    assert order == [burst[0]["id"], urgent["id"], mine["id"], *(job["id"] for job in burst[1:])], order
    after = {row["owner"]: row for row in admin.get("/fairness/").json()["owners"]}
    assert after["heavy"]["cpu_seconds"] > after["light"]["cpu_seconds"] > 0


def test_a_tenant_claim_makes_one_fair_share_owner_of_its_members(e2e_settings: Settings, database: Database) -> None:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True, jwt_tenant_claim="team"))
    try:
        for sub, team in (("alice", "research"), ("bob", "research"), ("carol", None)):
            user = ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub, team=team)}"})
            user.submit(command=["true"], resources=TINY)
        admin = ApiClient(server.url, {"Authorization": f"Bearer {make_token('ops', 'admin')}"})
        owners = {row["owner"]: row["pending"] for row in admin.get("/fairness/").json()["owners"]}
        assert owners == {"research": 2, "carol": 1}
        bob = ApiClient(server.url, {"Authorization": f"Bearer {make_token('bob', team='research')}"})
        assert [row["owner"] for row in bob.get("/fairness/").json()["owners"]] == ["research"]
    finally:
        server.stop()
