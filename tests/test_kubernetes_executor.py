"""The Kubernetes executor and inventory against a fake API server, through the real `kubernetes` client.

Nothing of the client is patched: the fake (tests/k8s_fake) speaks the API's shapes, and scripts keyed by
image name decide what each pod does (test/succeed, test/fail-3, test/oom, test/bad-image, test/sleep, ...).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client

from tests.k8s_fake import FakeKubernetes, FakeNode, Script
from tests.k8s_fake.server import validate_job
from workers.executors.base import EndKind, JobSpec, LogLine, Outcome
from app.kube import build_api_client, check_cluster, read_inventory
from workers.executors.kubernetes import (
    KubernetesExecutor,
    RetryPolicy,
    Timings,
    build_job_manifest,
    job_name,
    member_index,
    parse_log_timestamp,
    pod_failure_details,
    pod_verdict,
)

NAMESPACE = "jobs"
TIMINGS = Timings(
    gang_start_timeout_seconds=30,
    watch_timeout_seconds=30,
    teardown_grace_seconds=10,
    log_drain_seconds=5,
    deadline_grace_seconds=30,
)


class Sink:
    """A LogSink that keeps what it gets."""

    def __init__(self) -> None:
        self.lines: list[LogLine] = []
        self._lock = threading.Lock()

    def __call__(self, lines: list[LogLine]) -> None:
        with self._lock:
            self.lines.extend(lines)

    def texts(self, member: int | None = None) -> list[str]:
        with self._lock:
            return [line.line for line in self.lines if member is None or line.member == member]


_ids = iter(range(1, 10_000))


def make_spec(image: str | None = "test/succeed", **fields: Any) -> JobSpec:
    values: dict[str, Any] = {
        "job_id": f"job-{next(_ids):06x}",
        "attempt": 1,
        "image": image,
        "command": None,
        "env": {"MODEL": "tiny"},
        "config": {"lr": 0.1},
        "cpu_millis": 500,
        "memory_bytes": 2 * 2**30,
        "gpus": 1,
        "members": 1,
        "timeout_seconds": None,
        "cluster": "test-cluster",
        "node": None,
    }
    values.update(fields)
    return JobSpec(**values)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def outcome_of(execution: Any, timeout: float = 15.0) -> Outcome:
    return wait_for(execution.poll, timeout, "the outcome")


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    with FakeKubernetes() as server:
        yield server


def api_client_for(fake: FakeKubernetes) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=fake.url))


@pytest.fixture
def api(fake: FakeKubernetes) -> Iterator[client.ApiClient]:
    api_client = api_client_for(fake)
    yield api_client
    api_client.close()


@pytest.fixture
def executor(api: client.ApiClient) -> Iterator[KubernetesExecutor]:
    executor = KubernetesExecutor(api, NAMESPACE, "test-cluster", timings=TIMINGS, retry=RetryPolicy(base_delay=0.05))
    yield executor
    executor.close()


def jobs_in(fake: FakeKubernetes, spec: JobSpec) -> list[dict[str, Any]]:
    return fake.objects("jobs", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")


# ---------------------------------------------------------------------------------------------------------
# Pure functions


def test_manifest_is_an_indexed_job_with_ranks_resources_and_ownership() -> None:
    spec = make_spec(image="registry.example/train:1.2", command=["python", "train.py"], members=3, gpus=2,
                     cpu_millis=1500, memory_bytes=8 * 2**30, timeout_seconds=3600, attempt=2)
    job = build_job_manifest(spec, NAMESPACE, gpu_resource="amd.com/gpu", cluster="test-cluster")
    body = client.ApiClient().sanitize_for_serialization(job)

    assert body["apiVersion"] == "batch/v1" and body["kind"] == "Job"
    assert body["metadata"]["name"] == f"{spec.job_id}-a2"
    assert body["metadata"]["namespace"] == NAMESPACE
    job_spec = body["spec"]
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == 3
    assert job_spec["backoffLimit"] == 0
    assert job_spec["activeDeadlineSeconds"] == 3600
    ownership = {"app.kubernetes.io/managed-by": "jobservice", "jobservice.io/job-id": spec.job_id, "jobservice.io/attempt": "2"}
    assert body["metadata"]["labels"] == ownership
    assert job_spec["template"]["metadata"]["labels"] == ownership
    assert body["metadata"]["annotations"]["jobservice.io/job-id"] == spec.job_id
    assert body["metadata"]["annotations"]["jobservice.io/attempt"] == "2"

    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/train:1.2"
    assert container["command"] == ["python", "train.py"]
    amounts = {"cpu": "1500m", "memory": str(8 * 2**30), "amd.com/gpu": "2"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    env = {var["name"]: var for var in container["env"]}
    assert env["MODEL"]["value"] == "tiny"
    assert env["JOB_ID"]["value"] == spec.job_id
    assert env["JOB_WORLD_SIZE"]["value"] == "3"
    assert env["JOB_ATTEMPT"]["value"] == "2"
    assert json.loads(env["JOB_CONFIG"]["value"]) == {"lr": 0.1}
    assert env["JOB_RANK"] == {"name": "JOB_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    validate_job(body)  # the fake's admission checks: quantities, label values, restart policy, fieldRef


def test_manifest_pins_to_the_scheduled_node_when_asked() -> None:
    job = build_job_manifest(make_spec(node="gpu-node-2"), NAMESPACE, node_name="gpu-node-2")
    terms = job.spec.template.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    (requirement,) = terms.node_selector_terms[0].match_fields
    assert (requirement.key, requirement.operator, requirement.values) == ("metadata.name", "In", ["gpu-node-2"])


def test_a_gang_spread_over_nodes_is_pinned_to_those_nodes() -> None:
    # The scheduler chose these nodes (of the GPU type the job asked for): no member may land elsewhere.
    executor = KubernetesExecutor(client.ApiClient(), NAMESPACE, "main", pin_to_node=True)
    job = executor.manifest(make_spec(node=None, members=3, nodes=["h100-a", "h100-b"]))
    terms = job.spec.template.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    (requirement,) = terms.node_selector_terms[0].match_fields
    assert (requirement.key, requirement.operator, requirement.values) == ("metadata.name", "In", ["h100-a", "h100-b"])


def test_manifest_without_image_is_refused() -> None:
    with pytest.raises(ValueError, match="no image"):
        build_job_manifest(make_spec(image=None), NAMESPACE)


@pytest.mark.parametrize("job_id", ["job-abc", "Job_With.Odd/Chars", "x" * 120, "-leading-dash-"])
def test_job_names_are_short_dns_labels_and_distinct(job_id: str) -> None:
    name = job_name(job_id, 3)
    assert len(name) <= 52 and name == name.lower()
    assert all(c.isalnum() or c == "-" for c in name) and name[0].isalnum() and name[-1].isalnum()
    assert name != job_name(job_id, 4) and name != job_name(job_id + "x", 3)


def _raw_pod(status: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": "p-1-abcde", "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
                     "labels": {"jobservice.io/job-id": "job-a", "jobservice.io/attempt": "2", "other": "x"},
                     **({"deletionTimestamp": "2024-01-01T00:00:00Z"} if deleting else {})},
        "spec": {"nodeName": "gpu-node-1", "containers": [{"name": "main", "image": "img"}]},
        "status": status,
    }


def _pod(status: dict[str, Any], deleting: bool = False) -> client.V1Pod:
    return client.V1Pod.from_dict(_raw_pod(status, deleting))


def _container(state: dict[str, Any]) -> dict[str, Any]:
    return {"name": "main", "image": "img", "imageID": "", "ready": False, "restartCount": 0, "state": state}


def test_pod_failure_details_and_verdicts() -> None:
    oom = _pod({"phase": "Failed", "containerStatuses": [_container({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]})
    assert pod_failure_details(oom) == {
        "pod": "p-1-abcde", "member": 1, "node": "gpu-node-1", "phase": "Failed", "container": "main",
        "image": "img", "exit_code": 137, "reason": "OOMKilled", "message": None,
    }
    assert pod_verdict(oom)[1].kind == EndKind.EXITED

    evicted = _pod({"phase": "Failed", "reason": "Evicted", "message": "low on memory",
                    "containerStatuses": [_container({"terminated": {"exitCode": 137, "reason": "Error"}})]})
    assert pod_failure_details(evicted)["reason"] == "Evicted"
    assert pod_failure_details(evicted)["exit_code"] == 137
    assert pod_verdict(evicted)[1].kind == EndKind.LOST

    pulling = _pod({"phase": "Pending", "containerStatuses": [_container({"waiting": {"reason": "ImagePullBackOff", "message": "nope"}})]})
    assert pod_failure_details(pulling)["reason"] == "ImagePullBackOff"
    assert pod_verdict(pulling)[1].kind == EndKind.LAUNCH_FAILED and pod_verdict(pulling)[1].fail_fast

    creating = _pod({"phase": "Pending", "containerStatuses": [_container({"waiting": {"reason": "ContainerCreating"}})]})
    assert pod_verdict(creating) is None


POD_STATUSES = [
    {"phase": "Failed", "containerStatuses": [_container({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]},
    {"phase": "Failed", "reason": "Evicted", "message": "low on memory",
     "containerStatuses": [_container({"terminated": {"exitCode": 137, "reason": "Error"}})]},
    {"phase": "Pending", "containerStatuses": [_container({"waiting": {"reason": "ImagePullBackOff", "message": "nope"}})]},
    {"phase": "Pending", "containerStatuses": [_container({"waiting": {"reason": "ContainerCreating"}})]},
    {"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                         "message": "preempted"}],
     "containerStatuses": [_container({"running": {"startedAt": "2024-01-01T00:00:00Z"}})]},
    {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                         "message": "0/2 nodes are available"}]},
    {"phase": "Succeeded", "initContainerStatuses": [_container({"terminated": {"exitCode": 0, "reason": "Completed"}})],
     "containerStatuses": [_container({"terminated": {"exitCode": 0, "reason": "Completed"}})]},
]


@pytest.mark.parametrize("status", POD_STATUSES)
@pytest.mark.parametrize("deleting", [False, True])
def test_the_informers_slim_pod_records_say_what_the_clients_models_say(status: dict[str, Any], deleting: bool) -> None:
    """The informers keep `records.Pod` (a few fields, read from the JSON), not the client's models: every
    judgement the executor makes from a pod must come out the same."""
    from workers.executors.kubernetes import owner_key, records
    from workers.executors.kubernetes.execution import _scheduling_message
    from workers.executors.kubernetes.outcomes import _container_statuses

    record, model = records.Pod(_raw_pod(status, deleting)), _pod(status, deleting)
    assert pod_failure_details(record) == pod_failure_details(model)
    assert pod_verdict(record) == pod_verdict(model)
    assert member_index(record) == member_index(model) == 1
    assert owner_key(record) == owner_key(model) == ("job-a", "2")
    assert _scheduling_message(record) == _scheduling_message(model)
    assert (record.metadata.deletion_timestamp is None) == (model.metadata.deletion_timestamp is None) == (not deleting)
    assert [bool(c.state.running or c.state.terminated) for c in _container_statuses(record)] == \
        [bool(c.state.running or c.state.terminated) for c in _container_statuses(model)]
    assert not hasattr(record, "__dict__")  # __slots__: no per-object dictionary


@pytest.mark.parametrize("condition", [
    None,
    {"type": "Complete", "status": "True"},
    {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"},
    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"},
    {"type": "Failed", "status": "False", "reason": "BackoffLimitExceeded"},
])
def test_the_informers_slim_job_records_give_the_same_verdict(condition: dict[str, Any] | None) -> None:
    from workers.executors.kubernetes import job_verdict, records

    raw = {"metadata": {"name": "j", "resourceVersion": "7", "labels": {"jobservice.io/job-id": "a", "jobservice.io/attempt": "0"}},
           "status": {"conditions": [condition] if condition else []}}
    record, model = records.Job(raw), client.V1Job.from_dict(raw)
    got, expected = job_verdict(record), job_verdict(model)
    assert (got is None) == (expected is None)
    if got is not None:
        assert got[0] == expected[0] and (got[1].reason, got[1].message) == (expected[1].reason, expected[1].message)
    assert record.metadata.resource_version == "7"


def test_an_informer_hands_each_attempt_its_own_objects_from_an_index() -> None:
    """A subscribing attempt gets its objects from the owner index, not a scan of the cache; updates and
    deletions keep the index true."""
    from workers.executors.kubernetes import SharedInformer, records

    def pod(name: str, job: str, phase: str = "Running") -> records.Pod:
        return records.Pod({"metadata": {"name": name, "resourceVersion": "1",
                                         "labels": {"jobservice.io/job-id": job, "jobservice.io/attempt": "0"}},
                            "status": {"phase": phase}})

    informer = SharedInformer("pods-test", lambda *a, **k: None, NAMESPACE, 30, records.Pod)
    informer._sync([pod("a-1", "a"), pod("a-2", "a"), pod("b-1", "b"), pod("stray", "c")], "10")
    informer._event("MODIFIED", pod("a-1", "a", "Succeeded"))
    informer._event("DELETED", pod("a-2", "a"))
    informer._event("ADDED", pod("b-2", "b"))
    seen: dict[str, list[str]] = {}
    for job in ("a", "b", "z"):
        informer.subscribe((job, "0"), object(), lambda objs, version, job=job: seen.setdefault(job, []).extend(
            f"{o.metadata.name}:{o.status.phase}" for o in objs), lambda kind, obj: None)
    assert seen == {"a": ["a-1:Succeeded"], "b": ["b-1:Running", "b-2:Running"], "z": []}
    assert len(informer) == 4 and ("c", "0") in informer._by_owner
    informer._event("DELETED", pod("stray", "c"))
    assert ("c", "0") not in informer._by_owner
    informer.stop()


def test_the_fake_scheduler_counts_what_bound_pods_take_until_they_end() -> None:
    """The fake keeps each node's requested resources with its pod index (as the kube-scheduler's cache does):
    a pod that does not fit waits, and is bound once the pod that took the room has ended."""
    node = FakeNode("small", gpus=0, cpu_millis=1000, memory_bytes=2**30, reserved_cpu_millis=0, reserved_memory_bytes=0)
    with FakeKubernetes([node], step=0.02) as fake:
        fake.scripts["test/hold"] = Script(lines=["working"], line_interval=0.5, exit_code=0)

        def pod(name: str) -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                    "spec": {"containers": [{"name": "c", "image": "test/hold",
                                             "resources": {"requests": {"cpu": "600m", "memory": "1Mi"}}}]}}

        with fake._cond:
            fake.create_pod(NAMESPACE, pod("first"))
        wait_for(lambda: (fake.get("pods", NAMESPACE, "first") or {}).get("spec", {}).get("nodeName") == "small",
                 what="the first pod bound")
        with fake._cond:
            fake.create_pod(NAMESPACE, pod("second"))
        wait_for(lambda: any(c.get("reason") == "Unschedulable" and "Insufficient cpu" in c.get("message", "")
                             for c in fake.get("pods", NAMESPACE, "second")["status"].get("conditions", [])),
                 what="the second pod waiting for room")
        assert fake.get("pods", NAMESPACE, "second")["spec"].get("nodeName") is None
        wait_for(lambda: fake.get("pods", NAMESPACE, "first")["status"].get("phase") == "Succeeded", timeout=30,
                 what="the first pod ended")
        wait_for(lambda: fake.get("pods", NAMESPACE, "second")["spec"].get("nodeName") == "small", timeout=30,
                 what="the second pod bound once the first ended")
        assert fake._requested_on["small"]["cpu"] == pytest.approx(0.6)


def test_jobs_to_delete_keeps_finished_jobs_for_their_retention() -> None:
    from datetime import timedelta

    from workers.executors.kubernetes import ManagedJob, Retention, jobs_to_delete

    now = datetime(2026, 11, 27, 12, tzinfo=UTC)
    ago = lambda seconds: now - timedelta(seconds=seconds)  # noqa: E731
    jobs = [
        ManagedJob("job-a", 0, "running"),
        ManagedJob("job-b", 0, "stranger"),
        ManagedJob("job-c", 0, "done-fresh", "Complete", ago(50)),
        ManagedJob("job-c", 1, "done-old", "Complete", ago(70)),
        ManagedJob("job-d", 0, "failed-fresh", "Failed", ago(70)),
        ManagedJob("job-d", 1, "failed-old", "Failed", ago(130)),
        ManagedJob("job-e", 0, "stray", None),
        ManagedJob("job-f", 0, "going", None, deleting=True),
        ManagedJob("job-g", 0, "running-finished", "Failed", ago(1000)),
    ]
    running = {("job-a", 0), ("job-g", 0)}
    ours = running | {("job-c", 0), ("job-c", 1), ("job-d", 0), ("job-d", 1), ("job-e", 0), ("job-f", 0)}
    doomed = {job.name: why for job, why in jobs_to_delete(jobs, running, ours, now, Retention(60, 120))}
    assert set(doomed) == {"stranger", "done-old", "failed-old", "stray"}
    assert "no attempt" in doomed["stranger"] and "still active" in doomed["stray"]
    # A failed Job is kept at least as long as a succeeded one, whatever is configured.
    assert [j.name for j, _ in jobs_to_delete(jobs[4:5], set(), ours, now, Retention(100, 10))] == []


def test_log_timestamps_keep_nanosecond_order() -> None:
    early, at = parse_log_timestamp("2024-05-01T12:00:00.1234567Z")
    later, _ = parse_log_timestamp("2024-05-01T12:00:00.12345671Z")
    assert early < later
    assert at == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert parse_log_timestamp("not-a-time") is None


# ---------------------------------------------------------------------------------------------------------
# Running jobs


def test_success_delivers_logs_that_outlive_the_pod(fake: FakeKubernetes, executor: KubernetesExecutor, api: client.ApiClient) -> None:
    sink = Sink()
    spec = make_spec("test/succeed")
    outcome = outcome_of(executor.launch(spec, sink))

    assert outcome.kind == EndKind.EXITED and outcome.exit_code == 0 and outcome.succeeded
    assert sink.texts() == ["starting rank 0 of 1", "working", "done"]
    stamps = [line.at for line in sink.lines]
    assert stamps == sorted(stamps) and all(s.tzinfo is not None for s in stamps)

    (pod,) = fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")
    client.BatchV1Api(api).delete_namespaced_job(job_name(spec.job_id, 1), NAMESPACE, propagation_policy="Background")
    wait_for(lambda: fake.get("pods", NAMESPACE, pod["metadata"]["name"]) is None, what="the pod to go")
    with pytest.raises(client.ApiException) as gone:
        client.CoreV1Api(api).read_namespaced_pod_log(pod["metadata"]["name"], NAMESPACE)
    assert gone.value.status == 404
    assert sink.texts() == ["starting rank 0 of 1", "working", "done"]  # kept by the sink


def test_no_call_of_the_executor_is_refused_by_content_negotiation(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    """The log follower once sent `Accept: text/plain`, which a real API server answers with 406: no log at all."""
    sink = Sink()
    spec = make_spec("test/succeed", members=2)
    assert outcome_of(executor.launch(spec, sink)).succeeded
    assert sink.texts(0) == ["starting rank 0 of 2", "working", "done"]
    assert sink.texts(1) == ["starting rank 1 of 2", "working", "done"]
    logs = fake.served("GET", r"/pods/[^/]+/log$")
    assert logs and all(r.status == 200 for r in logs)
    assert [(r.method, r.path, r.refused_accept) for r in fake.requests if r.status in (406, 415)] == []


def test_failure_reports_the_exit_code(executor: KubernetesExecutor) -> None:
    outcome = outcome_of(executor.launch(make_spec("test/fail-3"), Sink()))
    assert outcome.kind == EndKind.EXITED and outcome.exit_code == 3 and outcome.retryable
    assert outcome.details["exit_code"] == 3 and outcome.details["container"] == "main"
    assert outcome.details["reason"] == "Error" and outcome.details["node"].startswith("gpu-node-")


def test_oom_killed(executor: KubernetesExecutor) -> None:
    outcome = outcome_of(executor.launch(make_spec("test/oom"), Sink()))
    assert outcome.kind == EndKind.EXITED and outcome.exit_code == 137
    assert outcome.details["reason"] == "OOMKilled"
    assert "OOMKilled" in outcome.reason


def test_evicted_pod_is_lost(executor: KubernetesExecutor) -> None:
    outcome = outcome_of(executor.launch(make_spec("test/evicted"), Sink()))
    assert outcome.kind == EndKind.LOST and outcome.retryable
    assert outcome.details["reason"] == "Evicted"


def test_image_pull_failure_fails_fast_and_deletes_the_job(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    spec = make_spec("test/bad-image")
    started = time.monotonic()
    outcome = outcome_of(executor.launch(spec, Sink()))

    assert time.monotonic() - started < 5  # nowhere near the gang start timeout (30s here)
    assert outcome.kind == EndKind.LAUNCH_FAILED and not outcome.retryable
    assert outcome.details["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert outcome.details["image"] == "test/bad-image"
    assert jobs_in(fake, spec) == []
    assert ("jobs", NAMESPACE, job_name(spec.job_id, 1), "Foreground") in fake.deletions


def test_config_error_fails_fast(executor: KubernetesExecutor) -> None:
    outcome = outcome_of(executor.launch(make_spec("test/config-error"), Sink()))
    assert outcome.kind == EndKind.LAUNCH_FAILED and outcome.details["reason"] == "CreateContainerConfigError"


def test_gang_of_two_runs_with_ranks_from_the_completion_index(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    sink = Sink()
    spec = make_spec("test/succeed", members=2, gpus=2)
    outcome = outcome_of(executor.launch(spec, sink))

    assert outcome.succeeded
    assert sink.texts(member=0)[0] == "starting rank 0 of 2"
    assert sink.texts(member=1)[0] == "starting rank 1 of 2"
    pods = fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")
    assert sorted(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    (job,) = jobs_in(fake, spec)
    assert job["status"]["completedIndexes"] == "0-1"
    # Each member's node, as the cluster placed it, goes with the outcome (the end event's details).
    assert outcome.details["member_nodes"] == {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p["spec"]["nodeName"] for p in pods}


def test_one_failing_member_fails_the_gang_with_its_details(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    fake.scripts["test/rank1-fails"] = Script(lines=["waiting for peers"], exit_code=None,
                                              by_index={1: Script(lines=["boom"], exit_code=7, line_interval=0.1)})
    outcome = outcome_of(executor.launch(make_spec("test/rank1-fails", members=2), Sink()))

    # Member 0 was killed (exit 143) when the Job failed; the outcome names member 1, which caused it.
    assert outcome.kind == EndKind.EXITED and outcome.exit_code == 7
    assert outcome.details["member"] == 1 and outcome.details["exit_code"] == 7


def test_gang_that_cannot_be_placed_whole_is_torn_down(fake: FakeKubernetes, api: client.ApiClient) -> None:
    executor = KubernetesExecutor(api, NAMESPACE, "test-cluster", gang_start_timeout_seconds=1.0, timings=TIMINGS)
    spec = make_spec("test/sleep", members=3, gpus=4)  # two nodes of 4 GPUs: only two members fit
    outcome = outcome_of(executor.launch(spec, Sink()))

    # Requeued whole by the service, without spending one of the job's retries.
    assert outcome.kind == EndKind.UNPLACED and not outcome.retryable
    assert outcome.reason == "gang incomplete: 2 of 3 members running after 1s"
    (waiting,) = outcome.details["waiting"].values()
    assert "Unschedulable" in waiting and "Insufficient nvidia.com/gpu" in waiting
    assert jobs_in(fake, spec) == []
    assert fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}") == []
    executor.close()


def test_timeout_through_active_deadline(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    sink = Sink()
    outcome = outcome_of(executor.launch(make_spec("test/sleep", timeout_seconds=1), sink))
    assert outcome.kind == EndKind.TIMEOUT and not outcome.retryable
    assert outcome.details["reason"] == "DeadlineExceeded"
    assert sink.texts()[0] == "sleeping"


def test_cancel_deletes_the_job_in_the_foreground_once(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    sink = Sink()
    spec = make_spec("test/sleep", members=2)
    execution = executor.launch(spec, sink)
    wait_for(lambda: len({line.member for line in sink.lines}) == 2, what="both members running")
    assert execution.poll() is None

    execution.cancel()
    execution.cancel()  # harmless
    outcome = outcome_of(execution)

    assert outcome.kind == EndKind.CANCELLED
    assert fake.deletions == [("jobs", NAMESPACE, job_name(spec.job_id, 1), "Foreground")]
    assert jobs_in(fake, spec) == [] and fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}") == []
    execution.cancel()  # after the end: still harmless
    assert execution.poll() == outcome


def test_cancel_of_a_job_already_gone_is_not_an_error(fake: FakeKubernetes, executor: KubernetesExecutor, api: client.ApiClient) -> None:
    spec = make_spec("test/sleep")
    execution = executor.launch(spec, Sink())
    wait_for(lambda: jobs_in(fake, spec), what="the Job")
    client.BatchV1Api(api).delete_namespaced_job(job_name(spec.job_id, 1), NAMESPACE, propagation_policy="Background")

    execution.cancel(EndKind.TIMEOUT, "worker enforced the time limit")
    outcome = outcome_of(execution)
    assert (outcome.kind, outcome.reason) == (EndKind.TIMEOUT, "worker enforced the time limit")
    assert [r.status for r in fake.served("DELETE", "/jobs/")][-1] == 404


def test_job_deleted_behind_our_back_is_lost(fake: FakeKubernetes, executor: KubernetesExecutor, api: client.ApiClient) -> None:
    spec = make_spec("test/sleep")
    execution = executor.launch(spec, Sink())
    wait_for(lambda: fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}"), what="the pod")
    client.BatchV1Api(api).delete_namespaced_job(job_name(spec.job_id, 1), NAMESPACE, propagation_policy="Background")
    outcome = outcome_of(execution)
    assert outcome.kind == EndKind.LOST and "deleted outside the service" in outcome.reason


def test_member_deleted_by_someone_else_loses_the_job(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    sink = Sink()
    spec = make_spec("test/sleep", members=2)
    execution = executor.launch(spec, sink)
    wait_for(lambda: len({line.member for line in sink.lines}) == 2, what="both members running")
    pod = next(p for p in fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")
               if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "1")
    fake.delete_pod(NAMESPACE, pod["metadata"]["name"])  # a drain, an admin

    outcome = outcome_of(execution)
    # Its exit 143 came from the deletion, so it is not read as the job's own failure.
    assert outcome.kind == EndKind.LOST and outcome.retryable
    assert "BackoffLimitExceeded" in outcome.reason


# ---------------------------------------------------------------------------------------------------------
# Watches and log streams that break


SLOW = Script(lines=[f"line {i}" for i in range(30)], line_interval=0.03)


def test_broken_watches_and_log_streams_resume_without_losing_lines(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    fake.scripts["test/slow"] = SLOW
    sink = Sink()
    execution = executor.launch(make_spec("test/slow"), sink)
    wait_for(lambda: len(sink.lines) >= 5, what="some lines")
    fake.break_watches()
    fake.break_log_streams()
    wait_for(lambda: len(sink.lines) >= 15, what="more lines")
    fake.break_log_streams()
    outcome = outcome_of(execution)

    assert outcome.succeeded
    assert sink.texts() == [f"line {i}" for i in range(30)]  # none lost, none twice
    resumed = [r for r in fake.served("GET", "/pods$") if r.query.get("watch") == "true"
               and r.query.get("resourceVersion") not in (None, "0")]
    assert len(resumed) >= 2  # the first watch, and its resumption
    assert len([r for r in fake.served("GET", "/log$") if "sinceTime" in r.query]) >= 2
    assert execution.watch_stats()["resumes"] >= 2


def test_expired_resource_version_relists(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    fake.scripts["test/slow"] = SLOW
    sink = Sink()
    execution = executor.launch(make_spec("test/slow"), sink)
    wait_for(lambda: len(sink.lines) >= 5, what="some lines")
    compacted_at = fake.compact()
    fake.break_watches()
    outcome = outcome_of(execution)

    assert outcome.succeeded and len(sink.texts()) == 30
    served = [r for r in fake.requests if r.path.endswith(("/pods", "/jobs")) and r.method == "GET"]
    expired = [i for i, r in enumerate(served) if r.watch_error == 410]
    assert {served[i].path.rsplit("/", 1)[-1] for i in expired} == {"pods", "jobs"}
    relists = [i for i, r in enumerate(served) if i > expired[0] and "watch" not in r.query]
    assert {served[i].path.rsplit("/", 1)[-1] for i in relists} == {"pods", "jobs"}
    after = served[relists[1]:]
    assert any(r.query.get("watch") == "true" for r in after)  # watching again from the new list
    assert all(int(r.query["resourceVersion"]) >= compacted_at and r.watch_error is None
               for r in after if r.query.get("watch") == "true")
    assert execution.watch_stats()["lists"] == 4  # each watch: its first list, and one after the 410


# ---------------------------------------------------------------------------------------------------------
# Launch: duplicates, transient errors, refusals; adoption after a restart


def test_duplicate_launch_adopts_the_existing_job(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    spec = make_spec("test/succeed")
    first, second = Sink(), Sink()
    one = executor.launch(spec, first)
    two = executor.launch(spec, second)  # a redelivered task

    assert outcome_of(one).succeeded and outcome_of(two).succeeded
    assert [r.status for r in fake.served("POST", "/jobs$")] == [201, 409]
    assert len(jobs_in(fake, spec)) == 1
    assert second.texts() == ["starting rank 0 of 1", "working", "done"]


def test_transient_errors_are_retried_honouring_retry_after(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    fake.inject_error("POST", "/jobs$", 429, times=1, retry_after=1)
    fake.inject_error("POST", "/jobs$", 503, times=1)
    started = time.monotonic()
    outcome = outcome_of(executor.launch(make_spec("test/succeed"), Sink()))

    assert outcome.succeeded
    assert [r.status for r in fake.served("POST", "/jobs$")] == [429, 503, 201]
    assert time.monotonic() - started >= 1.0  # the Retry-After of the 429


def test_refusals_fail_fast(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    fake.inject_error("POST", "/jobs$", 403)
    outcome = executor.launch(make_spec("test/succeed"), Sink()).poll()
    assert outcome is not None and outcome.kind == EndKind.LAUNCH_FAILED

    invalid = executor.launch(make_spec("test/succeed", env={"NOT VALID": "x"}), Sink()).poll()
    assert invalid is not None and invalid.kind == EndKind.LAUNCH_FAILED
    assert invalid.details["status"] == 422 and "NOT VALID" in invalid.reason
    assert [r.status for r in fake.served("POST", "/jobs$")] == [403, 422]  # neither retried


def test_api_unavailable_after_retries_is_lost(fake: FakeKubernetes, api: client.ApiClient) -> None:
    executor = KubernetesExecutor(api, NAMESPACE, "test-cluster", timings=TIMINGS,
                                  retry=RetryPolicy(attempts=3, base_delay=0.01))
    fake.inject_error("POST", "/jobs$", 500, times=3)
    outcome = executor.launch(make_spec("test/succeed"), Sink()).poll()
    assert outcome is not None and outcome.kind == EndKind.LOST and outcome.retryable
    assert len(fake.served("POST", "/jobs$")) == 3
    executor.close()


def test_a_restarted_worker_adopts_its_jobs(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    fake.scripts["test/slow"] = SLOW
    before = Sink()
    spec = make_spec("test/slow", members=2)
    execution = executor.launch(spec, before)
    wait_for(lambda: len(before.lines) >= 6, what="some lines")
    execution.close()  # the worker dies: nothing watches the Job any more
    stored_until = max(line.at for line in before.lines)

    restarted = KubernetesExecutor(api_client_for(fake), NAMESPACE, "test-cluster", timings=TIMINGS)
    assert (spec.job_id, 1, job_name(spec.job_id, 1)) in restarted.list_managed_jobs()
    assert restarted.adopt(make_spec("test/slow"), Sink()) is None  # another job: nothing to adopt
    assert restarted.adopt(spec.__class__(**{**spec.__dict__, "attempt": 2}), Sink()) is None

    after = Sink()
    adopted = restarted.adopt(spec, after, logs_since=stored_until)
    assert adopted is not None
    outcome = outcome_of(adopted)
    assert outcome.succeeded
    for member in (0, 1):
        seen = [line for line in before.lines + after.lines if line.member == member]
        assert sorted({line.line for line in seen}, key=lambda t: int(t.split()[1])) == [f"line {i}" for i in range(30)]
    assert all(line.at > stored_until for line in after.lines)

    # Adopting a Job that has already ended reports its outcome straight away.
    finished = restarted.adopt(spec, Sink())
    assert finished is not None and outcome_of(finished).succeeded
    restarted.close()


# ---------------------------------------------------------------------------------------------------------
# Inventory


def test_inventory_reports_gpus_by_type_and_what_is_used(fake: FakeKubernetes, executor: KubernetesExecutor, api: client.ApiClient) -> None:
    fake.set_nodes([
        FakeNode("a100-1", gpus=8, gpu_product="NVIDIA-A100-SXM4-80GB"),
        FakeNode("h100-1", gpus=4, gpu_product="NVIDIA-H100-80GB-HBM3", ready=False),
        FakeNode("cpu-1", gpus=0, cpu_millis=16_000, memory_bytes=64 * 2**30),
    ])
    sink = Sink()
    spec = make_spec("test/sleep", members=2, gpus=3, cpu_millis=2000, memory_bytes=4 * 2**30)
    execution = executor.launch(spec, sink)
    wait_for(lambda: len({line.member for line in sink.lines}) == 2, what="the gang running")
    other = client.V1Pod(metadata=client.V1ObjectMeta(name="someone-else"), spec=client.V1PodSpec(
        restart_policy="Never", containers=[client.V1Container(name="c", image="test/sleep", resources=client.V1ResourceRequirements(
            limits={"nvidia.com/gpu": "1", "cpu": "250m", "memory": "1Gi"}))]))
    client.CoreV1Api(api).create_namespaced_pod("default", other)
    wait_for(lambda: (fake.get("pods", "default", "someone-else") or {}).get("status", {}).get("phase") == "Running",
             what="the other pod running")

    nodes = {node.name: node for node in read_inventory(api, "test-cluster")}

    a100, h100, cpu = nodes["a100-1"], nodes["h100-1"], nodes["cpu-1"]
    assert (a100.gpu_type, a100.gpu_total, a100.gpu_allocatable, a100.ready) == ("NVIDIA-A100-SXM4-80GB", 8, 8, True)
    assert (a100.gpu_used, a100.gpu_free) == (7, 1)
    assert a100.cpu_used_millis == 2 * 2000 + 250 and a100.memory_used_bytes == 2 * 4 * 2**30 + 2**30
    assert a100.cpu_millis == 31_500 and a100.memory_bytes == 255 * 2**30
    assert a100.managed_pods_running == 2 and a100.cluster == "test-cluster"
    assert (h100.gpu_type, h100.gpu_total, h100.ready, h100.gpu_used) == ("NVIDIA-H100-80GB-HBM3", 4, False, 0)
    assert (cpu.gpu_type, cpu.gpu_total, cpu.gpu_used) == (None, 0, 0)
    execution.cancel()
    outcome_of(execution)


# ---------------------------------------------------------------------------------------------------------
# The fake refuses what a real API server refuses


NEGOTIATED_PATHS = [
    "/api/v1/nodes", "/api/v1/pods", "/api/v1/namespaces/jobs/pods", "/apis/batch/v1/namespaces/jobs/jobs",
    "/api/v1/namespaces/jobs/pods/{pod}", "/api/v1/namespaces/jobs/pods/{pod}/log",
    "/apis/batch/v1/namespaces/jobs/jobs/{job}", "/api/v1/namespaces/jobs/pods?watch=true&timeoutSeconds=0",
]
ACCEPTS = [
    ("text/plain", 406), ("text/html, text/*", 406), ("application/json;q=0", 406),
    ("application/json;stream=bogus", 406), ("application/json;as=Table;g=meta.k8s.io;v=v1", 406),
    (None, 200), ("application/json", 200), ("*/*", 200), ("application/*", 200),
    ("text/plain, application/json;q=0.5", 200), ("application/json;charset=utf-8", 200),
]


def test_the_fake_negotiates_content_like_the_api_server(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    """Every endpoint it serves, pods/log included, answers 406 where kube-apiserver's negotiation does."""
    import urllib3

    spec = make_spec("test/sleep")
    execution = executor.launch(spec, Sink())
    (pod,) = wait_for(lambda: [p for p in fake.objects("pods", NAMESPACE, f"jobservice.io/job-id={spec.job_id}")
                               if p["status"].get("phase") == "Running"], what="a running pod")
    answers = {}
    try:
        for path in NEGOTIATED_PATHS:
            url = fake.url + path.format(pod=pod["metadata"]["name"], job=job_name(spec.job_id, 1))
            for accept, _ in ACCEPTS:
                headers = {"Accept": accept} if accept is not None else {}
                answer = urllib3.request("GET", url, headers=headers, preload_content=False, timeout=5)
                answers[path, accept] = answer.status
                if answer.status == 406:
                    assert json.loads(answer.read())["reason"] == "NotAcceptable"
                answer.release_conn()
    finally:
        execution.cancel()
        outcome_of(execution)
    assert answers == {(path, accept): code for path in NEGOTIATED_PATHS for accept, code in ACCEPTS}


