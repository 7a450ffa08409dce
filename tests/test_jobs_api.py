"""The jobs endpoints against the reference, over real HTTP on real PostgreSQL."""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
from sqlalchemy import select

from app.db import Database
from app.models import Job, JobEvent
from tests.conftest import ApiClient

REFERENCE_BODY = {
    "job_type": "inference",
    "priority": 80,
    "image": "pytorch-inference:v1.0",
    "config": {"model": "resnet50", "batch_size": 32},
    "resources": {"cpu": "2", "memory": "8Gi", "gpu": 1},
    "gang": {"enabled": False, "min_members": 1},
    "timeout_seconds": 3600,
    "retry_policy": {"max_retries": 3, "backoff_multiplier": 2},
}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{3})?Z$")


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details", "request_id"}
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def test_create_job_as_in_the_reference(api: ApiClient, database: Database) -> None:
    response = api.post("/jobs/", json=REFERENCE_BODY)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "job_type", "priority", "status", "created_at", "queue_position"}
    assert re.match(r"^job-[0-9a-f]{12}$", body["id"])
    assert body["job_type"] == "inference" and body["priority"] == 80 and body["status"] == "pending"
    assert TIMESTAMP.match(body["created_at"])
    assert body["queue_position"] == 1

    with database.session() as s:
        job = s.get(Job, body["id"])
        assert job is not None
        assert job.cpu_millis == 2000 and job.memory_bytes == 8 * 2**30 and job.gpus == 1
        assert job.queue == "high-priority"
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
        assert [(e.from_status, e.to_status) for e in events] == [(None, "pending")]


def test_get_job_returns_every_documented_field(api: ApiClient) -> None:
    created = api.submit(**REFERENCE_BODY)
    response = api.get(f"/jobs/{created['id']}")
    assert response.status_code == 200
    job = response.json()
    documented = {
        "id", "job_type", "priority", "status", "image", "config", "resources", "created_at",
        "started_at", "completed_at", "retry_count", "worker_id", "logs_url",
    }
    assert documented <= set(job)
    assert job["config"] == REFERENCE_BODY["config"]
    assert job["resources"] == {"cpu": "2", "memory": "8Gi", "gpu": 1}
    assert job["logs_url"] == f"/api/v1/jobs/{created['id']}/logs"
    assert job["started_at"] is None and job["completed_at"] is None and job["worker_id"] is None
    assert job["retry_count"] == 0
    assert job["gang"] == {"enabled": False, "min_members": 1}
    assert job["retry_policy"] == {"max_retries": 3, "backoff_multiplier": 2.0}
    assert job["timeout_seconds"] == 3600


def test_defaults_fill_an_omitted_resources_block(api: ApiClient) -> None:
    created = api.submit(command=["true"], image=None)
    job = api.get(f"/jobs/{created['id']}").json()
    assert job["resources"] == {"cpu": "1", "memory": "1Gi", "gpu": 0}
    assert job["priority"] == 50 and job["queue"] == "high-priority"
    assert job["command"] == ["true"] and job["image"] is None


def test_queue_position_is_rank_among_pending_jobs_of_the_queue(api: ApiClient) -> None:
    low_old = api.submit(priority=10)
    high = api.submit(priority=40)
    low_new = api.submit(priority=10)
    other_queue = api.submit(priority=90)
    assert high["queue_position"] == 1
    assert api.get(f"/jobs/{low_old['id']}").json()["queue_position"] == 2
    assert api.get(f"/jobs/{low_new['id']}").json()["queue_position"] == 3
    assert other_queue["queue_position"] == 1
    api.delete(f"/jobs/{high['id']}")
    assert api.get(f"/jobs/{low_new['id']}").json()["queue_position"] == 2


@pytest.mark.parametrize(
    "change, field",
    [
        ({"priority": 101}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"resources": {"cpu": "two"}}, "resources.cpu"),
        ({"resources": {"cpu": "1.0005"}}, "resources.cpu"),
        ({"resources": {"memory": "8GB"}}, "resources.memory"),
        ({"resources": {"memory": "-1Gi"}}, "resources.memory"),
        ({"resources": {"gpu": -1}}, "resources.gpu"),
        ({"resources": {"gpu": 1.5}}, "resources.gpu"),
        ({"resources": {"gpu": 1, "tpu": 2}}, "resources.tpu"),
        ({"gang": {"enabled": True, "min_members": 0}}, "gang.min_members"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": -5}, "timeout_seconds"),
        ({"retry_policy": {"max_retries": -1}}, "retry_policy.max_retries"),
        ({"retry_policy": {"backoff_multiplier": 0.5}}, "retry_policy.backoff_multiplier"),
        ({"command": []}, "command"),
        ({"command": "echo hi"}, "command"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"env": {"JOB_ID": "spoof"}}, "env"),
        ({"env": {"OK": 5}}, "env.OK.value"),
        ({"config": "not-an-object"}, "config"),
        ({"surprise": True}, "surprise"),
        ({"job_type": ""}, "job_type"),
    ],
)
def test_each_validation_rule_names_its_field(api: ApiClient, change: dict, field: str) -> None:
    body = {**REFERENCE_BODY, **change}
    error = assert_error(api.post("/jobs/", json=body), 400, "VALIDATION_ERROR")
    fields = [d["field"] for d in error["details"]]
    assert field in fields, error
    assert all(d["message"] for d in error["details"])


