"""Preemption (issue 11): in the pure policy, and on the real service with workers and `sleep` jobs."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from app.db import Database
from app.domain import execution, policy, scheduling
from app.domain.jobs import utcnow
from app.domain.capacity import NodeCapacity
from app.domain.policy import PolicyConfig, Running, Snapshot, decide
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token, wait_for, wait_for_status
from tests.test_policy import GIB, NOW, job, node

TINY = {"cpu": "100m", "memory": "64Mi"}
ON = PolicyConfig(preemption=True, preemption_min_run_seconds=60)


def run(id: str, n: NodeCapacity, gpus: int, priority: int, started_ago: float, preemptible: bool = True,
        members: int = 1, stopping: bool = False) -> Running:
    chosen = tuple(n.free_gpus[: gpus * members])
    n.used_gpus.update(chosen)
    n.used_cpu_millis += 1000 * members
    n.used_memory_bytes += GIB * members
    n.used_slots += 1
    return Running(id, "bob", n.cluster, ((n.name, members),), 1000, GIB, gpus, NOW + 3600, priority=priority, preemptible=preemptible,
                   started_at=NOW - started_ago, stopping=stopping, gpu_indices=((n.name, chosen),))


def victims(plan: Any) -> list[list[str]]:
    return [[v.id for v in p.victims] for p in plan.preemptions]


def test_the_youngest_lowest_priority_jobs_that_make_room_are_preempted_and_no_more() -> None:
    a = node("a", gpus=4)
    busy = [run("old", a, 1, 10, started_ago=900), run("young", a, 1, 10, started_ago=100), run("mid", a, 1, 20, started_ago=50),
            run("high", a, 1, 95, started_ago=100)]
    plan = decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=1, priority=90)]), ON)
    assert victims(plan) == [["young"]]  # lowest priority first, then the most recently started
    plan = decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=2, priority=90)]), ON)
    assert sorted(victims(plan)[0]) == ["old", "young"]  # both priority-10 jobs before the priority-20 one


def test_equal_or_higher_priority_non_preemptible_and_too_young_jobs_are_never_chosen() -> None:
    a = node("a", gpus=3)
    busy = [run("same", a, 1, 90, started_ago=900), run("pinned", a, 1, 10, started_ago=900, preemptible=False),
            run("fresh", a, 1, 10, started_ago=5)]
    plan = decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=1, priority=90)]), ON)
    assert plan.preemptions == []
    assert decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=1, priority=91)]), ON).preemptions[0].victims[0].id == "same"


def test_a_gang_is_preempted_whole() -> None:
    a = node("a", gpus=4)
    busy = [run("gang", a, 1, 10, started_ago=300, members=4)]
    plan = decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=1, priority=90)]), ON)
    [preemption] = plan.preemptions
    assert [v.id for v in preemption.victims] == ["gang"] and sum(m for _, m in preemption.victims[0].parts) == 4


def test_gpu_indices_on_one_node_capacity_spread_over_nodes_does_not_count() -> None:
    a, b = node("a", gpus=2), node("b", gpus=2)
    busy = [run("a1", a, 1, 10, 300), run("a2", a, 1, 10, 200), run("b1", b, 1, 10, 100), run("b2", b, 1, 10, 50)]
    plan = decide(Snapshot(NOW, [a, b], busy, [job("urgent", gpus=2, priority=90)]), ON)
    [chosen] = victims(plan)
    assert sorted(chosen) in (["a1", "a2"], ["b1", "b2"])  # two GPUs on one node, never one on each


def test_capacity_already_being_freed_is_not_preempted_again_and_the_rate_limit_holds() -> None:
    a = node("a", gpus=2)
    busy = [run("stopping", a, 1, 10, 300, stopping=True), run("other", a, 1, 10, 300)]
    plan = decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=1, priority=90)]), ON)
    assert plan.preemptions == []  # the stopping job's GPU is on its way to it
    b = node("b", gpus=1)
    busy = [run("victim", b, 1, 10, 300)]
    assert decide(Snapshot(NOW, [b], busy, [job("urgent", gpus=1, priority=90)], preemption_budget={"local": 0}), ON).preemptions == []
    assert decide(Snapshot(NOW, [b], busy, [job("urgent", gpus=1, priority=90)], preemption_budget={"local": 1}), ON).preemptions


def test_the_room_being_freed_for_a_preemptor_is_kept_from_jobs_of_no_higher_priority() -> None:
    """Its victim holds one GPU through the kill grace; the free GPU beside it is part of the preemptor's room."""
    a, b = node("a", gpus=2), node("b", gpus=2)
    stopping = dataclasses.replace(run("victim", a, 1, 10, 300, stopping=True), ends_at=NOW + 10, preempted_by=frozenset({"urgent"}))
    elsewhere = run("busy-b", b, 2, 95, 300, preemptible=False)
    backlog = [job("urgent", gpus=2, priority=90), job("lower", gpus=1, priority=50, timeout=600),
               job("peer", gpus=1, priority=90, timeout=600), job("lower-2", gpus=1, priority=50, timeout=600)]
    plan = decide(Snapshot(NOW, [a, b], [stopping, elsewhere], backlog), dataclasses.replace(ON, reservation_depth=0))
    for kept_out in ("lower", "peer", "lower-2"):  # equal priority races it too; the same request again, the same answer
        decision = plan.decisions[kept_out]
        assert decision.reason == policy.BACKFILL_WINDOW and decision.blocked_by == "urgent", decision
    assert plan.preemptions == [] and plan.admitted == []
    higher = job("higher", gpus=1, priority=95, timeout=600)
    plan = decide(Snapshot(NOW, [a, b], [stopping, elsewhere], [*backlog, higher]), dataclasses.replace(ON, reservation_depth=0))
    assert [d.job.id for d in plan.admitted] == ["higher"]  # a job of higher priority may take it
    # Once the preemptor has left the backlog (it started elsewhere, or was cancelled), nothing is kept.
    plan = decide(Snapshot(NOW, [a, b], [stopping, elsewhere], backlog[1:]), dataclasses.replace(ON, reservation_depth=0))
    assert [d.job.id for d in plan.admitted] == ["peer"]
    assert plan.decisions["lower"].reason == plan.decisions["lower-2"].reason == policy.CAPACITY


