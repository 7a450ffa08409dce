"""Fair-share weights per tenant set by admins (issue 10): the policy's rule, the admin API and its audit,
/fairness, Prometheus, explain, and the real scheduler ordering by the stored weight."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from app.db import Database
from app.domain.jobs import utcnow
from app.domain.policy import PolicyConfig, Snapshot, Usage, decide, owner_shares
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token, wait_for_status
from tests.test_observability_e2e import sample, scrape
from tests.test_policy import NOW, job, node

TINY = {"cpu": "100m", "memory": "64Mi"}


# --- the rule, in the pure policy ----------------------------------------------------------------


def test_a_weight_set_by_an_admin_wins_over_the_configured_one() -> None:
    a = node("a", gpus=1)
    usage = {"alice": Usage(gpu_seconds=1000.0), "bob": Usage(gpu_seconds=1500.0)}
    backlog = [job("a1", gpus=1, owner="alice"), job("b1", gpus=1, owner="bob")]
    config = PolicyConfig(weights={"alice": 1.0, "bob": 1.0})
    # Equal weights: alice used less, she goes first.
    plan = decide(Snapshot(NOW, [a], [], backlog, usage), config)
    assert [d.job.id for d in plan.admitted] == ["a1"] and plan.shares["alice"].rank == 1
    # An admin gives bob twice alice's weight: his share halves, below hers, and he goes first.
    plan = decide(Snapshot(NOW, [a], [], backlog, usage, weights={"bob": 2.0}), config)
    assert [d.job.id for d in plan.admitted] == ["b1"]
    assert plan.shares["bob"].weight == 2.0 and plan.shares["bob"].rank == 1 and plan.shares["alice"].weight == 1.0
    assert plan.shares["bob"].share == pytest.approx(plan.shares["alice"].share * 1.5 / 2)
    # An owner the admins did not set keeps the configured weight, then the default.
    shares = owner_shares(Snapshot(NOW, [a], [], [], usage, weights={"bob": 2.0}), PolicyConfig(weights={"alice": 3.0}))
    assert (shares["alice"].weight, shares["bob"].weight) == (3.0, 2.0)


# --- the admin API -------------------------------------------------------------------------------


@pytest.fixture
def server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    live = LiveServer(settings.with_overrides(auth_enabled=True, jwt_tenant_claim="team", fair_share_weights=(("infra", 3.0),)))
    yield live
    live.stop()


def client(server: LiveServer, sub: str, scopes: str = "jobs:read jobs:write", **claims: Any) -> ApiClient:
    return ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub, scopes, **claims)}"})


def test_only_admins_read_or_change_weights(server: LiveServer) -> None:
    user = client(server, "alice")
    for method, path, body in (("GET", "/fairness/weights/", None), ("GET", "/fairness/weights/research", None),
                               ("PUT", "/fairness/weights/research", {"weight": 2}), ("DELETE", "/fairness/weights/research", None)):
        response = user.request(method, path, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "FORBIDDEN"
        anonymous = ApiClient(server.url).request(method, path, json=body)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
    admin = client(server, "ops", "admin")
    assert admin.get("/fairness/weights/research").json()["source"] == "default"  # nothing was set by the refused PUT


@pytest.mark.parametrize(
    "body",
    [{"weight": 0}, {"weight": -1}, {"weight": 0.0009}, {"weight": 1000.5}, {"weight": "2"}, {"weight": True}, {"weight": None},
     {"weight": [2]}, {}, {"weight": 2, "extra": 1}],
)
def test_bad_weights_are_refused_naming_the_field(server: LiveServer, body: dict[str, Any]) -> None:
    admin = client(server, "ops", "admin")
    response = admin.request("PUT", "/fairness/weights/research", json=body)
    assert response.status_code == 400, (body, response.text)
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and {d["field"] for d in error["details"]} & {"weight", "extra"}, error
    assert admin.get("/fairness/weights/research").json()["changes"] == []


def test_non_finite_and_huge_numbers_are_refused(server: LiveServer) -> None:
    admin = client(server, "ops", "admin")
    for raw in ('{"weight": NaN}', '{"weight": Infinity}', '{"weight": 1e400}'):
        response = admin.request("PUT", "/fairness/weights/research", data=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["code"] in ("VALIDATION_ERROR", "BAD_REQUEST"), response.text


def test_a_bad_tenant_name_is_refused(server: LiveServer) -> None:
    admin = client(server, "ops", "admin")
    for tenant in ("-dash", "a b", "x" * 201):
        response = admin.request("PUT", f"/fairness/weights/{tenant}", json={"weight": 2})
        assert response.status_code == 400, (tenant, response.text)
        assert response.json()["error"]["details"][0]["field"] == "tenant"


def test_weights_are_set_read_listed_removed_and_audited(server: LiveServer) -> None:
    admin = client(server, "ops", "admin")
    listed = admin.get("/fairness/weights").json()  # with or without the trailing slash, never a redirect
    assert listed == {"default_weight": 1.0,
                      "weights": [{"tenant": "infra", "weight": 3.0, "source": "setting", "updated_at": None, "updated_by": None}]}
    response = admin.request("PUT", "/fairness/weights/research", json={"weight": 2.5})
    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["tenant"], view["weight"], view["source"], view["updated_by"]) == ("research", 2.5, "admin", "ops")
    assert [(c["action"], c["actor"], c["before"], c["after"]) for c in view["changes"]] == [("put", "ops", None, 2.5)]
    # An admin's weight wins over FAIR_SHARE_WEIGHTS, and a DELETE returns the tenant to the setting.
    other = client(server, "root", "admin")
    assert other.request("PUT", "/fairness/weights/infra", json={"weight": 0.5}).json()["source"] == "admin"
    assert admin.request("PUT", "/fairness/weights/research", json={"weight": 4}).status_code == 200
    listed = admin.get("/fairness/weights/").json()["weights"]
    assert [(w["tenant"], w["weight"], w["source"]) for w in listed] == [("infra", 0.5, "admin"), ("research", 4.0, "admin")]
    assert admin.delete("/fairness/weights/infra").status_code == 204
    assert admin.delete("/fairness/weights/infra").status_code == 404
    infra = admin.get("/fairness/weights/infra").json()
    assert (infra["weight"], infra["source"], infra["updated_at"]) == (3.0, "setting", None)
    assert [(c["action"], c["actor"], c["before"], c["after"]) for c in infra["changes"]] == [
        ("delete", "ops", 0.5, None), ("put", "root", None, 0.5)]
    research = admin.get("/fairness/weights/research").json()
    assert [(c["before"], c["after"]) for c in research["changes"]] == [(2.5, 4.0), (None, 2.5)]
    assert admin.get("/fairness/weights/nobody").json()["source"] == "default"
    assert admin.delete("/fairness/weights/nobody").status_code == 404


def test_fairness_and_prometheus_report_the_stored_weight(server: LiveServer) -> None:
    admin = client(server, "ops", "admin")
    alice = client(server, "alice", team="research")
    alice.submit(command=["true"], resources=TINY)
    assert admin.request("PUT", "/fairness/weights/research", json={"weight": 4}).status_code == 200
    assert admin.request("PUT", "/fairness/weights/newcomer", json={"weight": 0.25}).status_code == 200
    owners = {row["owner"]: row for row in admin.get("/fairness/").json()["owners"]}
    assert owners["research"]["weight"] == 4.0 and owners["research"]["pending"] == 1
    assert owners["newcomer"]["weight"] == 0.25 and owners["newcomer"]["pending"] == 0  # set, with nothing submitted yet
    assert [row["weight"] for row in alice.get("/fairness/").json()["owners"]] == [4.0]  # others see themselves, weighted
    metrics = scrape(server.url)
    assert sample(metrics, "jobservice_fair_share_weight", owner="research") == 4.0
    assert sample(metrics, "jobservice_fair_share_weight", owner="newcomer") == 0.25
    assert admin.delete("/fairness/weights/research").status_code == 204
    assert {row["owner"]: row for row in admin.get("/fairness/").json()["owners"]}["research"]["weight"] == 1.0


# --- on the real service ---------------------------------------------------------------------------


def test_the_scheduler_orders_equal_priorities_by_the_stored_weight(e2e_settings: Settings, database: Database, start_worker,
                                                                    start_scheduler) -> None:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True, jwt_tenant_claim="team"))
    try:
        admin = client(server, "ops", "admin")
        alice = client(server, "alice", team="research")
        bob = client(server, "bob", team="product")
        # Research used twice what product did (the last hour, decayed): at equal weights product goes first.
        now = utcnow()
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO fair_share_usage (owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at) "
                              "VALUES ('research', 0, 2000, 0, :now), ('product', 0, 1000, 0, :now)"), {"now": now})
        start_worker("solo", concurrency=1, gpus=0)
        start_scheduler()
        blocker = admin.submit(command=["sleep", "6"], priority=50, resources=TINY)
        wait_for_status(admin, blocker["id"], "running")
        first_r = alice.submit(command=["true"], priority=50, resources=TINY)
        first_p = bob.submit(command=["true"], priority=50, resources=TINY)
        ranked = {row["owner"]: row["rank"] for row in admin.get("/fairness/").json()["owners"] if row["rank"]}
        assert ranked == {"product": 1, "research": 2}, ranked
        # An admin weighs research 4: its share drops below product's, and it is served first from the next pass on.
        assert admin.request("PUT", "/fairness/weights/research", json={"weight": 4}).status_code == 200
        ranked = {row["owner"]: row["rank"] for row in admin.get("/fairness/").json()["owners"] if row["rank"]}
        assert ranked == {"research": 1, "product": 2}, ranked
        fair = alice.get(f"/jobs/{first_r['id']}/explain").json()["fair_share"]
        assert fair["owner"] == "research" and fair["weight"] == 4.0 and fair["rank"] == 1, fair
        done = {j["id"]: wait_for_status(admin, j["id"], {"succeeded", "failed"}, timeout=60) for j in (blocker, first_r, first_p)}
        order = sorted(done, key=lambda job_id: done[job_id]["started_at"])
        assert order == [blocker["id"], first_r["id"], first_p["id"]], order
    finally:
        server.stop()