def test_the_fake_refuses_a_body_it_cannot_read(fake: FakeKubernetes) -> None:
    import urllib3

    body = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                       "spec": {"containers": [{"name": "c", "image": "test/succeed"}]}})
    url = fake.url + "/api/v1/namespaces/jobs/pods"
    assert urllib3.request("POST", url, body=body, headers={"Content-Type": "text/plain"}).status == 415
    assert urllib3.request("POST", url, body=body, headers={"Content-Type": "application/json"}).status == 201


def test_check_cluster(fake: FakeKubernetes, api: client.ApiClient) -> None:
    assert check_cluster(api) == "ok"
    fake.stop()
    assert check_cluster(api_client_for(fake), timeout=1) == "error"


def test_build_api_client_from_a_kubeconfig_context(fake: FakeKubernetes, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "elsewhere",
        "clusters": [{"name": "fake", "cluster": {"server": fake.url}},
                     {"name": "other", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "tester", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "fake-ctx", "context": {"cluster": "fake", "user": "tester"}},
                     {"name": "elsewhere", "context": {"cluster": "other", "user": "tester"}}],
    }))
    api = build_api_client(str(kubeconfig), "fake-ctx", qps=7, burst=9)
    assert api.configuration.host == fake.url
    assert (api.limiter.qps, api.limiter.burst) == (7, 9)  # every request is rate limited client-side
    assert api.configuration.connection_pool_maxsize >= 64
    assert check_cluster(api) == "ok"