def test_preemption_is_off_unless_configured_and_a_job_that_fits_preempts_nobody() -> None:
    a = node("a", gpus=2)
    busy = [run("low", a, 1, 10, 300)]
    assert decide(Snapshot(NOW, [a], busy, [job("urgent", gpus=2, priority=90)])).preemptions == []
    plan = decide(Snapshot(NOW, [a], busy, [job("fits", gpus=1, priority=90)]), ON)
    assert plan.preemptions == [] and plan.admitted[0].job.id == "fits"


def typed(name: str, gpu_type: str, gpus: int = 2, pool: str | None = None, cluster: str = "local") -> NodeCapacity:
    return NodeCapacity(cluster, name, list(range(gpus)), gpu_type, 64_000, 512 * GIB, 16, pool=pool)


def test_only_victims_on_nodes_of_the_gpu_type_the_job_asks_for_are_chosen() -> None:
    h100, a100 = typed("h", "NVIDIA H100 80GB HBM3", gpus=1), typed("a", "NVIDIA A100", gpus=1)
    busy = [run("on-h100", h100, 1, 10, started_ago=900), run("on-a100", a100, 1, 10, started_ago=100)]  # the A100 one is younger
    plan = decide(Snapshot(NOW, [h100, a100], busy, [job("urgent", gpus=1, priority=90, gpu_types=("H100-80GB-HBM3", "nvidia-h100-80gb-hbm3"))]), ON)
    assert victims(plan) == [["on-h100"]]  # its freed GPU is one the job can use; the younger A100 job is left alone
    plan = decide(Snapshot(NOW, [h100, a100], busy, [job("any", gpus=1, priority=90)]), ON)
    assert victims(plan) == [["on-a100"]]  # any type: the youngest
    plan = decide(Snapshot(NOW, [h100, a100], busy[1:], [job("h100-only", gpus=1, priority=90, gpu_types=("NVIDIA H100 80GB HBM3",))]), ON)
    assert plan.preemptions == []  # only an A100 job could go, and that frees nothing it can use


def test_only_victims_in_the_worker_pool_the_job_asks_for_are_chosen() -> None:
    train, serve = typed("t", "H100", gpus=1, pool="train"), typed("s", "H100", gpus=1, pool="serve")
    busy = [run("in-serve", serve, 1, 10, started_ago=900), run("in-train", train, 1, 10, started_ago=100)]
    assert victims(decide(Snapshot(NOW, [train, serve], busy, [job("urgent", gpus=1, priority=90, node_pool="serve")]), ON)) == [["in-serve"]]
    assert decide(Snapshot(NOW, [train, serve], busy[1:], [job("urgent", gpus=1, priority=90, node_pool="serve")]), ON).preemptions == []


def test_a_gang_on_kubernetes_preempts_across_nodes_and_a_local_one_only_on_one_host() -> None:
    a, b, c = (typed(n, "H100", gpus=2, cluster="k8s") for n in "abc")
    busy = [run("a-low", a, 2, 10, 900), run("b-low", b, 2, 20, 900), run("c-low", c, 2, 10, 300)]
    gang = job("gang", gpus=2, priority=90, members=2)  # 4 GPUs: no node holds it, two of them do
    [preemption] = decide(Snapshot(NOW, [a, b, c], busy, [gang]), ON).preemptions
    assert sorted(v.id for v in preemption.victims) == ["a-low", "c-low"]  # the lowest priorities; b's priority 20 stays
    assert preemption.cluster == "k8s"
    x, y = typed("x", "H100", gpus=2), typed("y", "H100", gpus=4)  # local hosts: a gang's processes share one host
    busy = [run("x-low", x, 2, 10, 900), run("y-low", y, 1, 10, 900, members=2), run("y-mid", y, 2, 20, 900)]
    [preemption] = decide(Snapshot(NOW, [x, y], busy, [gang]), ON).preemptions
    assert sorted(v.id for v in preemption.victims) == ["y-low", "y-mid"]  # all four GPUs of y, never x's and half of y's


