"""Worker pools and GPU types (issue 13): placement, the policy's pools, submit-time refusal, pool metrics."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text

from app.db import Database
from app.domain import pools
from app.domain.capacity import NodeCapacity, place
from app.domain.policy import NEVER_FITS_LIVE, Admit, Pending, Reserve, Running, Snapshot, Wait, decide
from config import Settings
from tests.conftest import ApiClient

GIB = 1 << 30
NOW = 1_000_000.0


def node(name: str, gpu_type: str, gpus: int = 8, pool: str | None = None) -> NodeCapacity:
    return NodeCapacity("local", name, list(range(gpus)), gpu_type, 64_000, 512 * GIB, 16, pool=pool)


def job(id: str, gpus: int = 1, priority: int = 50, types: tuple[str, ...] = (), pool: str | None = None, at: float = 0.0) -> Pending:
    return Pending(id, "alice", priority, "q", NOW - 1000 + at, 1000, GIB, gpus, timeout_seconds=600, gpu_types=types, node_pool=pool)


def test_place_keeps_to_the_types_in_their_order_of_preference() -> None:
    h100, a100 = node("h", "H100"), node("a", "A100")
    assert place([h100, a100], 1000, GIB, 1, 1, gpu_types=("A100",)).node == "a"
    assert place([h100, a100], 1000, GIB, 1, 1, gpu_types=("H100", "A100")).node == "h"
    h100.used_gpus.update(range(8))  # the preferred type is full: the next acceptable one serves
    assert place([h100, a100], 1000, GIB, 1, 1, gpu_types=("H100", "A100")).node == "a"
    assert place([h100, a100], 1000, GIB, 1, 1, gpu_types=("H100",)) is None
    assert place([h100, a100], 1000, GIB, 1, 1, gpu_types=("V100",)) is None
    assert place([node("p", "A100", pool="big"), a100], 1000, GIB, 1, 1, pool="big").node == "p"
    # nvidia-smi's name and the Kubernetes product label name the same model.
    label = node("k", "NVIDIA-H100-80GB-HBM3")
    assert place([label], 1000, GIB, 1, 1, gpu_types=("nvidia h100 80GB  HBM3",)).node == "k"
    assert place([label], 1000, GIB, 1, 1, gpu_types=("NVIDIA-H100-80GB",)) is None


def test_a_job_waiting_for_a_busy_type_holds_back_no_job_of_another_type() -> None:
    h100, a100 = node("h", "H100"), node("a", "A100")
    h100.used_gpus.update(range(8))
    h100.used_slots = 1
    busy = [Running("r", "bob", "local", (("h", 1),), 1000, GIB, 8, NOW + 5000)]
    plan = decide(Snapshot(NOW, [h100, a100], busy, [job("h-big", 8, 90, ("H100",)), job("a-small", 8, 10, ("A100",), at=1)]))
    reserved = plan.decisions["h-big"]
    assert isinstance(reserved, Reserve) and reserved.nodes == ("h",)
    admitted = plan.decisions["a-small"]
    # Placed by type, the H100 job cannot take the free A100 node, and it holds nothing of that node back.
    assert isinstance(admitted, Admit) and admitted.placement.node == "a"


def test_a_type_no_live_node_has_waits_and_blocks_nobody() -> None:
    plan = decide(Snapshot(NOW, [node("a", "A100")], [], [job("v", 1, 99, ("V100",)), job("any", 1, 1)]))
    assert isinstance(plan.decisions["v"], Wait) and plan.decisions["v"].reason == NEVER_FITS_LIVE
    assert isinstance(plan.decisions["any"], Admit)


def test_pool_demand_counts_what_only_one_pool_can_serve(database: Database, settings: Settings) -> None:
    now = datetime.now(timezone.utc)
    with database.engine.begin() as conn:
        for name, gpu_type, pool, alive in [("h1", "H100", "h100", True), ("a1", "A100", "a100", True),
                                            ("a2", "A100", "a100-spot", False)]:
            conn.execute(text(
                "INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, pool, cpu_millis, memory_bytes, slots, heartbeat_at)"
                " VALUES ('local', :n, '[0,1,2,3]', :t, :p, 8000, 8589934592, 4, :at)"),
                {"n": name, "t": gpu_type, "p": pool, "at": now if alive else now - timedelta(hours=1)})
        rows: list[dict[str, Any]] = [
            {"types": ["H100"], "pool": None, "gpus": 2, "gang": 3},   # H100 nodes are all in pool h100: 6 GPUs
            {"types": ["H100"], "pool": None, "gpus": 1, "gang": 1},
            {"types": ["A100"], "pool": None, "gpus": 1, "gang": 1},   # a100 and a100-spot: no single pool
            {"types": None, "pool": "a100", "gpus": 4, "gang": 1},     # named pool
            {"types": None, "pool": "scaled-to-zero", "gpus": 1, "gang": 1},
            {"types": None, "pool": None, "gpus": 8, "gang": 1},       # anywhere: no pool's demand
        ]
        for i, row in enumerate(rows):
            conn.execute(text(
                "INSERT INTO jobs (id, owner, job_type, priority, queue, status, gpus, gpu_types, pool, gang_enabled,"
                " gang_min_members) VALUES (:id, 'alice', 't', 50, 'default', 'pending', :gpus, :types, :pool,"
                " :gang > 1, :gang)"),
                {"id": f"job-{i}", **row})
        conn.execute(text("INSERT INTO jobs (id, owner, job_type, priority, queue, status, gpus, pool, holds_resources,"
                          " cluster, placement) VALUES ('running', 'bob', 't', 50, 'default', 'running', 3, 'h100', true,"
                          " 'local', '[{\"node\": \"h1\", \"members\": 1, \"gpu_indices\": [0, 1, 2]}]')"))
    with database.session() as session:
        demand = {row.pool: row for row in pools.pool_demand(session, settings, now)}
    h100 = demand["h100"]
    assert (h100.pending_jobs, h100.pending_gpus, h100.idle_gpus, h100.gpus, h100.nodes) == (2, 7, 1, 4, 1)
    assert (demand["a100"].pending_jobs, demand["a100"].pending_gpus, demand["a100"].idle_gpus) == (1, 4, 4)
    assert (demand["a100-spot"].pending_jobs, demand["a100-spot"].idle_gpus, demand["a100-spot"].nodes) == (0, 0, 0)
    assert demand["scaled-to-zero"].pending_gpus == 1

    # Counted by triggers, not by reading the backlog: admissions and cancels take demand away, a fold keeps it.
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'queued' WHERE id = 'job-0'"))
        conn.execute(text("DELETE FROM jobs WHERE id = 'job-4'"))
        conn.execute(text("UPDATE jobs SET priority = 60 WHERE id = 'job-1'"))  # still pending: no change
    with database.session() as session:
        before = {row.pool: row for row in pools.pool_demand(session, settings, now)}
        pools.fold(session)
        assert session.execute(text("SELECT count(*) FROM pool_demand_deltas")).scalar() == 0
        after = {row.pool: row for row in pools.pool_demand(session, settings, now)}
    assert before == after
    assert (after["h100"].pending_jobs, after["h100"].pending_gpus) == (1, 1)
    assert "scaled-to-zero" not in after


@pytest.mark.parametrize("gpu_type", ["", " H100", "H100 ", "a\tb", "x" * 129, [], ["A"] * 9, ["A", "A"], [1], {"a": 1}, 5, None])
def test_gpu_type_is_bounded(api: ApiClient, gpu_type: Any) -> None:
    response = api.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {"gpu_type": gpu_type}})
    assert response.status_code == 400, response.text
    fields = [d["field"] for d in response.json()["error"]["details"]]
    assert any(f.startswith("resources.gpu_type") for f in fields), fields


@pytest.mark.parametrize("pool", ["", "-a", "a b", "x" * 64, 5])
def test_pool_is_bounded(api: ApiClient, pool: Any) -> None:
    response = api.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {"pool": pool}})
    assert response.status_code == 400 and response.json()["error"]["details"][0]["field"] == "resources.pool", response.text


def test_gpu_type_is_documented(api: ApiClient) -> None:
    document = api.get("/openapi.json").json()
    resources = document["components"]["schemas"]["Resources"]["properties"]
    string, array = resources["gpu_type"]["oneOf"]
    assert string["maxLength"] == 128 and "pattern" in string
    assert array["maxItems"] == 8 and array["items"]["maxLength"] == 128
    assert resources["pool"]["pattern"]
