"""The Kubernetes executor inside the service: real scheduler, real Celery worker, the real kubernetes
client against the fake API server (tests/k8s_fake), real PostgreSQL and HTTP."""
from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, text

from app.db import Database
from app.models import JobEvent
from config import Settings
from tests.conftest import ApiClient, LiveServer, wait_for, wait_for_status
from tests.k8s_fake import FakeKubernetes, FakeNode, Script

CLUSTER = "gpu-east"
NAMESPACE = "jobs"


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    with FakeKubernetes([FakeNode("gpu-node-1", gpus=4), FakeNode("gpu-node-2", gpus=2, gpu_product="NVIDIA-H100-80GB-HBM3")]) as server:
        yield server


@pytest.fixture
def kube_env(fake: FakeKubernetes, tmp_path: Path) -> dict[str, str]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{fake.url}"}}}}]
users: [{{name: fake, user: {{token: test}}}}]
contexts: [{{name: fake-east, context: {{cluster: fake, user: fake}}}}]
current-context: fake-east
"""
    )
    return {
        "KUBERNETES_CLUSTERS": f"{CLUSTER}=fake-east",
        "KUBECONFIG": str(kubeconfig),
        "KUBERNETES_NAMESPACE": NAMESPACE,
        "INVENTORY_SYNC_SECONDS": "0.5",
        "GANG_START_TIMEOUT_SECONDS": "2",
    }


@pytest.fixture
def kube_api(settings: Settings, database: Database, kube_env: dict[str, str]) -> Iterator[ApiClient]:
    overrides = Settings.from_env({**kube_env})
    server = LiveServer(settings.with_overrides(kubernetes_clusters=overrides.kubernetes_clusters, kubeconfig=overrides.kubeconfig))
    yield ApiClient(server.url)
    server.stop()


@pytest.fixture
def kube_worker(start_worker, kube_env: dict[str, str]):  # type: ignore[no-untyped-def]
    def start(name: str = "k8s-worker", **env: str):  # type: ignore[no-untyped-def]
        return start_worker(name, concurrency=4, registers="gpu-node-1", WORKER_EXECUTOR="kubernetes", WORKER_CLUSTER=CLUSTER, **{**kube_env, **env})

    return start


def test_a_job_runs_as_a_kubernetes_job_and_keeps_its_logs(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes) -> None:
    fake.scripts["test/steady"] = Script(lines=["starting rank $JOB_RANK of $JOB_WORLD_SIZE", "working", "done"], line_interval=0.5)
    kube_worker(KUBERNETES_JOB_TTL_SUCCEEDED_SECONDS="0")
    start_scheduler()
    job = kube_api.submit(image="test/steady", resources={"gpu": 1, "cpu": "2", "memory": "4Gi"}, config={"model": "m"})
    wait_for_status(kube_api, job["id"], "running")
    created = wait_for(lambda: fake.objects("jobs", NAMESPACE), 10, message="the Kubernetes Job")[0]
    assert created["metadata"]["annotations"]["jobservice.io/job-id"] == job["id"]
    limits = created["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (limits["nvidia.com/gpu"], limits["cpu"]) == ("1", "2000m")
    done = wait_for_status(kube_api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["exit_code"] == 0 and done["cluster"] == CLUSTER
    # The finished Job is deleted once its retention (here none) is over; its logs stay in the service's store.
    wait_for(lambda: not fake.objects("jobs", NAMESPACE), 15, message="the finished Job to be removed")
    logs = kube_api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines()
    assert logs == ["starting rank 0 of 1", "working", "done"]


def test_a_failing_pod_reports_its_exit_code(kube_api: ApiClient, kube_worker, start_scheduler) -> None:
    kube_worker()
    start_scheduler()
    job = kube_api.submit(image="test/fail-3")
    done = wait_for_status(kube_api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "failed" and done["exit_code"] == 3


def test_cancel_deletes_the_kubernetes_job(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes) -> None:
    kube_worker()
    start_scheduler()
    job = kube_api.submit(image="test/sleep")
    wait_for_status(kube_api, job["id"], "running")
    wait_for(lambda: fake.objects("jobs", NAMESPACE), 10, message="the Kubernetes Job")
    assert kube_api.delete(f"/jobs/{job['id']}").status_code == 200
    wait_for(lambda: any(d[0] == "jobs" and d[3] == "Foreground" for d in fake.deletions), 15, message="a foreground delete")
    wait_for(lambda: not fake.objects("jobs", NAMESPACE), 15, message="the Job to be gone")


def test_a_gang_spans_the_cluster_and_gets_ranks(kube_api: ApiClient, kube_worker, start_scheduler) -> None:
    kube_worker()
    start_scheduler()
    # 3 members of 2 GPUs: no node holds all of them, the cluster does (4 + 2 GPUs).
    job = kube_api.submit(image="test/succeed", resources={"gpu": 2}, gang={"enabled": True, "min_members": 3})
    done = wait_for_status(kube_api, job["id"], {"succeeded", "failed"}, timeout=40)
    assert done["status"] == "succeeded"
    lines = kube_api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines()
    assert sorted(l for l in lines if "starting" in l) == [f"[rank {r}] starting rank {r} of 3" for r in range(3)]


def test_a_gang_bigger_than_the_cluster_is_refused(kube_api: ApiClient, kube_worker) -> None:
    kube_worker()
    response = kube_api.post("/jobs/", json={"job_type": "t", "image": "test/succeed", "resources": {"gpu": 4}, "gang": {"enabled": True, "min_members": 2}})
    assert response.status_code == 400 and response.json()["error"]["details"][0]["field"] == "resources"


def test_a_gang_that_cannot_start_whole_is_requeued_without_spending_a_retry(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes, database: Database) -> None:
    kube_worker(INVENTORY_SYNC_SECONDS="3600")  # the service keeps believing node 2 is usable
    start_scheduler(RETRY_BACKOFF_BASE_SECONDS="30")
    # The node is cordoned after the inventory was read: the gang (2 + 2 + 2 GPUs) cannot start whole.
    fake.set_nodes([FakeNode("gpu-node-1", gpus=4), FakeNode("gpu-node-2", gpus=2, gpu_product="NVIDIA-H100-80GB-HBM3", unschedulable=True)])
    job = kube_api.submit(image="test/sleep", resources={"gpu": 2}, gang={"enabled": True, "min_members": 3}, retry_policy={"max_retries": 0})

    def requeued() -> bool:
        with database.session() as s:
            return any("gang incomplete" in e.reason for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job["id"])))

    wait_for(requeued, 30, message="the gang to be requeued")
    after = kube_api.get(f"/jobs/{job['id']}").json()
    assert after["status"] == "pending" and after["retry_count"] == 0
    assert "2 of 3 members running" in after["status_reason"]
    wait_for(lambda: not fake.objects("jobs", NAMESPACE), 15, message="the incomplete gang to be torn down")


def test_clusters_report_live_nodes_and_gpus(kube_api: ApiClient, kube_worker, start_worker, start_scheduler, fake: FakeKubernetes) -> None:
    kube_worker()
    start_worker("local-host", gpus=2)
    start_scheduler()
    running = kube_api.submit(image="test/sleep", resources={"gpu": 1})
    wait_for_status(kube_api, running["id"], "running")
    wait_for(lambda: fake.objects("pods", NAMESPACE) and all(p["status"].get("phase") == "Running" for p in fake.objects("pods", NAMESPACE)), 10, message="the pod to run")
    listing = {c["name"]: c for c in kube_api.get("/clusters/").json()["clusters"]}
    assert set(listing) == {"local", CLUSTER}
    east = listing[CLUSTER]
    assert east["status"] == "healthy" and east["total_nodes"] == 2 and east["total_gpus"] == 6
    assert east["available_gpus"] == 5 and east["running_jobs"] == 1
    assert listing["local"]["total_gpus"] == 2 and listing["local"]["available_gpus"] == 2
    detail = kube_api.get(f"/clusters/{CLUSTER}").json()
    nodes = {n["name"]: n for n in detail["nodes"]}
    busy = fake.objects("pods", NAMESPACE)[0]["spec"]["nodeName"]
    for name, node in nodes.items():
        assert node["gpus"]["available"] == node["gpus"]["total"] - (1 if name == busy else 0)
    assert nodes["gpu-node-2"]["gpus"]["type"] == "NVIDIA-H100-80GB-HBM3" and nodes["gpu-node-2"]["gpus"]["total"] == 2
    assert nodes["gpu-node-1"]["status"] == "ready" and nodes["gpu-node-1"]["cpu"]["total"] == "31.5"  # 31500m, in cores
    assert detail["capacity"]["current_jobs"] == 1 and detail["capacity"]["max_jobs"] > 0
    assert kube_api.get("/clusters/nowhere").status_code == 404
    ready = kube_api.get("/health/ready").json()
    assert ready["checks"]["kubernetes"] == "ok" and ready["checks"][f"kubernetes/{CLUSTER}"] == "ok"
    kube_api.delete(f"/jobs/{running['id']}")


def test_readiness_reports_an_unreachable_cluster(kube_api: ApiClient, fake: FakeKubernetes) -> None:
    fake.stop()
    response = kube_api.get("/health/ready")
    assert response.status_code == 503 and response.json()["checks"]["kubernetes"] == "error"
    summary = {c["name"]: c for c in kube_api.get("/clusters/").json()["clusters"]}
    assert summary[CLUSTER]["status"] == "unreachable"
    assert kube_api.get(f"/clusters/{CLUSTER}").status_code == 503


def test_a_restarted_worker_re_adopts_the_job_it_launched(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes, database: Database) -> None:
    fake.scripts["test/slow"] = Script(lines=[f"tick {i}" for i in range(12)], line_interval=0.5)
    first = kube_worker("k8s-worker-1")
    start_scheduler(JOB_LEASE_SECONDS="30")
    job = kube_api.submit(image="test/slow", retry_policy={"max_retries": 2})
    wait_for_status(kube_api, job["id"], "running")
    wait_for(lambda: "tick 1" in kube_api.get(f"/jobs/{job['id']}/logs").text, 15, message="the first lines")
    os.killpg(first.process.pid, signal.SIGKILL)
    kube_worker("k8s-worker-2")
    done = wait_for_status(kube_api, job["id"], {"succeeded", "failed"}, timeout=60)
    assert done["status"] == "succeeded" and done["retry_count"] == 0, done
    assert done["worker_id"].startswith("worker-k8s-worker-2-")
    lines = kube_api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines()
    assert lines == [f"tick {i}" for i in range(12)]  # every line once, across the restart
    with database.engine.connect() as conn:
        launches = conn.execute(text("SELECT count(*) FROM job_events WHERE job_id = :j AND to_status = 'running' AND from_status <> 'running'"), {"j": job["id"]}).scalar()
    assert launches == 1


def test_an_attempt_outlives_a_worker_silent_past_the_lease_and_is_taken_over(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes, database: Database) -> None:
    """The scheduler once ended such an attempt as "worker lost" (and its Job was deleted): the cluster's
    other workers adopt it instead, and the takeover is on the timeline."""
    import time

    fake.scripts["test/slow"] = Script(lines=[f"tick {i}" for i in range(16)], line_interval=0.5)
    fast = {"JOB_HEARTBEAT_SECONDS": "0.5"}
    first = kube_worker("k8s-worker-1", **fast)
    start_scheduler(JOB_LEASE_SECONDS="2", SCHEDULER_INTERVAL_SECONDS="0.5")
    job = kube_api.submit(image="test/slow", retry_policy={"max_retries": 0})
    wait_for_status(kube_api, job["id"], "running")
    wait_for(lambda: "tick 1" in kube_api.get(f"/jobs/{job['id']}/logs").text, 15, message="the first lines")
    os.killpg(first.process.pid, signal.SIGKILL)
    time.sleep(4)  # twice the lease, with the scheduler's recovery running every half second
    during = kube_api.get(f"/jobs/{job['id']}").json()
    assert during["status"] == "running", during
    assert fake.objects("jobs", NAMESPACE), "the running Job was deleted"

    kube_worker("k8s-worker-2", **fast)
    done = wait_for_status(kube_api, job["id"], {"succeeded", "failed"}, timeout=60)
    assert done["status"] == "succeeded" and done["retry_count"] == 0, done
    events = kube_api.get(f"/jobs/{job['id']}/events").json()
    events = events.get("events", events) if isinstance(events, dict) else events
    takeovers = [e for e in events if e["from_status"] == "running" and e["to_status"] == "running"]
    assert len(takeovers) == 1 and "taken over by worker worker-k8s-worker-2-" in takeovers[0]["reason"], events
    assert "k8s-worker-1" in takeovers[0]["reason"]
    assert not any("lost" in e["reason"] for e in events), events
    lines = kube_api.get(f"/jobs/{job['id']}/logs", params={"timestamps": "false"}).text.splitlines()
    assert lines == [f"tick {i}" for i in range(16)]


def test_finished_jobs_are_kept_for_their_retention_and_only_true_orphans_go_at_once(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes) -> None:
    """The inventory sync once deleted every finished Job at once (as an "orphan"): a failed member's pod and
    its events vanished seconds after the failure, and ttlSecondsAfterFinished never applied."""
    import time

    from kubernetes import client

    from workers.executors.base import JobSpec
    from workers.executors.kubernetes import build_job_manifest

    kube_worker(KUBERNETES_JOB_TTL_SUCCEEDED_SECONDS="0.5", KUBERNETES_JOB_TTL_FAILED_SECONDS="6")
    start_scheduler()
    stranger = JobSpec(job_id="job-nobody0wns", attempt=0, image="test/sleep", command=None, env={}, config={}, cpu_millis=100,
                       memory_bytes=2**20, gpus=0, members=1, timeout_seconds=None, cluster=CLUSTER, node=None)
    with client.ApiClient(client.Configuration(host=fake.url)) as api:
        client.BatchV1Api(api).create_namespaced_job(NAMESPACE, build_job_manifest(stranger, NAMESPACE))
    failed = kube_api.submit(image="test/fail-3", retry_policy={"max_retries": 0})
    succeeded = kube_api.submit(image="test/succeed")

    def job_of(job_id: str) -> list[dict]:
        return fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={job_id}")

    wait_for(lambda: not job_of(stranger.job_id), 15, message="the orphan to be deleted")
    assert wait_for_status(kube_api, failed["id"], {"succeeded", "failed"})["status"] == "failed"
    assert wait_for_status(kube_api, succeeded["id"], {"succeeded", "failed"})["status"] == "succeeded"
    ttl = {j["metadata"]["name"]: j["spec"]["ttlSecondsAfterFinished"] for j in job_of(failed["id"]) + job_of(succeeded["id"])}
    assert set(ttl.values()) == {6}, ttl  # the cluster's own backstop: the longer retention
    wait_for(lambda: not job_of(succeeded["id"]), 15, message="the succeeded Job to go after its retention")
    time.sleep(1.5)  # three inventory syncs
    (kept,) = job_of(failed["id"])
    assert any(c["type"] == "Failed" for c in kept["status"]["conditions"])
    assert fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={failed['id']}"), "the failed member's pod is gone"
    wait_for(lambda: not job_of(failed["id"]), 20, message="the failed Job to go after its retention")


def test_a_gang_spread_over_nodes_reports_every_members_node(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes) -> None:
    """explain once said "Running on gpu-east/None" and the events showed node None for such a gang."""
    kube_worker()
    start_scheduler()
    # 3 members of 2 GPUs over nodes of 4 and 2 GPUs: two nodes, whichever way it is placed.
    job = kube_api.submit(image="test/sleep", resources={"gpu": 2}, gang={"enabled": True, "min_members": 3})
    wait_for_status(kube_api, job["id"], "running", timeout=30)
    explained = kube_api.get(f"/jobs/{job['id']}/explain").json()
    assert explained["reason"] == "RUNNING" and "None" not in explained["message"], explained
    assert "gpu-east/gpu-node-1 (2 members)" in explained["message"] and "gpu-east/gpu-node-2 (1 member)" in explained["message"]
    assert sorted(explained["node"].split(",")) == ["gpu-node-1", "gpu-node-2"]
    pods = wait_for(lambda: [p for p in fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={job['id']}") if p["spec"].get("nodeName")] or None, 15)
    assert kube_api.delete(f"/jobs/{job['id']}").status_code == 200
    wait_for_status(kube_api, job["id"], "cancelled")
    events = kube_api.get(f"/jobs/{job['id']}/events").json()["events"]
    placed = [e for e in events if e["to_status"] in ("queued", "running", "cancelled")]
    assert placed and all(e["node"] and sorted(e["node"].split(",")) == ["gpu-node-1", "gpu-node-2"] for e in placed), placed
    assert pods


def test_a_gpu_job_selects_the_gpu_model_it_was_counted_on_and_tolerates_the_gpu_taint(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes) -> None:
    kube_worker()
    start_scheduler()
    job = kube_api.submit(image="test/sleep", resources={"gpu": 2})
    wait_for_status(kube_api, job["id"], "running")
    node = kube_api.get(f"/jobs/{job['id']}/explain").json()["node"]
    (k8s_job,) = wait_for(lambda: fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={job['id']}"), 10)
    pod = k8s_job["spec"]["template"]["spec"]
    product = {"gpu-node-1": "NVIDIA-A100-SXM4-80GB", "gpu-node-2": "NVIDIA-H100-80GB-HBM3"}[node]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    kube_api.delete(f"/jobs/{job['id']}")
    wait_for_status(kube_api, job["id"], "cancelled")


def test_a_high_priority_job_preempts_a_running_kubernetes_job(kube_api: ApiClient, kube_worker, start_scheduler, fake: FakeKubernetes,
                                                              database: Database) -> None:
    """Issue 11 on the Kubernetes path: the victim's Job is deleted gracefully (foreground: it is gone only once its
    pods have stopped), the victim goes back to pending without spending a retry, with its timeline entry, and
    the preemptor starts on the capacity that was freed, only after the victim's Job is gone."""
    fake.set_nodes([FakeNode("gpu-node-1", gpus=2)])  # one node of 2 GPUs: the victim holds all of it
    kube_worker()
    start_scheduler(PREEMPTION_MIN_RUN_SECONDS="1", PREEMPTION_MAX_PER_MINUTE="10")
    wait_for(lambda: [c for c in kube_api.get("/clusters/").json()["clusters"] if c["name"] == CLUSTER and c["total_gpus"] == 2],
             15, message="the inventory to see one node of 2 GPUs")
    victim = kube_api.submit(image="test/sleep", priority=10, resources={"gpu": 2}, retry_policy={"max_retries": 2})
    wait_for_status(kube_api, victim["id"], "running")
    (victim_job,) = wait_for(lambda: fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={victim['id']}"), 10, message="the victim's Job")
    urgent = kube_api.submit(image="test/sleep", priority=90, resources={"gpu": 2})
    wait_for_status(kube_api, urgent["id"], "running", timeout=40)
    # Deleted gracefully: a foreground delete of its Job, not a forced one, and it was gone before the preemptor's Job came.
    victim_name = victim_job["metadata"]["name"]
    deletes = [d for d in fake.deletions if d[0] == "jobs" and d[2] == victim_name]
    assert deletes and all(d[3] == "Foreground" for d in deletes), fake.deletions
    assert not any(d[0] == "pods" for d in fake.deletions), "pods were deleted one by one instead of through their Job"
    (urgent_job,) = wait_for(lambda: fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={urgent['id']}"), 10, message="the preemptor's Job")
    assert not fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={victim['id']}"), "the victim's Job outlived the preemptor's start"
    assert urgent_job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    started = kube_api.get(f"/jobs/{urgent['id']}").json()
    assert started["cluster"] == CLUSTER and started["node"] == "gpu-node-1"
    # The victim: back to pending on its first attempt, no retry spent, its timeline naming the preemptor.
    after = kube_api.get(f"/jobs/{victim['id']}").json()
    assert after["status"] == "pending" and after["retry_count"] == 0 and after["retry_policy"]["max_retries"] == 2, after
    timeline = kube_api.get(f"/jobs/{victim['id']}/events").json()["events"]
    preempted = [e for e in timeline if e["reason"].startswith("preempted by")]
    assert len(preempted) == 1, timeline
    assert preempted[0]["reason"] == f"preempted by {urgent['id']} (priority 90)"
    assert (preempted[0]["from_status"], preempted[0]["to_status"], preempted[0]["attempt"]) == ("running", "pending", 0)
    assert preempted[0]["details"]["placement"][0]["node"] == "gpu-node-1"
    with database.engine.connect() as conn:
        ends = conn.execute(text("SELECT count(*) FROM job_events WHERE job_id = :j AND to_status IN ('failed', 'cancelled')"),
                            {"j": victim["id"]}).scalar()
    assert ends == 0
    # Once the preemptor is gone the victim runs again, still on attempt 0.
    assert kube_api.delete(f"/jobs/{urgent['id']}").status_code == 200
    back = wait_for_status(kube_api, victim["id"], "running", timeout=40)
    assert back["retry_count"] == 0
    kube_api.delete(f"/jobs/{victim['id']}")
    wait_for_status(kube_api, victim["id"], "cancelled")