def test_several_blocked_jobs_preempt_in_one_pass_each_for_its_own_room() -> None:
    a = node("a", gpus=3)
    busy = [run(f"low{i}", a, 1, 10, started_ago=900 - i) for i in range(3)]
    backlog = [job("urgent1", gpus=1, priority=90), job("urgent2", gpus=1, priority=85, at=1), job("urgent3", gpus=1, priority=80, at=2)]
    plan = decide(Snapshot(NOW, [a], busy, backlog), ON)
    assert [(p.job.id, [v.id for v in p.victims]) for p in plan.preemptions] == [
        ("urgent1", ["low2"]), ("urgent2", ["low1"]), ("urgent3", ["low0"])]  # youngest first, one each, none twice
    # The rate limit is counted across them: with room for two victims in this minute, the third job waits.
    plan = decide(Snapshot(NOW, [a], busy, backlog, preemption_budget={"local": 2}), ON)
    assert [p.job.id for p in plan.preemptions] == ["urgent1", "urgent2"]


def test_a_job_never_preempts_the_same_victim_twice() -> None:
    a = node("a", gpus=1)
    [again] = [dataclasses.replace(run("victim", a, 1, 10, started_ago=300), preempted_by=frozenset({"urgent"}))]
    assert decide(Snapshot(NOW, [a], [again], [job("urgent", gpus=1, priority=90)]), ON).preemptions == []
    assert victims(decide(Snapshot(NOW, [a], [again], [job("other", gpus=1, priority=90)]), ON)) == [["victim"]]


def test_reclaim_takes_only_what_stands_on_borrowed_capacity() -> None:
    """A borrower put under its nominal quota by a reclaim would have its job admitted first again (within its quota,
    and of higher priority) and the reclaimer would take it back: the loop the simulator showed with quotas on."""
    from app.domain.quotas import Quota

    a = node("a", gpus=8)
    busy = [run("big", a, 4, 90, started_ago=300), run("small", a, 1, 90, started_ago=200)]  # bob: 5 GPUs, nominal 4
    quotas = {"bob": [Quota("bob", "*", (4, None, None), (4, 0, 0))], "alice": [Quota("alice", "*", (4, None, None), (0, 0, 0))]}
    a.used_gpus.update({5, 6, 7})  # the rest of the node is taken by someone without a quota
    plan = decide(Snapshot(NOW, [a], busy, [job("mine", gpus=1, priority=10, owner="alice")], quotas=quotas), ON)
    assert victims(plan) == [["small"]]  # bob borrows 1 GPU: the 1-GPU job is reclaimed
    plan = decide(Snapshot(NOW, [a], busy, [job("two", gpus=4, priority=10, owner="alice")], quotas=quotas), ON)
    assert plan.preemptions == []  # freeing 4 GPUs would take bob 4 under his quota: wait for his jobs to end instead
    # Capacity already on its way back counts: with "small" stopping, bob borrows nothing more.
    stopping = [busy[0], dataclasses.replace(busy[1], stopping=True)]
    assert decide(Snapshot(NOW, [a], stopping, [job("mine", gpus=1, priority=10, owner="alice", at=5)], quotas=quotas), ON).preemptions == []


# --- on the real service ---------------------------------------------------------------------------

FAST_PREEMPTION = {"PREEMPTION_MIN_RUN_SECONDS": "1", "PREEMPTION_MAX_PER_MINUTE": "10"}


@pytest.fixture
def admin(e2e_settings: Settings, database: Database) -> Iterator[ApiClient]:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True, preemption_min_run_seconds=1.0))
    yield ApiClient(server.url, {"Authorization": f"Bearer {make_token('ops', 'admin')}"})
    server.stop()


def events(api: ApiClient, job_id: str) -> list[dict[str, Any]]:
    return api.get(f"/jobs/{job_id}/events").json()["events"]


def test_the_youngest_lower_priority_job_is_preempted_and_requeued_with_its_retries_untouched(admin: ApiClient, start_worker, start_scheduler) -> None:
    start_worker("gpu-p", concurrency=4, gpus=2, WORKER_CPU="8", WORKER_MEMORY="8Gi")
    start_scheduler(**{**FAST_PREEMPTION, "PREEMPTION_MIN_RUN_SECONDS": "0"})  # the young one is a candidate at once: no race
    old = admin.submit(command=["sleep", "60"], priority=10, timeout_seconds=120, resources={**TINY, "gpu": 1},
                       retry_policy={"max_retries": 2})
    wait_for_status(admin, old["id"], "running")
    young = admin.submit(command=["sleep", "60"], priority=10, timeout_seconds=120, resources={**TINY, "gpu": 1},
                         retry_policy={"max_retries": 2})
    wait_for_status(admin, young["id"], "running")
    urgent = admin.submit(command=["sleep", "1"], priority=90, timeout_seconds=30, resources={**TINY, "gpu": 1})
    started = wait_for_status(admin, urgent["id"], {"running", "succeeded"}, timeout=40)
    assert started["status"] in ("running", "succeeded")
    timeline = events(admin, young["id"])
    preempted = [e for e in timeline if e["reason"].startswith("preempted by")]
    assert len(preempted) == 1, timeline
    assert preempted[0]["reason"] == f"preempted by {urgent['id']} (priority 90)"
    assert preempted[0]["from_status"] == "running" and preempted[0]["to_status"] == "pending" and preempted[0]["attempt"] == 0
    assert preempted[0]["details"]["gpu_seconds_lost"] > 0
    assert admin.get(f"/jobs/{old['id']}").json()["status"] == "running"  # the older one kept running
    assert not any(e["reason"].startswith("preempted") for e in events(admin, old["id"]))
    # It comes back once there is room, still on its first attempt (no retry spent).
    assert wait_for_status(admin, urgent["id"], "succeeded", timeout=40)
    back = wait_for_status(admin, young["id"], "running", timeout=40)
    assert back["retry_policy"]["max_retries"] == 2
    running_events = [e for e in events(admin, young["id"]) if e["to_status"] == "running"]
    assert [e["attempt"] for e in running_events] == [0, 0]
    metrics = admin.get("/metrics/").json()["preemptions"]
    assert metrics["preemptions_24h"] == 1 and metrics["gpu_seconds_lost_24h"] > 0
    assert metrics["by_queue"] == {"default": 1} and metrics["by_tenant"] == {"ops": 1}
    for job_id in (old["id"], young["id"]):
        admin.delete(f"/jobs/{job_id}")