def test_missing_required_fields_are_all_listed(api: ApiClient) -> None:
    error = assert_error(api.post("/jobs/", json={"priority": 500}), 400, "VALIDATION_ERROR")
    fields = {d["field"] for d in error["details"]}
    assert {"job_type", "priority"} <= fields


def test_a_job_needs_an_image_or_a_command(api: ApiClient) -> None:
    error = assert_error(api.post("/jobs/", json={"job_type": "x"}), 400, "VALIDATION_ERROR")
    assert error["details"][0]["field"] == "image"


def test_quantities_are_stored_canonically_and_echoed_as_given(api: ApiClient, database: Database) -> None:
    created = api.submit(resources={"cpu": "500m", "memory": "512Mi", "gpu": 0})
    with database.session() as s:
        job = s.get(Job, created["id"])
        assert (job.cpu_millis, job.memory_bytes) == (500, 512 * 2**20)
    assert api.get(f"/jobs/{created['id']}").json()["resources"] == {"cpu": "500m", "memory": "512Mi", "gpu": 0}


def test_list_filters_and_total(api: ApiClient) -> None:
    a = api.submit(job_type="training", priority=90)
    b = api.submit(job_type="inference", priority=20)
    c = api.submit(job_type="inference", priority=70)
    api.delete(f"/jobs/{c['id']}")

    listing = api.get("/jobs/").json()
    assert listing["total"] == 3 and listing["limit"] == 50 and listing["offset"] == 0
    assert [j["id"] for j in listing["items"]] == [c["id"], b["id"], a["id"]]
    assert set(listing["items"][0]) == {"id", "job_type", "priority", "status", "created_at", "started_at"}

    assert [j["id"] for j in api.get("/jobs/", params={"job_type": "inference"}).json()["items"]] == [c["id"], b["id"]]
    assert [j["id"] for j in api.get("/jobs/", params={"priority_min": 70}).json()["items"]] == [c["id"], a["id"]]
    by_status = api.get("/jobs/", params={"status": "cancelled"}).json()
    assert by_status["total"] == 1 and by_status["items"][0]["id"] == c["id"]
    assert api.get("/jobs/", params={"status": "pending", "job_type": "training"}).json()["total"] == 1


def test_pagination_edges(api: ApiClient) -> None:
    ids = [api.submit(priority=i)["id"] for i in range(5)]
    newest_first = list(reversed(ids))
    page = api.get("/jobs/", params={"limit": 2, "offset": 0}).json()
    assert [j["id"] for j in page["items"]] == newest_first[:2] and page["total"] == 5
    page = api.get("/jobs/", params={"limit": 2, "offset": 4}).json()
    assert [j["id"] for j in page["items"]] == newest_first[4:]
    page = api.get("/jobs/", params={"limit": 2, "offset": 5}).json()
    assert page["items"] == [] and page["total"] == 5
    assert api.get("/jobs/", params={"limit": 100}).status_code == 200
    for bad in ({"limit": 101}, {"limit": 0}, {"offset": -1}, {"limit": "ten"}, {"status": "sleeping"}, {"priority_min": 101}):
        error = assert_error(api.get("/jobs/", params=bad), 400, "VALIDATION_ERROR")
        assert error["details"][0]["field"] == next(iter(bad))


def test_cancel_pending_job(api: ApiClient, database: Database) -> None:
    created = api.submit()
    response = api.delete(f"/jobs/{created['id']}")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "status", "cancelled_at"}
    assert body["status"] == "cancelled" and TIMESTAMP.match(body["cancelled_at"])
    job = api.get(f"/jobs/{created['id']}").json()
    assert job["status"] == "cancelled" and job["completed_at"] is not None
    with database.session() as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == created["id"]).order_by(JobEvent.id)).all()
        assert [(e.from_status, e.to_status) for e in events] == [(None, "pending"), ("pending", "cancelled")]


