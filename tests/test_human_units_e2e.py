"""Memory and CPU in units people read (`23.5Gi`, `15.89`), wherever the API shows them: clusters, the
refusal of a job no node could ever run, and explain. The worker offers what a kubelet would report."""
from __future__ import annotations

from typing import Any

from tests.conftest import ApiClient, wait_for, wait_for_status

# 24683656Ki is how /proc/meminfo and the kubelet state a 23.5 GiB host; 15890m is a node's allocatable CPU.
NODE_MEMORY = "24683656Ki"
NODE_CPU = "15890m"


def _node(api: ApiClient, name: str) -> dict[str, Any]:
    detail = api.get("/clusters/local")
    assert detail.status_code == 200, detail.text
    return next(node for node in detail.json()["nodes"] if node["name"] == name)


def test_clusters_errors_and_explain_show_human_units(api: ApiClient, start_worker, start_scheduler) -> None:
    worker = start_worker("units-node", concurrency=2, WORKER_MEMORY=NODE_MEMORY, WORKER_CPU=NODE_CPU)
    start_scheduler()
    wait_for(lambda: "15.89 CPU, 23.5Gi memory" in worker.log_path.read_text(), 10, message="the worker's log line")

    node = _node(api, "units-node")
    assert node["memory"] == {"total": "23.5Gi", "available": "23.5Gi"}
    assert node["cpu"] == {"total": "15.89", "available": "15.89"}

    too_big = api.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {"memory": "30Gi", "cpu": "1"}})
    assert too_big.status_code in (400, 409), too_big.text
    message = too_big.json()["error"]["message"] + " ".join(d["message"] for d in too_big.json()["error"]["details"])
    assert "23.5Gi" in message and "15.89 CPU" in message and "Ki" not in message

    holder = api.submit(command=["sh", "-c", "sleep 60"], priority=60, resources={"memory": "10Gi", "cpu": "1500m"})
    wait_for_status(api, holder["id"], "running")
    assert _node(api, "units-node")["memory"]["available"] == "13.5Gi"
    assert _node(api, "units-node")["cpu"]["available"] == "14.39"

    waiting = api.submit(command=["true"], priority=40, resources={"memory": "20Gi", "cpu": "1"})
    explained = api.get(f"/jobs/{waiting['id']}/explain").json()
    assert explained["reason"] == "INSUFFICIENT_MEMORY", explained
    assert explained["blocking"] == {"resource": "memory", "requested": "20Gi", "free": "13.5Gi", "node": "local/units-node"}
    assert "13.5Gi free" in explained["message"]
    for job in (holder, waiting):
        api.delete(f"/jobs/{job['id']}")