def test_a_gang_is_preempted_whole_and_a_non_preemptible_job_never(admin: ApiClient, start_worker, start_scheduler) -> None:
    start_worker("gpu-g", concurrency=4, gpus=3, WORKER_CPU="8", WORKER_MEMORY="8Gi")
    start_scheduler(**FAST_PREEMPTION)
    pinned = admin.submit(command=["sleep", "60"], priority=5, timeout_seconds=120, resources={**TINY, "gpu": 1}, preemptible=False)
    wait_for_status(admin, pinned["id"], "running")
    gang = admin.submit(command=["sleep", "60"], priority=20, timeout_seconds=120, resources={**TINY, "gpu": 1},
                        gang={"enabled": True, "min_members": 2})
    wait_for_status(admin, gang["id"], "running")
    urgent = admin.submit(command=["sleep", "1"], priority=90, timeout_seconds=30, resources={**TINY, "gpu": 1})
    wait_for_status(admin, urgent["id"], {"running", "succeeded"}, timeout=40)
    # The pinned job holds the lowest priority yet is never chosen: the gang goes, all of it.
    preempted = [e for e in events(admin, gang["id"]) if e["reason"].startswith("preempted by")]
    assert len(preempted) == 1 and preempted[0]["details"]["placement"][0]["members"] == 2
    assert admin.get(f"/jobs/{pinned['id']}").json()["status"] == "running"
    assert admin.get(f"/jobs/{pinned['id']}").json()["preemptible"] is False
    for job_id in (pinned["id"], gang["id"]):
        admin.delete(f"/jobs/{job_id}")


def test_the_room_being_freed_is_the_preemptors_even_when_a_lower_job_waits_beside_it(admin: ApiClient, start_worker, start_scheduler) -> None:
    """Its victim ignores SIGTERM, so it holds its GPU through the whole kill grace, while a lower job that fits the GPU left
    free waits: the preemptor keeps the room (free GPU plus the victim's) through every pass of the grace, even with no
    reservation depth left for its pool; the lower job starts after it, and nothing is preempted a second time."""
    start_worker("gpu-b", concurrency=4, gpus=2, WORKER_CPU="8", WORKER_MEMORY="8Gi", KILL_GRACE_SECONDS="6")
    start_scheduler(**{**FAST_PREEMPTION, "PREEMPTION_MIN_RUN_SECONDS": "0", "SCHEDULER_RESERVATION_DEPTH": "0"})
    victim = admin.submit(command=["sh", "-c", "trap '' TERM; sleep 60"], priority=10, timeout_seconds=120,
                          resources={**TINY, "gpu": 1})
    wait_for_status(admin, victim["id"], "running")
    urgent = admin.submit(command=["sleep", "1"], priority=90, timeout_seconds=30, resources={**TINY, "gpu": 2})
    wait_for(lambda: any(e["reason"].startswith("preempted by") for e in events(admin, victim["id"])), timeout=20,
             message="the victim preempted")
    assert admin.get(f"/jobs/{victim['id']}").json()["status"] == "pending"  # stopping: its GPU is still in use
    lower = admin.submit(command=["sleep", "1"], priority=50, timeout_seconds=60, resources={**TINY, "gpu": 1})
    wait_for(lambda: admin.get(f"/jobs/{lower['id']}/explain").json().get("reason") == "BACKFILL_WINDOW", timeout=20,
             message="explain says the lower job waits for the preemptor's room")
    assert urgent["id"] in admin.get(f"/jobs/{lower['id']}/explain").json()["message"]
    wait_for_status(admin, urgent["id"], "succeeded", timeout=60)
    wait_for_status(admin, lower["id"], "succeeded", timeout=60)
    started = {job_id: [e["at"] for e in events(admin, job_id) if e["to_status"] == "running"] for job_id in (urgent["id"], lower["id"])}
    assert len(started[urgent["id"]]) == 1 and len(started[lower["id"]]) == 1, started
    assert started[lower["id"]][0] >= started[urgent["id"]][0], started  # never raced into the room being freed
    for job_id in (urgent["id"], lower["id"]):
        assert not any(e["reason"].startswith("preempted") for e in events(admin, job_id))
    admin.delete(f"/jobs/{victim['id']}")


