"""Rate limits over real HTTP with counters in the real Redis: headers, 429s, per-client keys, sharing, fail-open."""
from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from app.db import Database
from config import Settings
from tests.conftest import ApiClient, LiveServer, free_port, make_token
from tests.test_jobs_api import assert_error

LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


@pytest.fixture
def serve(settings: Settings, database: Database) -> Iterator[Callable[..., LiveServer]]:
    """serve(**setting overrides) -> a LiveServer with authentication and rate limits on."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(settings.with_overrides(**{"auth_enabled": True, "ratelimit_enabled": True, **overrides}))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def as_user(server: LiveServer, sub: str, scopes: str = "jobs:read jobs:write") -> ApiClient:
    return ApiClient(server.url, {"Authorization": f"Bearer {make_token(sub, scopes)}"})


def limit_of(response: requests.Response) -> tuple[int, int, int]:
    return tuple(int(response.headers[name]) for name in LIMIT_HEADERS)  # type: ignore[return-value]


def assert_rate_limited(response: requests.Response) -> dict[str, Any]:
    error = assert_error(response, 429, "RATE_LIMITED")
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 61, retry_after
    assert response.headers["X-RateLimit-Remaining"] == "0"
    assert int(response.headers["X-RateLimit-Reset"]) >= int(time.time())
    return error


def test_limited_responses_carry_the_limit_headers(serve: Callable[..., LiveServer]) -> None:
    server = serve()
    alice = as_user(server, "alice")
    before = int(time.time())

    submitted = alice.post("/jobs/", json={"job_type": "x", "image": "busybox:1"})
    assert submitted.status_code == 201
    limit, remaining, reset = limit_of(submitted)
    assert (limit, remaining) == (100, 99)
    assert before < reset <= int(time.time()) + 61, "X-RateLimit-Reset is an epoch second about a minute out"
    assert "Retry-After" not in submitted.headers

    listing = alice.get("/jobs/")
    assert limit_of(listing)[:2] == (300, 299)
    assert limit_of(alice.get("/jobs/"))[:2] == (300, 298)
    job_id = submitted.json()["id"]
    assert limit_of(alice.get(f"/jobs/{job_id}"))[:2] == (600, 599)
    assert limit_of(alice.delete(f"/jobs/{job_id}"))[:2] == (600, 599), "each endpoint and method counts apart"
    # Refusals count too, and carry the headers.
    forbidden = as_user(server, "alice", "jobs:read").post("/jobs/", json={"job_type": "x", "image": "y"})
    assert forbidden.status_code == 403 and limit_of(forbidden)[:2] == (100, 98)


def test_health_probes_are_not_limited(serve: Callable[..., LiveServer]) -> None:
    server = serve(ratelimit_default="1/minute")
    for _ in range(4):
        for path in ("/api/v1/health/live", "/api/v1/health/ready", "/health/live", "/health/ready"):
            response = requests.get(f"{server.url}{path}", timeout=10)
            assert response.status_code == 200
            assert not set(LIMIT_HEADERS) & set(response.headers)


def test_the_101st_submission_in_a_minute_is_refused(serve: Callable[..., LiveServer]) -> None:
    """The real default, 100/minute on POST /jobs/."""
    server = serve()
    alice = as_user(server, "alice")
    body = {"job_type": "x", "image": "busybox:1"}
    for n in range(100):
        response = alice.post("/jobs/", json=body)
        assert response.status_code == 201, (n, response.text)
        assert limit_of(response)[:2] == (100, 99 - n)
    refused = alice.post("/jobs/", json=body)
    error = assert_rate_limited(refused)
    assert refused.headers["X-RateLimit-Limit"] == "100"
    assert "100/minute" in error["message"]
    assert alice.get("/jobs/").json()["total"] == 100, "the refused submission created nothing; reads still pass"
    assert as_user(server, "bob").post("/jobs/", json=body).status_code == 201, "bob is another client"


def test_one_clients_flood_does_not_limit_another(serve: Callable[..., LiveServer]) -> None:
    server = serve(ratelimit_list="3/minute", ratelimit_default="5/minute")
    alice, bob = as_user(server, "alice"), as_user(server, "bob")
    for _ in range(3):
        assert alice.get("/jobs/").status_code == 200
    assert_rate_limited(alice.get("/jobs/"))
    assert_rate_limited(alice.get("/jobs/"))
    for expected in (2, 1, 0):
        response = bob.get("/jobs/")
        assert response.status_code == 200 and limit_of(response)[1] == expected
    # The same subject through another token is the same client.
    assert_rate_limited(as_user(server, "alice", "jobs:read").get("/jobs/"))
    # Alice's other endpoints have their own budget.
    assert alice.get("/jobs/job-000000000000").status_code == 404


def get_from(server: LiveServer, path: str, source: str) -> tuple[int, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, dict(response.headers)
    finally:
        connection.close()


def test_calls_without_a_caller_are_limited_per_client_address(serve: Callable[..., LiveServer]) -> None:
    server = serve(ratelimit_default="2/minute")
    # The API document needs no token, so the client address is the key.
    for _ in range(2):
        assert get_from(server, "/api/v1/openapi.json", "127.0.0.1")[0] == 200
    status, headers = get_from(server, "/api/v1/openapi.json", "127.0.0.1")
    assert status == 429 and "Retry-After" in headers
    assert get_from(server, "/api/v1/openapi.json", "127.0.0.2")[0] == 200
    # With authentication off there is never a caller: every call is keyed by address.
    open_server = serve(auth_enabled=False, ratelimit_list="1/minute")
    assert get_from(open_server, "/api/v1/jobs/", "127.0.0.3")[0] == 200
    assert get_from(open_server, "/api/v1/jobs/", "127.0.0.3")[0] == 429
    assert get_from(open_server, "/api/v1/jobs/", "127.0.0.4")[0] == 200


def test_api_processes_share_one_limit_through_redis(serve: Callable[..., LiveServer]) -> None:
    first, second = serve(ratelimit_list="3/minute"), serve(ratelimit_list="3/minute")
    token = make_token("alice")
    on_first = ApiClient(first.url, {"Authorization": f"Bearer {token}"})
    on_second = ApiClient(second.url, {"Authorization": f"Bearer {token}"})
    assert limit_of(on_first.get("/jobs/"))[1] == 2
    assert limit_of(on_second.get("/jobs/"))[1] == 1
    assert limit_of(on_first.get("/jobs/"))[1] == 0
    assert_rate_limited(on_second.get("/jobs/"))
    assert_rate_limited(on_first.get("/jobs/"))


def test_redis_unreachable_fails_open_with_limits_still_counted(serve: Callable[..., LiveServer]) -> None:
    server = serve(redis_url=f"redis://127.0.0.1:{free_port()}/0", ratelimit_list="2/minute")
    alice = as_user(server, "alice")
    started = time.monotonic()
    for expected in (1, 0):
        response = alice.get("/jobs/")
        assert response.status_code == 200, response.text
        assert limit_of(response)[:2] == (2, expected)
    assert_rate_limited(alice.get("/jobs/"))
    assert as_user(server, "bob").get("/jobs/").status_code == 200
    assert time.monotonic() - started < 5, "a dead Redis must not slow every request down"


def test_limits_can_be_switched_off(api: ApiClient) -> None:
    # conftest's service_env sets RATELIMIT_ENABLED=false.
    for _ in range(3):
        response = api.get("/jobs/")
        assert response.status_code == 200
        assert not set(LIMIT_HEADERS) & set(response.headers)


def test_a_429_body_is_the_envelope(serve: Callable[..., LiveServer]) -> None:
    server = serve(ratelimit_default="1/minute")
    alice = as_user(server, "alice")
    assert alice.get("/jobs/job-000000000000").status_code == 404
    response = alice.get("/jobs/job-000000000000")
    error = assert_rate_limited(response)
    assert set(json.loads(response.text)) == {"error"}
    assert error["details"] == [] and "Retry-After" in error["message"]
