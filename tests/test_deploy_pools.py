"""deploy/kubernetes/pools: the autoscalers read the series the service really exposes, for the pool its workers
really serve, and a scale-down drains (issue 13)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import text

from app.db import Database
from config import Settings
from tests.conftest import ApiClient
from tests.test_observability_e2e import scrape

POOLS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "pools"
SERIES = re.compile(r"\b(jobservice_[a-z_]+)(\{[^}]*\})?")


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((POOLS / name).read_text()) if d]


def worker() -> dict[str, Any]:
    (deployment,) = documents("worker-h100.yaml")
    return deployment


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container["env"]}


def exposed_series(api: ApiClient, database: Database, pool: str) -> dict[str, dict]:
    """The service's real /metrics with one node of `pool` registered: {name: {labels: value}}."""
    with database.engine.begin() as conn:
        conn.execute(text("INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, pool, cpu_millis, memory_bytes, slots)"
                          " VALUES ('local', 'n1', '[0]', 'H100', :pool, 1000, 1073741824, 1)"), {"pool": pool})
    return scrape(api.base_url)


def test_the_worker_deployment_serves_its_pool_and_drains_on_scale_down(settings: Settings) -> None:
    deployment = worker()
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    variables = env(container)
    pool = variables["WORKER_POOL"]
    assert pool == deployment["metadata"]["labels"]["jobservice.io/pool"]
    assert variables["WORKER_EXECUTOR"] == "local"
    # Kubernetes waits for the drain (running jobs finish), then the kill grace for the rest to stop.
    drain, kill = int(variables["WORKER_DRAIN_SECONDS"]), int(float(variables["KILL_GRACE_SECONDS"]))
    assert spec["terminationGracePeriodSeconds"] >= drain + kill
    assert spec["terminationGracePeriodSeconds"] <= drain + kill + 60  # not a stuck pod for an hour either
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop and "while kill -0 1" in pre_stop
    # The pods land on the pool's GPU model, named by the label the inventory reads too.
    assert settings.kubernetes_gpu_product_label in spec["nodeSelector"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]


def test_keda_and_the_hpa_scale_that_deployment_by_the_real_pool_series(api: ApiClient, database: Database) -> None:
    deployment = worker()
    pool = env(deployment["spec"]["template"]["spec"]["containers"][0])["WORKER_POOL"]
    gpus_per_pod = int(deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    exposed = exposed_series(api, database, pool)

    (scaled,) = documents("keda-scaledobject.yaml")
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and int(trigger["metadata"]["threshold"]) == gpus_per_pod
    used = SERIES.findall(trigger["metadata"]["query"])
    assert {name for name, _ in used} >= {"jobservice_pool_pending_gpus"}
    for name, matchers in used:
        assert name in exposed, f"{name} is not a series the service exposes"
        assert matchers == f'{{pool="{pool}"}}', (name, matchers)
        assert (("pool", pool),) in exposed[name], f"{name} has no series for pool {pool}"

    hpa, adapter = documents("hpa.yaml")
    assert hpa["kind"] == "HorizontalPodAutoscaler" and hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["selector"]["matchLabels"] == {"pool": pool}
    assert int(metric["external"]["target"]["averageValue"]) == gpus_per_pod
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["externalRules"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    rule_series = SERIES.findall(rule["seriesQuery"]) + SERIES.findall(rule["metricsQuery"])
    assert {name for name, _ in rule_series} == {name for name, _ in used}, "KEDA and the HPA scale on different figures"
    for name, _ in rule_series:
        assert name in exposed, f"{name} is not a series the service exposes"
    assert "by (pool)" in rule["metricsQuery"]