def test_only_admins_may_pin_a_high_priority_job(admin: ApiClient, e2e_settings: Settings) -> None:
    server = LiveServer(e2e_settings.with_overrides(auth_enabled=True))
    try:
        user = ApiClient(server.url, {"Authorization": f"Bearer {make_token('alice')}"})
        body = {"job_type": "t", "command": ["true"], "priority": 80, "preemptible": False}
        response = user.post("/jobs/", json=body)
        assert response.status_code == 403 and response.json()["error"]["code"] == "FORBIDDEN", response.text
        assert user.post("/jobs/", json={**body, "priority": 50}).status_code == 201  # at or below the threshold
        assert user.post("/jobs/", json={**body, "preemptible": "no"}).status_code == 400
        assert admin.post("/jobs/", json=body).status_code == 201
    finally:
        server.stop()


def test_a_tenant_under_its_quota_reclaims_borrowed_capacity_whatever_the_priority() -> None:
    from app.domain.quotas import Quota

    a = node("a", gpus=4)
    busy = [run(f"b{i}", a, 1, 90, started_ago=300 + i) for i in range(4)]  # bob: 4 GPUs at priority 90
    quotas = {"bob": [Quota("bob", "*", (2, None, None), (2, 0, 0))], "alice": [Quota("alice", "*", (2, None, None), (0, 0, 0))]}
    plan = decide(Snapshot(NOW, [a], busy, [job("mine", gpus=1, priority=10, owner="alice")], quotas=quotas), ON)
    assert victims(plan) == [["b0"]]  # bob borrows 2 GPUs: alice (within her 2) takes one back, the youngest
    # The scheduler's own pass, stopping where no slot is left, reclaims alike although nobody waiting outranks bob.
    full = node("a", gpus=4, slots=4)
    on_full = [run(f"b{i}", full, 1, 90, started_ago=300 + i) for i in range(4)]
    fast = decide(Snapshot(NOW, [full], on_full, [job("mine", gpus=1, priority=10, owner="alice")], quotas=quotas),
                  dataclasses.replace(ON, admissions_only=True))
    assert victims(fast) == [["b0"]]
    # Beyond her nominal quota she does not reclaim (she would be borrowing herself), and bob within his never loses one.
    plan = decide(Snapshot(NOW, [a], busy, [job("big", gpus=3, priority=10, owner="alice")], quotas=quotas), ON)
    assert plan.preemptions == []
    within = {**quotas, "bob": [Quota("bob", "*", (4, None, None), (0, 0, 0))]}
    assert decide(Snapshot(NOW, [a], busy, [job("mine", gpus=1, priority=10, owner="alice")], quotas=within), ON).preemptions == []
    # And bob, now back within his quota, cannot take it back by priority: he would borrow to do so.
    alices = Running("mine", "alice", "local", (("c", 1),), 1000, GIB, 1, NOW + 3600, priority=10, preemptible=True,
                               started_at=NOW - 300, gpu_indices=(("c", (0,)),))
    c = node("c", gpus=2)
    c.used_gpus.update({0, 1})
    bobs = Running("b1", "bob", "local", (("c", 1),), 1000, GIB, 1, NOW + 3600, priority=90, preemptible=True, started_at=NOW - 300,
                   gpu_indices=(("c", (1,)),))
    c.used_cpu_millis, c.used_memory_bytes, c.used_slots = 2000, 2 * GIB, 2
    back = decide(Snapshot(NOW, [c], [alices, bobs], [job("b0", gpus=1, priority=90, owner="bob")],
                           quotas={**quotas, "bob": [Quota("bob", "*", (1, None, None), (1, 0, 0))]}), ON)
    assert back.preemptions == []


def test_a_victim_never_preempts_its_preemptor_back() -> None:
    a = node("a", gpus=1)
    busy = [run("winner", a, 1, 10, started_ago=300)]
    loser = job("loser", gpus=1, priority=90)
    assert victims(decide(Snapshot(NOW, [a], busy, [loser]), ON)) == [["winner"]]
    back = dataclasses.replace(loser, preempted_by=frozenset({"winner"}))
    assert decide(Snapshot(NOW, [a], busy, [back]), ON).preemptions == []


