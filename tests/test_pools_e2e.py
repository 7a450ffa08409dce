"""Worker pools on the real service (issue 13): two workers of different GPU types and pools, the scheduler,
jobs asking for a type or a pool, and the per-pool metrics an autoscaler reads."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.db import Database
from config import Settings
from tests.conftest import ApiClient, LiveServer, wait_for, wait_for_status
from tests.test_observability_e2e import sample, scrape

TINY = {"cpu": "100m", "memory": "64Mi"}


@pytest.fixture
def api(e2e_settings: Settings, database: Database) -> Iterator[ApiClient]:
    server = LiveServer(e2e_settings)
    yield ApiClient(server.url)
    server.stop()


@pytest.fixture
def fleet(start_worker) -> None:
    start_worker("h100-host", concurrency=2, gpus=2, WORKER_GPU_TYPE="NVIDIA H100 80GB HBM3", WORKER_POOL="h100",
                 WORKER_CPU="4", WORKER_MEMORY="4Gi")
    start_worker("a100-host", concurrency=2, gpus=2, WORKER_GPU_TYPE="NVIDIA A100-SXM4-80GB", WORKER_POOL="a100",
                 WORKER_CPU="4", WORKER_MEMORY="4Gi")


def test_jobs_land_on_the_type_they_ask_for_and_a_busy_type_blocks_no_other(api: ApiClient, fleet, start_scheduler) -> None:
    start_scheduler()
    h100 = api.submit(command=["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], timeout_seconds=30,
                      resources={**TINY, "gpu": 1, "gpu_type": "NVIDIA H100 80GB HBM3"})
    a100 = api.submit(command=["true"], timeout_seconds=30, resources={**TINY, "gpu": 1, "gpu_type": ["NVIDIA A100-SXM4-80GB"]})
    by_pool = api.submit(command=["true"], timeout_seconds=30, resources={**TINY, "gpu": 1, "pool": "a100"})
    for job, node in [(h100, "h100-host"), (a100, "a100-host"), (by_pool, "a100-host")]:
        done = wait_for_status(api, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded" and done["node"] == node, done
    # A list in order of preference: the first type that has room (both are idle now).
    for preferred, node in [("NVIDIA A100-SXM4-80GB", "a100-host"), ("NVIDIA H100 80GB HBM3", "h100-host")]:
        types = [preferred] + [t for t in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB") if t != preferred]
        either = api.submit(command=["true"], timeout_seconds=30, resources={**TINY, "gpu": 1, "gpu_type": types})
        done = wait_for_status(api, either["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded" and done["node"] == node, done
    detail = api.get(f"/jobs/{a100['id']}").json()
    assert detail["resources"]["gpu_type"] == ["NVIDIA A100-SXM4-80GB"]

    # Both H100 GPUs busy: a job asking for H100 waits, and says which type it waits for; A100 jobs keep starting.
    holder = api.submit(command=["sleep", "30"], timeout_seconds=60, priority=50,
                        resources={**TINY, "gpu": 2, "gpu_type": "NVIDIA H100 80GB HBM3"})
    wait_for_status(api, holder["id"], "running")
    waiting = api.submit(command=["true"], timeout_seconds=600, priority=90,
                         resources={**TINY, "gpu": 2, "gpu_type": "NVIDIA H100 80GB HBM3"})
    other = api.submit(command=["true"], timeout_seconds=600, priority=10,
                       resources={**TINY, "gpu": 2, "gpu_type": "NVIDIA A100-SXM4-80GB"})
    done = wait_for_status(api, other["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["node"] == "a100-host", done
    assert api.get(f"/jobs/{waiting['id']}").json()["status"] == "pending"
    explained = api.get(f"/jobs/{waiting['id']}/explain").json()
    assert explained["reason"] == "RESERVED" and explained["reserved_nodes"] == ["local/h100-host"], explained
    assert "has GPU type NVIDIA H100 80GB HBM3" in explained["message"], explained

    # The pool metrics: the waiting H100 job is pool h100's demand; pool a100 has both GPUs idle.
    def metrics() -> dict | None:
        samples = scrape(api.base_url)
        return samples if sample(samples, "jobservice_pool_pending_gpus", pool="h100") == 2 else None

    samples = wait_for(metrics, 10, message="the pool metrics")
    assert sample(samples, "jobservice_pool_pending_jobs", pool="h100") == 1
    assert sample(samples, "jobservice_pool_idle_gpus", pool="h100") == 0
    assert sample(samples, "jobservice_pool_pending_jobs", pool="a100") == 0
    assert sample(samples, "jobservice_pool_idle_gpus", pool="a100") == 2
    api.delete(f"/jobs/{holder['id']}")
    done = wait_for_status(api, waiting["id"], {"succeeded", "failed"}, timeout=60)
    assert done["status"] == "succeeded" and done["node"] == "h100-host", done


def test_a_type_or_pool_nobody_has_is_refused(api: ApiClient, fleet) -> None:
    response = api.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {"gpu": 1, "gpu_type": ["V100", "T4"]}})
    assert response.status_code == 400, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["field"] == "resources.gpu_type" and "V100 or T4" in detail["message"], detail
    response = api.post("/jobs/", json={"job_type": "t", "command": ["true"], "resources": {"pool": "v100"}})
    assert response.status_code == 400 and response.json()["error"]["details"][0]["field"] == "resources.pool", response.text
    # A type that exists, but not in the pool asked for.
    response = api.post("/jobs/", json={"job_type": "t", "command": ["true"],
                                        "resources": {"gpu_type": "NVIDIA H100 80GB HBM3", "pool": "a100"}})
    assert response.status_code == 400, response.text
    # A type some known node has is accepted, however busy or gone it is now.
    api.submit(command=["true"], resources={"gpu": 1, "gpu_type": "NVIDIA A100-SXM4-80GB"})