# ---------------------------------------------------------------------------------------------------------
# Client-side rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_token_bucket_allows_a_burst_then_paces_requests_at_qps() -> None:
    from app.kube import TokenBucket

    clock = FakeClock()
    bucket = TokenBucket(qps=10, burst=3, clock=clock, sleep=clock.sleep)
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.acquire() == pytest.approx(0.1) and bucket.acquire() == pytest.approx(0.1)
    clock.now += 10  # idle: the bucket refills, but never beyond the burst
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.acquire() == pytest.approx(0.1)
    assert bucket.taken == 9 and TokenBucket(qps=0, burst=1, clock=clock, sleep=clock.sleep).acquire() == 0.0


def test_every_request_of_the_executor_goes_through_the_limiter(fake: FakeKubernetes) -> None:
    from app.kube import RateLimitedApiClient, TokenBucket

    limiter = TokenBucket(qps=1000, burst=1000)
    api = RateLimitedApiClient(client.Configuration(host=fake.url), limiter)
    executor = KubernetesExecutor(api, NAMESPACE, "test-cluster", timings=TIMINGS, retry=RetryPolicy(base_delay=0.05))
    sink = Sink()
    assert outcome_of(executor.launch(make_spec("test/succeed", members=2, gpus=0), sink)).succeeded
    read_inventory(api, "test-cluster")
    executor.close()
    api.close()
    assert limiter.taken == len(fake.requests) > 5  # creates, lists, watches, log streams, the inventory