def test_the_victim_is_on_the_gpu_type_the_preemptor_asks_for(admin: ApiClient, start_worker, start_scheduler) -> None:
    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
    start_worker("h100-p", concurrency=2, gpus=1, WORKER_GPU_TYPE=h100, WORKER_CPU="4", WORKER_MEMORY="4Gi")
    start_worker("a100-p", concurrency=2, gpus=1, WORKER_GPU_TYPE=a100, WORKER_CPU="4", WORKER_MEMORY="4Gi")
    start_scheduler(**{**FAST_PREEMPTION, "PREEMPTION_MIN_RUN_SECONDS": "0"})  # both are candidates from the first pass
    on_h100 = admin.submit(command=["sleep", "60"], priority=10, timeout_seconds=120, resources={**TINY, "gpu": 1, "gpu_type": h100})
    wait_for_status(admin, on_h100["id"], "running")
    on_a100 = admin.submit(command=["sleep", "60"], priority=10, timeout_seconds=120, resources={**TINY, "gpu": 1, "gpu_type": a100})
    wait_for_status(admin, on_a100["id"], "running")  # the younger one: it would go first if the type were ignored
    urgent = admin.submit(command=["sleep", "1"], priority=90, timeout_seconds=30, resources={**TINY, "gpu": 1, "gpu_type": h100})
    started = wait_for_status(admin, urgent["id"], {"running", "succeeded"}, timeout=40)
    assert started["node"] == "h100-p"
    assert [e["reason"] for e in events(admin, on_h100["id"]) if e["reason"].startswith("preempted by")] == [
        f"preempted by {urgent['id']} (priority 90)"]
    assert admin.get(f"/jobs/{on_a100['id']}").json()["status"] == "running"
    assert not any(e["reason"].startswith("preempted") for e in events(admin, on_a100["id"]))
    for job_id in (on_h100["id"], on_a100["id"]):
        admin.delete(f"/jobs/{job_id}")


def test_every_blocked_job_is_searched_for_in_one_pass_not_only_the_first_few_dozen() -> None:
    """The search used to stop after 32 searches a pass: a burst of urgent jobs started a few dozen per pass."""
    nodes = [node(f"n{i}", gpus=1) for i in range(100)]
    busy = [run(f"low{i}", n, 1, 10, started_ago=900) for i, n in enumerate(nodes)]
    backlog = [job(f"urgent{i}", gpus=1, priority=90, at=i) for i in range(100)]
    plan = decide(Snapshot(NOW, nodes, busy, backlog), ON)
    assert sorted(p.job.id for p in plan.preemptions) == sorted(j.id for j in backlog)
    assert len({v.id for p in plan.preemptions for v in p.victims}) == 100  # one victim each, none twice
    assert plan.preemption_search.unexamined == 0


def test_a_failed_search_is_not_repeated_for_the_same_shape_but_a_higher_priority_is_searched() -> None:
    a, b = node("a", gpus=2), node("b", gpus=1)  # b is too small for any of them: a candidate that never helps
    busy = [run("p50", a, 1, 50, started_ago=900), run("p70", a, 1, 70, started_ago=900), run("b-p10", b, 1, 10, started_ago=900)]
    backlog = [job("big60", gpus=2, priority=60), job("big55", gpus=2, priority=55, at=1), job("big80", gpus=2, priority=80, at=2)]
    plan = decide(Snapshot(NOW, [a, b], busy, backlog), ON)
    search = plan.preemption_search
    # Priority 80 goes first and takes both; 60 then finds nothing, and 55 (same shape, lower priority) is not searched:
    # its candidates are a subset of 60's.
    assert victims(plan) == [["p50", "p70"]] and plan.preemptions[0].job.id == "big80"
    assert search.outcomes["big60"] == search.NO_VICTIMS and search.outcomes["big55"] == search.SKIPPED
    # Without the priority-80 job: 60 needs both GPUs but may take only p50's; one search, and 55 is not searched.
    plan = decide(Snapshot(NOW, [a, b], busy, backlog[:2]), ON)
    assert plan.preemptions == [] and plan.preemption_search.searched == 1 and plan.preemption_search.skipped == 1



def test_the_rate_limit_scales_with_the_cluster() -> None:
    from app.domain.scheduling import preemption_limit

    settings = Settings.from_env({})
    assert preemption_limit(settings, 3) == 60  # a small cluster: PREEMPTION_MAX_PER_MINUTE
    assert preemption_limit(settings, 150) == 300  # 2 per node: the simulator's 150-node cluster needs up to 188
    fixed = Settings.from_env({"PREEMPTION_MAX_PER_MINUTE": "10", "PREEMPTION_MAX_PER_NODE_PER_MINUTE": "0"})
    assert preemption_limit(fixed, 150) == 10
    for hostile, per_node in (("inf", 1000.0), ("nan", 0.0), ("-5", 0.0), ("1e308", 1000.0)):
        bounded = Settings.from_env({"PREEMPTION_MAX_PER_NODE_PER_MINUTE": hostile})
        assert bounded.preemption_max_per_node_per_minute == per_node
        assert preemption_limit(bounded, 150) == max(60, int(per_node * 150))  # no OverflowError in the pass


def test_the_scheduling_depth_and_scan_limit_are_bounded() -> None:
    """A negative scan limit would leave every job unexamined (nothing admitted, ever); a huge depth, a timeline search
    per blocked job in every pass."""
    for depth, scan, want in (("-3", "-1", (0, 1)), ("0", "0", (0, 1)), ("99999999", "99999999999", (1000, 1_000_000)),
                              ("7", "500", (7, 500))):
        settings = Settings.from_env({"SCHEDULER_RESERVATION_DEPTH": depth, "SCHEDULER_SCAN_LIMIT": scan})
        assert (settings.scheduler_reservation_depth, settings.scheduler_scan_limit) == want


