"""Distributed training gangs: members find member 0 (MASTER_ADDR/MASTER_PORT) and know their ranks as
torch.distributed and torchrun expect, on Kubernetes (a headless Service per attempt, against the fake API
server through the real client) and on a local host (127.0.0.1 and a free port, real processes)."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from kubernetes import client

from tests.k8s_fake import FakeKubernetes, FakeNode, Script
from tests.k8s_fake.server import validate_job, validate_service
from tests.test_kubernetes_executor import NAMESPACE, TIMINGS, Sink, make_spec, outcome_of, wait_for
from workers.executors.base import EndKind
from workers.executors.kubernetes import (
    KubernetesExecutor,
    RetryPolicy,
    build_job_manifest,
    build_service_manifest,
    job_name,
    master_address,
    service_name,
)
from workers.executors.local import LocalExecutor

INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
REPORT = "rank=$RANK node_rank=$NODE_RANK local_rank=$LOCAL_RANK world=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT"


def pod_env(job: client.V1Job) -> dict[str, dict]:
    body = client.ApiClient().sanitize_for_serialization(job)
    return {var["name"]: var for var in body["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_a_gang_manifest_carries_the_rendezvous_and_per_pod_ranks() -> None:
    spec = make_spec(members=3, gpus=1, env={"RANK": "from the user", "MODEL": "tiny"})
    job = build_job_manifest(spec, NAMESPACE)
    name = job_name(spec.job_id, 1)
    env = pod_env(job)
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{service_name(name)}.{NAMESPACE}.svc" == master_address(name, NAMESPACE)
    assert env["MASTER_PORT"]["value"] == "29500"
    assert env["WORLD_SIZE"]["value"] == env["JOB_WORLD_SIZE"]["value"] == "3"
    assert env["LOCAL_RANK"]["value"] == "0" and env["LOCAL_WORLD_SIZE"]["value"] == "1"
    for rank in ("RANK", "NODE_RANK", "JOB_RANK"):  # the service's variables win over the job's own
        assert env[rank] == {"name": rank, "valueFrom": {"fieldRef": {"fieldPath": INDEX}}}
    assert job.spec.template.spec.subdomain == service_name(name)
    validate_job(client.ApiClient().sanitize_for_serialization(job))

    service = build_service_manifest(spec, NAMESPACE, client.V1Job(metadata=client.V1ObjectMeta(name=name, uid="u-1")))
    body = client.ApiClient().sanitize_for_serialization(service)
    assert body["spec"]["clusterIP"] == "None" and body["spec"]["publishNotReadyAddresses"] is True
    assert body["spec"]["selector"] == job.spec.template.metadata.labels
    assert body["metadata"]["ownerReferences"] == [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "u-1",
                                                    "controller": False, "blockOwnerDeletion": False}]
    assert validate_service(body) == []


def test_a_single_member_rendezvouses_with_itself_and_needs_no_service() -> None:
    job = build_job_manifest(make_spec(members=1), NAMESPACE)
    env = pod_env(job)
    assert (env["MASTER_ADDR"]["value"], env["WORLD_SIZE"]["value"]) == ("127.0.0.1", "1")
    assert job.spec.template.spec.subdomain is None


def test_a_service_name_is_a_dns_1035_label_whatever_the_job_id() -> None:
    for job_id in ("job-abc", "7-starts-with-a-digit", "x" * 80):
        name = job_name(job_id, 3)
        service = service_name(name)
        assert service[0].isalpha() and len(service) <= 63
        assert len(f"{name}-9") <= 63  # the pod hostname too


def test_gpu_pods_tolerate_the_gpu_taint_and_select_the_gpu_model() -> None:
    spec = make_spec(gpus=2, gpu_type="NVIDIA-H100-80GB-HBM3")
    pod = build_job_manifest(spec, NAMESPACE, gpu_tolerations=[("nvidia.com/gpu", None, "NoSchedule"), ("dedicated", "ml", None)],
                             gpu_product_label="nvidia.com/gpu.product").spec.template.spec
    assert [(t.key, t.operator, t.value, t.effect) for t in pod.tolerations] == [
        ("nvidia.com/gpu", "Exists", None, "NoSchedule"), ("dedicated", "Equal", "ml", None)]
    assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    cpu_only = build_job_manifest(make_spec(gpus=0, gpu_type="NVIDIA-H100-80GB-HBM3"), NAMESPACE,
                                  gpu_tolerations=[("nvidia.com/gpu", None, "NoSchedule")]).spec.template.spec
    assert cpu_only.tolerations is None and cpu_only.node_selector is None


def test_a_gang_on_tainted_gpu_nodes_finds_member_zero_through_its_headless_service() -> None:
    taint = (("nvidia.com/gpu", "present", "NoSchedule"),)
    nodes = [FakeNode("gpu-a", gpus=2, taints=taint), FakeNode("gpu-b", gpus=2, taints=taint, gpu_product="NVIDIA-H100-80GB-HBM3")]
    with FakeKubernetes(nodes) as fake:
        fake.scripts["test/report"] = Script(lines=[REPORT])
        api = client.ApiClient(client.Configuration(host=fake.url))
        executor = KubernetesExecutor(api, NAMESPACE, "c", timings=TIMINGS, retry=RetryPolicy(base_delay=0.05))
        sink = Sink()
        spec = make_spec("test/report", members=2, gpus=2)  # one member per node: the gang spans both
        outcome = outcome_of(executor.launch(spec, sink))
        assert outcome.succeeded, outcome
        name = job_name(spec.job_id, 1)
        master = f"{name}-0.{service_name(name)}.{NAMESPACE}.svc:29500"
        assert sink.texts(0)[0] == f"rank=0 node_rank=0 local_rank=0 world=2 master={master}"
        assert sink.texts(1)[0] == f"rank=1 node_rank=1 local_rank=0 world=2 master={master}"
        pods = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
                for p in fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")}
        assert {p["spec"]["nodeName"] for p in pods.values()} == {"gpu-a", "gpu-b"}
        # Member 0's DNS name is <hostname>.<subdomain>.<namespace>.svc, the subdomain a headless Service.
        assert f"{pods['0']['spec']['hostname']}.{pods['0']['spec']['subdomain']}.{NAMESPACE}.svc:29500" == master
        (service,) = fake.objects("services", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")
        assert service["metadata"]["name"] == pods["0"]["spec"]["subdomain"]
        assert service["spec"]["clusterIP"] == "None"
        assert all(service["spec"]["selector"].items() <= p["metadata"]["labels"].items() for p in pods.values())
        (job,) = fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")
        assert service["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

        executor.remove_job(name)  # what the retention sweep does: the Service goes with the Job
        wait_for(lambda: not fake.objects("services", NAMESPACE), what="the Service to be collected")

        untolerating = KubernetesExecutor(api, NAMESPACE, "c", timings=TIMINGS, gpu_tolerations=())
        stuck = untolerating.launch(make_spec("test/report", gpus=1), Sink())
        (pending,) = wait_for(lambda: [p for p in fake.objects("pods", NAMESPACE) if p["status"].get("conditions")
                                       and "untolerated taint {nvidia.com/gpu: present}" in p["status"]["conditions"][-1].get("message", "")],
                              what="an unschedulable pod")
        stuck.cancel()
        assert outcome_of(stuck).kind == EndKind.CANCELLED
        executor.close()
        untolerating.close()
        api.close()


RENDEZVOUS = textwrap.dedent("""
    import os, socket, time
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert os.environ["NODE_RANK"] == str(rank) and os.environ["LOCAL_RANK"] == "0"
    if rank == 0:
        with socket.create_server((addr, port)) as server:
            for _ in range(world - 1):
                peer, _ = server.accept()
                with peer:
                    print("member 0 heard:", peer.recv(100).decode(), flush=True)
    else:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((addr, port), timeout=1) as conn:
                    conn.sendall(f"hello from rank {rank} of {world}".encode())
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        print(f"rank {rank} reached {addr}:{port}", flush=True)
""")


def test_a_local_gang_rendezvouses_at_member_zero(tmp_path: Path) -> None:
    """The local executor's gang: MASTER_ADDR=127.0.0.1 and one free port shared by all members (the way
    torch.distributed's TCPStore rendezvous works: member 0 listens, the others connect)."""
    sink = Sink()
    execution = LocalExecutor(tmp_path).launch(make_spec(None, command=[sys.executable, "-c", RENDEZVOUS], members=3, gpus=0), sink)
    outcome = outcome_of(execution, timeout=30)
    assert outcome.succeeded, (outcome, sink.texts())
    assert sorted(sink.texts(0)) == ["member 0 heard: hello from rank 1 of 3", "member 0 heard: hello from rank 2 of 3"]
    assert sink.texts(1)[0].startswith("rank 1 reached 127.0.0.1:") and sink.texts(2)[0].startswith("rank 2 reached 127.0.0.1:")
    assert sink.texts(1)[0].rsplit(":", 1)[1] == sink.texts(2)[0].rsplit(":", 1)[1]  # one port for the gang


def test_a_gang_whose_service_is_refused_is_not_left_running_and_a_redelivery_keeps_one_service() -> None:
    with FakeKubernetes() as fake:
        api = client.ApiClient(client.Configuration(host=fake.url))
        executor = KubernetesExecutor(api, NAMESPACE, "c", timings=TIMINGS, retry=RetryPolicy(base_delay=0.05))
        fake.inject_error("POST", r"/services$", 403)
        refused = make_spec("test/sleep", members=2, gpus=0)
        outcome = outcome_of(executor.launch(refused, Sink()))
        assert outcome.kind == EndKind.LAUNCH_FAILED and "rejected" in outcome.reason
        assert ("jobs", NAMESPACE, job_name(refused.job_id, 1), "Foreground") in fake.deletions

        spec = make_spec("test/sleep", members=2, gpus=0)
        first = executor.launch(spec, Sink())
        again = executor.launch(spec, Sink())  # a redelivered task meets its Job (409) and its Service (409)
        assert len(fake.objects("services", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")) == 1
        for execution in (first, again):
            execution.cancel()
            outcome_of(execution)
        executor.close()
        api.close()