def test_cancel_twice_conflicts_and_unknown_is_not_found(api: ApiClient) -> None:
    created = api.submit()
    assert api.delete(f"/jobs/{created['id']}").status_code == 200
    assert_error(api.delete(f"/jobs/{created['id']}"), 409, "CONFLICT")
    assert_error(api.delete("/jobs/job-000000000000"), 404, "NOT_FOUND")
    assert_error(api.get("/jobs/job-000000000000"), 404, "NOT_FOUND")


@pytest.mark.parametrize("final", ["succeeded", "failed"])
def test_cancel_of_a_finished_job_conflicts(api: ApiClient, database: Database, final: str) -> None:
    created = api.submit()
    with database.session() as s:
        job = s.get(Job, created["id"])
        job.status = final
        s.commit()
    assert_error(api.delete(f"/jobs/{created['id']}"), 409, "CONFLICT")


def test_concurrent_cancels_exactly_one_wins(api: ApiClient, database: Database) -> None:
    created = api.submit()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: api.delete(f"/jobs/{created['id']}").status_code, range(8)))
    assert sorted(statuses) == [200] + [409] * 7
    with database.session() as s:
        cancels = s.scalars(select(JobEvent).where(JobEvent.job_id == created["id"], JobEvent.to_status == "cancelled")).all()
        assert len(cancels) == 1


def test_request_id_is_echoed_or_generated(api: ApiClient) -> None:
    response = api.get("/jobs/", headers={"X-Request-ID": "my-trace-42"})
    assert response.headers["X-Request-ID"] == "my-trace-42"
    generated = api.get("/jobs/").headers["X-Request-ID"]
    assert generated.startswith("req-") and generated != api.get("/jobs/").headers["X-Request-ID"]
    error = assert_error(api.get("/jobs/job-nope", headers={"X-Request-ID": "trace-7"}), 404, "NOT_FOUND")
    assert error["request_id"] == "trace-7"


def test_framework_errors_use_the_envelope(api: ApiClient) -> None:
    assert_error(api.get("/no-such-route"), 404, "NOT_FOUND")
    error = assert_error(api.request("PUT", "/jobs/"), 405, "METHOD_NOT_ALLOWED")
    assert "PUT" in error["message"]
    assert_error(api.post("/jobs/", data="job_type=x", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(api.post("/jobs/", data="{not json", headers={"Content-Type": "application/json"}), 400, "VALIDATION_ERROR")
    huge = {**REFERENCE_BODY, "config": {"blob": "x" * (2 * 1024 * 1024)}}
    assert_error(api.post("/jobs/", json=huge), 413, "PAYLOAD_TOO_LARGE")


def test_an_unreachable_database_is_a_503_in_the_envelope(settings) -> None:
    from tests.conftest import LiveServer, free_port

    broken = LiveServer(settings.with_overrides(database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none"))
    try:
        client = ApiClient(broken.url)
        response = client.get("/jobs/")
        error = assert_error(response, 503, "SERVICE_UNAVAILABLE")
        assert response.headers["Retry-After"] == "1"
        assert "nobody" not in error["message"]
    finally:
        broken.stop()


def test_health_probes(api: ApiClient, settings) -> None:
    assert api.get("/health/live").json() == {"status": "ok"}
    assert api.get(f"{api.base_url}/health/live").json() == {"status": "ok"}
    ready = api.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "scheduler": "unknown", "kubernetes": "disabled"}}


def test_readiness_degrades_when_redis_is_down(settings) -> None:
    from tests.conftest import LiveServer, free_port

    server = LiveServer(settings.with_overrides(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        response = ApiClient(server.url).get("/health/ready")
        assert response.status_code == 503
        assert response.json() == {"status": "degraded", "checks": {"database": "ok", "redis": "error", "scheduler": "unknown", "kubernetes": "disabled"}}
    finally:
        server.stop()


def test_openapi_document_and_docs_page(api: ApiClient) -> None:
    spec = api.get("/openapi.json").json()
    assert spec["info"]["title"] == "Job Service"
    assert "/api/v1/jobs/" in spec["paths"] and "/api/v1/jobs/{job_id}" in spec["paths"]
    create = spec["components"]["schemas"]["JobCreate"]
    assert create["properties"]["priority"]["maximum"] == 100
    page = api.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()


def test_created_at_is_the_insert_time(api: ApiClient) -> None:
    before = datetime.now().astimezone()
    created = api.submit()
    after = datetime.now().astimezone()
    at = datetime.fromisoformat(created["created_at"].replace("Z", "+00:00"))
    assert before.timestamp() - 1 <= at.timestamp() <= after.timestamp() + 1