def _exhaustive_victims(nodes: list[NodeCapacity], busy: list[Running], job_: Any) -> list[Running] | None:
    """The rule spelled out on real node copies: on every node, its candidates lowest priority first, then the youngest,
    until the job fits there whole, then the unneeded ones dropped (highest priority first); the best node by fewest
    victims, then the lowest highest priority, then the youngest; ties to the node listed first."""
    ranked = sorted(busy, key=lambda r: (r.priority, -r.started_at, r.id))
    best: tuple[tuple[int, int, float], list[Running]] | None = None
    for n in nodes:
        ordered = [r for r in ranked if any(name == n.name for name, _ in r.parts)]

        def fits(victims: list[Running], n: NodeCapacity = n) -> bool:
            trial = n.copy()
            policy._release({(trial.cluster, trial.name): trial}, *victims)
            return trial.shortfall(job_.cpu_millis, job_.memory_bytes, job_.gpus, job_.members) is None

        chosen: list[Running] = []
        for victim in ordered:
            chosen.append(victim)
            if fits(chosen):
                break
        else:
            continue
        for victim in sorted(chosen[:-1], key=lambda r: (-r.priority, r.started_at)):
            if fits([r for r in chosen if r is not victim]):
                chosen = [r for r in chosen if r is not victim]
        rank = policy._option_rank(chosen)
        if best is None or rank < best[0]:
            best = (rank, chosen)
    return None if best is None else best[1]


@pytest.mark.parametrize("seed", range(300))
def test_the_victim_search_chooses_what_trying_every_node_would(seed: int) -> None:
    # The search adds integers along each node's indexed candidates instead of copying nodes: it must still choose
    # exactly what trying every node on real copies chooses, ties included, whatever order the attempts come in.
    rng = random.Random(seed)
    nodes = [node(f"n{i}", gpus=rng.choice([2, 4, 8])) for i in range(rng.randint(3, 60))]
    busy = []
    ages = rng.choice([[100, 200, 300, 900], [300]])  # half the seeds: ties everywhere
    for k in range(rng.randint(3, 150)):
        n, gpus = rng.choice(nodes), rng.choice([1, 1, 2])
        if len(n.free_gpus) >= gpus and n.used_slots < n.slots:
            busy.append(run(f"r{k}", n, gpus, rng.choice([10, 20, 30]), started_ago=rng.choice(ages)))
    urgent = job("urgent", gpus=rng.choice([1, 2, 4, 8]), priority=90)
    expected = _exhaustive_victims(nodes, busy, urgent)
    for attempts in (busy, rng.sample(busy, len(busy))):
        found = policy._Victims(policy._copy(nodes), attempts, set()).search(urgent, lambda r, borrower: True, lower_only=True)
        chosen = None if found is None else found[0]
        assert (None if chosen is None else [r.id for r in chosen]) == (None if expected is None else [r.id for r in expected])


# --- on real PostgreSQL: the scheduler's own pass ------------------------------------------------------


