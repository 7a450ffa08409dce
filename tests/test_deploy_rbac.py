"""The RBAC in deploy/ grants what the service really calls, and no more: the calls are recorded by the
fake API server while the executor and the inventory do their work with the real kubernetes client."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from kubernetes import client

from app.kube import check_cluster, read_inventory
from tests.k8s_fake import FakeKubernetes
from tests.test_kubernetes_executor import TIMINGS, Sink, make_spec, outcome_of
from workers.executors.kubernetes import KubernetesExecutor

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
JOBS_NAMESPACE = "jobservice-jobs"


def rbac_rules() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(resource, verb) granted in the jobs namespace, and cluster-wide."""
    namespaced: set[tuple[str, str]] = set()
    cluster: set[tuple[str, str]] = set()
    for doc in yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()):
        if doc["kind"] in ("Role", "ClusterRole"):
            target = namespaced if doc["kind"] == "Role" else cluster
            for rule in doc["rules"]:
                target.update((r, v) for r in rule["resources"] for v in rule["verbs"])
    return namespaced, cluster


def verb_of(method: str, path: str, query: dict[str, str]) -> tuple[str, str, bool] | None:
    """(resource, verb, namespaced) of a request, as the API server's authorizer sees it."""
    match = re.match(r"^/(?:api/v1|apis/batch/v1)(/namespaces/[^/]+)?/(\w+)(?:/([^/]+))?(?:/(\w+))?$", path)
    if not match:
        return None  # /version and discovery: public to every authenticated caller
    namespaced, resource, name, sub = match.groups()
    resource = f"{resource}/{sub}" if sub else resource
    if method == "POST":
        verb = "create"
    elif method == "DELETE":
        verb = "delete"
    elif name:
        verb = "get"
    else:
        verb = "watch" if query.get("watch") in ("true", "1") else "list"
    return resource, verb, namespaced is not None


def test_the_roles_cover_every_call_and_no_more() -> None:
    with FakeKubernetes() as fake:
        api = client.ApiClient(client.Configuration(host=fake.url))
        executor = KubernetesExecutor(api, JOBS_NAMESPACE, "main", timings=TIMINGS)
        outcome_of(executor.launch(make_spec("test/succeed"), Sink()))
        outcome_of(executor.launch(make_spec("test/succeed", members=2, gpus=0), Sink()))  # a gang: its Service
        sleeper = executor.launch(make_spec("test/sleep"), Sink())
        sleeper.cancel()
        outcome_of(sleeper)
        executor.list_managed_jobs()
        executor.remove_job("no-such-job")
        read_inventory(api, "main")
        assert check_cluster(api) == "ok"
        calls = {verb_of(r.method, r.path, r.query) for r in fake.requests} - {None}
        executor.close()
        api.close()
    namespaced, cluster = rbac_rules()
    used_namespaced = {(r, v) for r, v, ns in calls if ns}
    used_cluster = {(r, v) for r, v, ns in calls if not ns}
    assert used_namespaced <= namespaced, used_namespaced - namespaced
    assert used_cluster <= cluster, used_cluster - cluster
    assert namespaced == used_namespaced, f"granted but never used: {namespaced - used_namespaced}"
    assert cluster == used_cluster, f"granted but never used: {cluster - used_cluster}"


def test_the_manifests_parse_and_wire_the_service_account() -> None:
    docs = [d for f in sorted(DEPLOY.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name in ("jobservice-api", "jobservice-scheduler", "jobservice-worker", "jobservice-flower"):
        assert ("Deployment", name) in kinds
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "jobservice-worker")
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "jobservice"
    env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["WORKER_EXECUTOR"] == "kubernetes"
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["KUBERNETES_NAMESPACE"] == JOBS_NAMESPACE