# ---------------------------------------------------------------------------------------------------------
# Shared informers


def test_running_attempts_share_two_watches_per_cluster(fake: FakeKubernetes, executor: KubernetesExecutor) -> None:
    """Each attempt once opened its own two watches (its Job, its pods): 2,000 for 1,000 running jobs."""
    specs = [make_spec("test/sleep", gpus=0, cpu_millis=100, memory_bytes=2**20) for _ in range(12)]
    executions = [executor.launch(spec, Sink()) for spec in specs]
    wait_for(lambda: len([p for p in fake.objects("pods", NAMESPACE) if p["status"].get("phase") == "Running"]) == 12,
             what="every pod running")
    watches = [r for r in fake.requests if r.query.get("watch") == "true"]
    assert sorted(r.path.rsplit("/", 1)[-1] for r in watches) == ["jobs", "pods"], [r.path for r in watches]
    assert all(r.query["labelSelector"] == "app.kubernetes.io/managed-by=jobservice" for r in watches)
    jobs, pods = executor.informers()
    assert jobs.watched == pods.watched == 12 and len(pods) == 12
    executions[3].cancel()
    assert outcome_of(executions[3]).kind == EndKind.CANCELLED  # one attempt's end reaches only its own handler
    assert all(e.poll() is None for i, e in enumerate(executions) if i != 3)
    assert jobs.watched == 11
    for execution in executions:
        execution.cancel()
    for execution in executions:
        outcome_of(execution)
    assert jobs.watched == pods.watched == 0