def test_preemptors_waiting_for_their_room_do_not_hide_a_newer_urgent_job_from_the_pools_head(
        database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preemptors waiting out their victims' kill grace stayed in the per-pool (and per-owner) head until they started:
    a burst of them filled it, and an urgent job submitted just after was not seen for a pass or two. The heads no
    longer count them; they still reach the policy (their room is kept for them) and start once it is free."""
    # Heads of two: the two preemptors fill both their owner's head and the GPU pool's.
    monkeypatch.setattr(scheduling, "BACKLOG_PER_POOL", 2)
    monkeypatch.setattr(scheduling, "BACKLOG_PER_OWNER", 2)
    preemptive = settings.with_overrides(preemption_enabled=True, preemption_min_run_seconds=60.0)
    now = utcnow()
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "VALUES ('local', 'n1', '[0,1,2,3]', 'H100', 32000, 68719476736, 8, true, :now + interval '1 hour', :now)"), {"now": now})
        # The node's four GPUs run four priority-10 jobs, all started an hour ago (candidates for preemption).
        conn.execute(text("""
            INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              timeout_seconds, created_at, updated_at, pending_since, queued_at, started_at, heartbeat_at, cluster, node,
                              placement, holds_resources, dispatch_token, preemptible)
            SELECT 'low' || g, 'bob', 't', 10, 'default', 'running', 'r', '["true"]', 1000, 1073741824, 1, 7200,
                   :ago, :ago, :ago, :ago, :ago + g * interval '1 s', :now, 'local', 'n1',
                   jsonb_build_array(jsonb_build_object('node', 'n1', 'members', 1, 'gpu_indices', jsonb_build_array(g))), true,
                   'token-' || g, true
            FROM generate_series(0, 3) g
        """), {"now": now, "ago": now - timedelta(hours=1)})

    def submit(job_id: str, at: datetime) -> None:
        with database.engine.begin() as conn:
            conn.execute(text("""
                INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                                  timeout_seconds, created_at, updated_at, pending_since)
                VALUES (:id, 'alice', 't', 90, 'high-priority', 'pending', 'submitted', '["true"]', 1000, 1073741824, 1, 600, :at, :at, :at)
            """), {"id": job_id, "at": at})

    def preempted_for(job_id: str) -> list[str]:
        with database.engine.begin() as conn:
            return list(conn.execute(text("SELECT job_id FROM job_events WHERE details->>'preempted_by' = :id"), {"id": job_id}).scalars())

    def admit(at: datetime) -> scheduling.AdmissionResult:
        with database.session() as session:
            return scheduling.admit(session, preemptive, at)

    submit("urgent-1", now)
    submit("urgent-2", now + timedelta(seconds=1))
    first = admit(now + timedelta(seconds=2))
    assert sorted(first.preempted) == ["low2", "low3"] and first.admitted == []  # the youngest two; they stop meanwhile
    submit("urgent-3", now + timedelta(seconds=3))  # behind both waiting preemptors, in its owner's head and its pool's
    second = admit(now + timedelta(seconds=4))
    assert preempted_for("urgent-3") == ["low1"], "the newer urgent job was not seen while the preemptors waited"
    assert second.admitted == []  # nobody starts on GPUs still in use
    with database.session() as session, session.begin():
        seen = {job.id for job in scheduling.load_snapshot(session, preemptive, now + timedelta(seconds=5)).backlog}
    assert {"urgent-1", "urgent-2", "urgent-3"} <= seen  # the waiting preemptors still reach the policy
    # The victims' processes end (their workers report it): each preemptor starts on the room freed for it.
    for victim in ("low1", "low2", "low3"):
        with database.session() as session:
            execution.end(session, preemptive, victim, "token-" + victim[-1], succeeded=False, retryable=True,
                          reason="terminated", actor="worker")
    third = admit(now + timedelta(seconds=6))
    assert sorted(third.admitted) == ["urgent-1", "urgent-2", "urgent-3"] and third.preempted == []


def _best_fit_by_scan(work: list[NodeCapacity], pending: policy.Pending) -> tuple[str, str] | None:
    """The node room_now must choose for a single job, found by trying every node: a free slot and room for it, the
    fewest GPUs left free, then the name, then the node listed first."""
    fitting = [(n.gpus_free_count, n.name, i) for i, n in enumerate(work)
               if n.shortfall(pending.cpu_millis, pending.memory_bytes, pending.gpus, 1) is None and pending.serves(n)]
    if not fitting:
        return None
    _, _, i = min(fitting)
    return (work[i].cluster, work[i].name)


@pytest.mark.parametrize("seed", range(200))
def test_room_being_freed_goes_to_the_best_fit_that_trying_every_node_finds(seed: int) -> None:
    # room_now keeps each request's best fit up to date node by node instead of scanning the fleet for every blocked job:
    # as nodes fill up (slots, GPUs, CPU, memory) and preemptions give room back, it must still choose what a scan would.
    rng = random.Random(seed)
    cluster = rng.choice(["local", "k8s"])
    nodes = [node(f"n{i}", gpus=rng.choice([0, 2, 4, 8]), cpu=rng.choice([4000, 16_000, 64_000]), slots=rng.choice([1, 2, 4, 16]),
                  cluster=cluster) for i in range(rng.randint(2, 30))]
    for i in range(rng.randint(0, 3)):  # nodes alike but for their names: ties broken by name
        twin = rng.choice(nodes).copy()
        twin.name = f"twin{i}"
        nodes.append(twin)
    busy = []
    for k in range(rng.randint(0, 40)):
        n, gpus = rng.choice(nodes), rng.choice([0, 1, 2])
        if len(n.free_gpus) >= gpus and n.used_slots < n.slots and n.used_cpu_millis + 1000 <= n.cpu_millis:
            busy.append(run(f"r{k}", n, gpus, 10, started_ago=900))
    before = policy._copy(nodes)
    # As the pass gives it the plan's nodes: none copied yet (copy on write), and the plan's must stay as they are.
    victims = policy._Victims(list(nodes), busy, set(), owned=set())
    shapes = [dict(gpus=g, cpu_millis=c) for g in (0, 1, 2, 8) for c in (500, 1000, 3000)]
    for step in range(rng.randint(10, 80)):
        pending = dataclasses.replace(job(f"j{step}", priority=90), **rng.choice(shapes))
        if busy and rng.random() < 0.25:
            # A preemption: a victim's room comes back and the preemptor takes its share of it.
            victim = busy.pop(rng.randrange(len(busy)))
            victims.take([victim], pending, [(victim.cluster, victim.parts[0][0])])
            continue
        expected = _best_fit_by_scan(victims.work, pending)
        placement = victims.room_now(pending)
        assert (None if placement is None else (placement.cluster, placement.parts[0][0])) == expected
    assert nodes == before


def test_room_being_freed_for_blocked_jobs_leaves_the_plans_free_capacity_as_the_admissions_left_it() -> None:
    # The preemption phase works on the plan's nodes copied on write (only those it changes): a blocked job keeping room
    # on a stopping victim's node must not change the free capacity the plan reports.
    a, b = node("a", gpus=4), node("b", gpus=4)
    busy = [run("stopping", a, 4, 10, started_ago=900, stopping=True), run("other", b, 4, 95, started_ago=900)]
    snapshot = Snapshot(NOW, [a, b], busy, [job("urgent", gpus=1, priority=90), job("next", gpus=2, priority=90, at=1)])
    plan = decide(snapshot, ON)
    assert plan.preemption_search.room_on_its_way == 2 and plan.preemptions == []
    without = decide(snapshot, dataclasses.replace(ON, preemption=False))
    assert plan.free == without.free
    assert [n.gpus_free_count for n in plan.free] == [0, 0]
