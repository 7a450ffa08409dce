"""Quotas per tenant (issue 11): the policy's rule, the admin API, submit's refusal, /fairness, Prometheus, the real service."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.db import Database
from app.domain.policy import QUOTA_EXCEEDED, Admit, Reserve, Snapshot, Wait, decide
from app.domain.quotas import Quota
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token, wait_for, wait_for_status
from tests.test_observability_e2e import sample, scrape
from tests.test_policy import GIB, NOW, job, node, running

TINY = {"cpu": "100m", "memory": "64Mi"}


# --- the rule, in the pure policy ----------------------------------------------------------------


def gpu_quota(tenant: str, gpus: int, borrow: int = 0, cluster: str = "*") -> Quota:
    return Quota(tenant, cluster, (gpus, None, None), (borrow, 0, 0))


def test_a_job_beyond_its_tenants_quota_waits_naming_it_and_holds_nothing_back() -> None:
    a = node("a")
    busy = [running("r1", a, 2, ends_in=1000, owner="alice")]
    backlog = [job("over", gpus=1, priority=90, owner="alice"), job("other", gpus=1, priority=10, owner="bob")]
    plan = decide(Snapshot(NOW, [a], busy, backlog, quotas={"alice": [gpu_quota("alice", 2)]}))
    over = plan.decisions["over"]
    assert isinstance(over, Wait) and over.reason == QUOTA_EXCEEDED, over
    assert over.quota is not None and (over.quota.resource, over.quota.quota, over.quota.used, over.quota.requested) == ("gpu", "2", "2", "1")
    assert "gpu quota fleet-wide" in over.message and "uses 2" in over.message
    assert isinstance(plan.decisions["other"], Admit)  # another tenant is not held back, and nothing is reserved for it
    assert not plan.reserved


def test_borrowing_lets_a_tenant_use_idle_capacity_up_to_its_limit_and_no_further() -> None:
    a = node("a")
    backlog = [job(f"j{i}", gpus=1, owner="alice", at=i) for i in range(5)]
    plan = decide(Snapshot(NOW, [a], [], backlog, quotas={"alice": [gpu_quota("alice", 2, borrow=1)]}))
    admitted = sorted(d.job.id for d in plan.admitted)
    assert admitted == ["j0", "j1", "j2"]  # 2 nominal + 1 borrowed, though 8 GPUs are free
    assert all(plan.decisions[f"j{i}"].reason == QUOTA_EXCEEDED for i in (3, 4))


def test_a_cluster_quota_counts_only_that_cluster_and_a_job_goes_where_its_quota_allows() -> None:
    local, k8s = node("a"), node("k1", cluster="kube")
    busy = [running("r1", local, 1, ends_in=1000, owner="alice")]
    quotas = {"alice": [gpu_quota("alice", 1, cluster="local")]}
    plan = decide(Snapshot(NOW, [local, k8s], busy, [job("more", gpus=1, owner="alice")], quotas=quotas))
    more = plan.decisions["more"]
    # local would place it first, but alice's local quota is used up: it waits rather than exceed it ...
    assert isinstance(more, Wait) and more.reason == QUOTA_EXCEEDED and more.quota.cluster == "local"
    # ... and with a fleet-wide quota of 2 as well it still may not exceed local's 1.
    quotas = {"alice": [gpu_quota("alice", 2), gpu_quota("alice", 1, cluster="local")]}
    busy = [running("r1", node("a2"), 1, ends_in=1000, owner="alice")]
    plan = decide(Snapshot(NOW, [node("a2"), node("k2", cluster="kube")], busy, [job("x", gpus=2, owner="alice")], quotas=quotas))
    assert plan.decisions["x"].reason == QUOTA_EXCEEDED and plan.decisions["x"].quota.cluster == "*"


def test_a_job_over_quota_does_not_take_a_reservation() -> None:
    a = node("a", gpus=2)
    busy = [running("r1", a, 2, ends_in=1000, owner="bob")]
    plan = decide(Snapshot(NOW, [a], busy, [job("big", gpus=2, priority=90, owner="alice"), job("b2", gpus=2, owner="carol")],
                           quotas={"alice": [gpu_quota("alice", 1, borrow=0)]}))
    assert plan.decisions["big"].reason == QUOTA_EXCEEDED
    assert isinstance(plan.decisions["b2"], Reserve)  # the next job gets the reservation instead


def test_cpu_and_memory_quotas_hold_too() -> None:
    a = node("a")
    quotas = {"alice": [Quota("alice", "*", (None, 1500, 10 * GIB), (0, 0, 0))]}
    plan = decide(Snapshot(NOW, [a], [], [job("c1", owner="alice"), job("c2", owner="alice", at=1)], quotas=quotas))
    assert isinstance(plan.decisions["c1"], Admit)
    assert plan.decisions["c2"].reason == QUOTA_EXCEEDED and plan.decisions["c2"].quota.resource == "cpu"
    assert plan.decisions["c2"].quota.quota == "1.5"  # cores, as format_millis shows them to people


# --- the admin API ---------------------------------------------------------------------------------


@pytest.fixture
def server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    live = LiveServer(settings.with_overrides(auth_enabled=True, jwt_tenant_claim="team"))
    yield live
    live.stop()


def client(server: LiveServer, sub: str, scopes: str = "jobs:read jobs:write", **claims: Any) -> ApiClient:
    return ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub, scopes, **claims)}"})


QUOTA = {"quotas": [{"cluster": "*", "gpu": 4, "cpu": "16", "memory": "64Gi", "borrowing_limit": {"gpu": 2, "cpu": "4", "memory": "8Gi"}}]}


def test_only_admins_read_or_change_quotas(server: LiveServer) -> None:
    user = client(server, "alice", team="research")
    for method, path, body in (("GET", "/quotas/", None), ("GET", "/quotas/research", None), ("PUT", "/quotas/research", QUOTA),
                               ("DELETE", "/quotas/research", None)):
        response = user.request(method, path, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "FORBIDDEN"
    assert client(server, "ops", "admin").get("/quotas/research").json()["quotas"] == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"quotas": [{"gpu": -1}]}, "quotas.0.gpu"),
        ({"quotas": [{"gpu": 1.0}]}, "quotas.0.gpu"),
        ({"quotas": [{"gpu": "2"}]}, "quotas.0.gpu"),
        ({"quotas": [{"gpu": 1_000_001}]}, "quotas.0.gpu"),
        ({"quotas": [{"cpu": 4}]}, "quotas.0.cpu"),
        ({"quotas": [{"cpu": "-1"}]}, "quotas.0.cpu"),
        ({"quotas": [{"cpu": "1u"}]}, "quotas.0.cpu"),
        ({"quotas": [{"memory": "2Ei"}]}, "quotas.0.memory"),
        ({"quotas": [{"memory": "1.5"}]}, "quotas.0.memory"),
        ({"quotas": [{"cluster": "no/such"}]}, "quotas.0.cluster"),
        ({"quotas": [{"cluster": "*"}, {"cluster": "*"}]}, "quotas"),
        ({"quotas": []}, "quotas"),
        ({"quotas": [{"gpu": 1, "borrowing_limit": {"gpu": -1}}]}, "quotas.0.borrowing_limit.gpu"),
        ({"quotas": [{"gpu": 1, "extra": 1}]}, "quotas.0.extra"),
        ({}, "quotas"),
    ],
)
def test_bad_quotas_are_refused_naming_the_field(server: LiveServer, body: dict[str, Any], field: str) -> None:
    admin = client(server, "ops", "admin")
    response = admin.request("PUT", "/quotas/research", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and field in [d["field"] for d in error["details"]], error
    assert admin.get("/quotas/research").json()["quotas"] == []


def test_a_bad_tenant_name_is_refused(server: LiveServer) -> None:
    admin = client(server, "ops", "admin")
    for tenant in ("-dash", "a b", "x" * 201):
        response = admin.request("PUT", f"/quotas/{tenant}", json=QUOTA)
        assert response.status_code == 400, (tenant, response.text)
        assert response.json()["error"]["details"][0]["field"] == "tenant"


def test_quotas_are_set_read_listed_removed_and_audited(server: LiveServer) -> None:
    admin = client(server, "ops", "admin")
    response = admin.request("PUT", "/quotas/research", json=QUOTA)
    assert response.status_code == 200, response.text
    [row] = response.json()["quotas"]
    assert (row["cluster"], row["gpu"], row["cpu"], row["memory"]) == ("*", 4, "16", "64Gi")
    assert row["borrowing_limit"] == {"gpu": 2, "cpu": "4", "memory": "8Gi"}
    assert row["used"] == {"gpu": 0, "cpu": "0", "memory": "0"} and row["borrowed"]["gpu"] == 0
    second = {"quotas": [{"cluster": "local", "gpu": 1}]}
    assert admin.request("PUT", "/quotas/research", json=second).status_code == 200
    listed = admin.get("/quotas/").json()["tenants"]
    assert [(t["tenant"], [q["cluster"] for q in t["quotas"]]) for t in listed] == [("research", ["local"])]
    assert admin.delete("/quotas/research").status_code == 204
    assert admin.delete("/quotas/research").status_code == 404
    view = admin.get("/quotas/research").json()
    assert view["quotas"] == []
    changes = view["changes"]
    assert [(c["action"], c["actor"]) for c in changes] == [("delete", "ops"), ("put", "ops"), ("put", "ops")]
    assert changes[1]["before"][0]["gpu"] == 4 and changes[1]["after"][0]["cluster"] == "local"
    assert changes[0]["after"] == []


def test_a_job_larger_than_quota_plus_borrowing_is_refused_at_submit(server: LiveServer, database: Database) -> None:
    with database.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("INSERT INTO nodes (cluster, name, gpu_indices, cpu_millis, memory_bytes, slots) "
                          "VALUES ('local', 'n1', '[0,1,2,3,4,5,6,7]', 64000, 68719476736, 8)"))
    admin = client(server, "ops", "admin")
    assert admin.request("PUT", "/quotas/research", json={"quotas": [{"gpu": 2, "borrowing_limit": {"gpu": 1}}]}).status_code == 200
    alice = client(server, "alice", team="research")
    response = alice.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {**TINY, "gpu": 4}})
    assert response.status_code == 400, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["field"] == "resources" and "gpu quota" in detail["message"] and "quota 2 + borrowing limit 1" in detail["message"]
    # Within quota + borrowing it is accepted, and so is anyone else's (no quota: unlimited).
    assert alice.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {**TINY, "gpu": 3}}).status_code == 201
    bob = client(server, "bob")
    assert bob.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {**TINY, "gpu": 8}}).status_code == 201


def test_quotas_are_seeded_from_the_file_for_tenants_without_one(settings: Settings, database: Database, tmp_path: Path) -> None:
    from app.scheduler import seed_quotas

    path = tmp_path / "quotas.json"
    path.write_text(json.dumps({"research": [{"gpu": 8, "borrowing_limit": {"gpu": 2}}], "infra": [{"cluster": "local", "cpu": "32"}]}))
    assert sorted(seed_quotas(settings.with_overrides(quotas_file=str(path)), database)) == ["infra", "research"]
    path.write_text(json.dumps({"research": [{"gpu": 1}]}))
    assert seed_quotas(settings.with_overrides(quotas_file=str(path)), database) == []  # what is set already wins
    path.write_text(json.dumps({"bad": [{"gpu": -1}]}))
    assert seed_quotas(settings.with_overrides(quotas_file=str(path)), database) == []  # logged, not applied
    with database.session() as session:
        from app.domain import quotas

        found = quotas.load_all(session)
        assert found["research"][0].nominal == (8, None, None) and found["research"][0].borrowing == (2, 0, 0)
        assert found["infra"][0].cluster == "local" and found["infra"][0].nominal == (None, 32000, None)
        assert "bad" not in found
        assert quotas.history(session, "research")[0].actor == "QUOTAS_FILE"


# --- on the real service ---------------------------------------------------------------------------


def test_quotas_hold_and_borrowing_works_on_the_real_service(e2e_settings: Settings, database: Database, start_worker, start_scheduler) -> None:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True, jwt_tenant_claim="team"))
    try:
        admin = client(server, "ops", "admin")
        start_worker("gpu-q", concurrency=6, gpus=4, WORKER_CPU="8", WORKER_MEMORY="8Gi")
        body = {"quotas": [{"cluster": "*", "gpu": 1, "borrowing_limit": {"gpu": 1}}]}
        assert admin.request("PUT", "/quotas/research", json=body).status_code == 200
        start_scheduler()
        alice = client(server, "alice", team="research")
        mine = [alice.submit(command=["sleep", "30"], timeout_seconds=60, resources={**TINY, "gpu": 1}) for _ in range(3)]
        running = [wait_for_status(alice, job["id"], "running") for job in mine[:2]]  # 1 nominal + 1 borrowed
        third = wait_for(lambda: (e := alice.get(f"/jobs/{mine[2]['id']}/explain").json())["reason"] == "QUOTA_EXCEEDED" and e,
                         15, message="QUOTA_EXCEEDED")
        assert third["quota"] == {"tenant": "research", "cluster": "*", "resource": "gpu", "quota": "1", "borrowing_limit": "1",
                                  "used": "2", "requested": "1"}, third
        # Free GPUs are left, and another tenant's job takes one at once.
        carol = client(server, "carol")
        other = carol.submit(command=["sleep", "30"], timeout_seconds=60, resources={**TINY, "gpu": 1})
        wait_for_status(carol, other["id"], "running")
        assert alice.get(f"/jobs/{mine[2]['id']}").json()["status"] == "pending"

        owners = {row["owner"]: row for row in admin.get("/fairness/").json()["owners"]}
        [quota] = owners["research"]["quotas"]
        assert quota["used"]["gpu"] == 2 and quota["borrowed"]["gpu"] == 1 and quota["gpu"] == 1
        samples = scrape(server.url)
        assert sample(samples, "jobservice_quota", tenant="research", cluster="*", resource="gpu") == 1
        assert sample(samples, "jobservice_quota_used", tenant="research", cluster="*", resource="gpu") == 2
        assert sample(samples, "jobservice_quota_borrowed", tenant="research", cluster="*", resource="gpu") == 1

        # When one of its jobs ends, the waiting one starts: the quota is what it holds, not what it ran.
        assert admin.delete(f"/jobs/{running[0]['id']}").status_code == 200
        wait_for_status(alice, mine[2]["id"], "running", timeout=40)
        for job_id in (running[1]["id"], mine[2]["id"], other["id"]):
            admin.delete(f"/jobs/{job_id}")
    finally:
        server.stop()


def test_borrowed_capacity_is_reclaimed_by_a_tenant_within_its_quota(e2e_settings: Settings, database: Database, start_worker,
                                                                     start_scheduler) -> None:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True, jwt_tenant_claim="team"))
    try:
        admin = client(server, "ops", "admin")
        # Its own worker pool: a node another test left registered (alive for a lease) must not add free GPUs.
        start_worker("gpu-r", concurrency=4, gpus=2, WORKER_CPU="8", WORKER_MEMORY="8Gi", WORKER_POOL="reclaim")
        assert admin.request("PUT", "/quotas/research", json={"quotas": [{"gpu": 1, "borrowing_limit": {"gpu": 1}}]}).status_code == 200
        assert admin.request("PUT", "/quotas/carol", json={"quotas": [{"gpu": 1}]}).status_code == 200
        start_scheduler(PREEMPTION_MIN_RUN_SECONDS="0")  # both of research's jobs are candidates at once: the youngest goes, no race
        alice = client(server, "alice", team="research")
        first = alice.submit(command=["sleep", "60"], priority=90, timeout_seconds=120, resources={**TINY, "gpu": 1, "pool": "reclaim"})
        wait_for_status(alice, first["id"], "running")
        second = alice.submit(command=["sleep", "60"], priority=90, timeout_seconds=120, resources={**TINY, "gpu": 1, "pool": "reclaim"})
        wait_for_status(alice, second["id"], "running")  # borrowed: the GPU was idle
        carol = client(server, "carol")
        mine = carol.submit(command=["sleep", "30"], priority=10, timeout_seconds=60, resources={**TINY, "gpu": 1, "pool": "reclaim"})
        wait_for_status(carol, mine["id"], "running", timeout=40)  # priority 10 reclaims from priority 90: it was borrowed
        timeline = alice.get(f"/jobs/{second['id']}/events").json()["events"]
        assert [e["reason"] for e in timeline if e["reason"].startswith("preempted")] == [f"preempted by {mine['id']} (priority 10)"]
        assert alice.get(f"/jobs/{first['id']}").json()["status"] == "running"
        # Research, back within its quota, cannot preempt carol's job in turn (it would borrow again).
        wait_for(lambda: alice.get(f"/jobs/{second['id']}/explain").json()["reason"] not in ("WAITING_FOR_SCHEDULER",), 10)
        assert carol.get(f"/jobs/{mine['id']}").json()["status"] == "running"
        assert not [e for e in carol.get(f"/jobs/{mine['id']}/events").json()["events"] if e["reason"].startswith("preempted")]
        for job_id in (first["id"], second["id"], mine["id"]):
            admin.delete(f"/jobs/{job_id}")
    finally:
        server.stop()


def test_a_job_that_would_borrow_comes_after_every_job_within_its_tenants_quota() -> None:
    a = node("a", gpus=2)
    busy = [running("r1", a, 1, ends_in=1000, owner="alice")]  # alice holds her nominal 1
    quotas = {"alice": [gpu_quota("alice", 1, borrow=4)], "carol": [gpu_quota("carol", 1)]}
    plan = decide(Snapshot(NOW, [a], busy, [job("borrow", gpus=1, priority=90, owner="alice"), job("mine", gpus=1, priority=10, owner="carol")],
                           quotas=quotas))
    assert isinstance(plan.decisions["mine"], Admit)  # the one free GPU goes to carol, within her quota
    assert not isinstance(plan.decisions["borrow"], Admit)
    assert plan.order == ["mine", "borrow"]
