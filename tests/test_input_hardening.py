"""Hostile and careless input over real HTTP: one test per class of defect of issue 9 (items 7-9).

Each answers 400/401/405/413 in the envelope, naming the field where there is one, and never 500.
"""
from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from app.api.schemas import MAX_ARG_BYTES, MAX_COMMAND_ITEMS, MAX_CONFIG_DEPTH, MAX_ENV_VARS, MAX_OFFSET
from app.db import Database
from config import Settings
from tests.conftest import ApiClient, LiveServer, make_token
from tests.test_jobs_api import assert_error

BODY: dict[str, Any] = {"job_type": "inference", "image": "busybox:1"}
JSON = {"Content-Type": "application/json"}


def with_(**fields: Any) -> dict[str, Any]:
    return {**BODY, **fields}


def fields_of(error: dict[str, Any]) -> set[str]:
    return {detail["field"] for detail in error["details"]}


def assert_invalid(response: requests.Response, field: str | None = None) -> dict[str, Any]:
    error = assert_error(response, 400, "VALIDATION_ERROR")
    if field is not None:
        # The field itself or one of its items/keys ("command.0", "env.NAME.key").
        assert any(f == field or f.startswith(f"{field}.") for f in fields_of(error)), error
    return error


def post_raw(api: ApiClient, text: str | bytes) -> requests.Response:
    return api.post("/jobs/", data=text.encode() if isinstance(text, str) else text, headers=JSON)


@pytest.fixture
def serve(settings: Settings, database: Database) -> Iterator[Callable[..., LiveServer]]:
    """serve(**setting overrides) -> a LiveServer (authentication on unless overridden)."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(settings.with_overrides(**{"auth_enabled": True, **overrides}))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# --- numbers: every one bounded, beyond the database's columns included -----------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (with_(priority=2**31), "priority"),
        (with_(priority=101), "priority"),
        (with_(timeout_seconds=2**31), "timeout_seconds"),
        (with_(timeout_seconds=7 * 86400 + 1), "timeout_seconds"),
        (with_(timeout_seconds=0), "timeout_seconds"),
        (with_(retry_policy={"max_retries": 2**63}), "retry_policy.max_retries"),
        (with_(retry_policy={"max_retries": 101}), "retry_policy.max_retries"),
        (with_(retry_policy={"backoff_multiplier": 1e12}), "retry_policy.backoff_multiplier"),
        (with_(retry_policy={"backoff_multiplier": 0.5}), "retry_policy.backoff_multiplier"),
        (with_(gang={"enabled": True, "min_members": 1_000_000}), "gang.min_members"),
        (with_(gang={"enabled": True, "min_members": 65}), "gang.min_members"),
        (with_(resources={"gpu": 2**31}), "resources.gpu"),
        (with_(resources={"gpu": 65}), "resources.gpu"),
        (with_(resources={"cpu": "1025"}), "resources.cpu"),
        (with_(resources={"cpu": "9" * 32}), "resources.cpu"),
        (with_(resources={"memory": "65Ti"}), "resources.memory"),
    ],
)
def test_numbers_beyond_their_bounds_are_refused_naming_the_field(api: ApiClient, body: dict[str, Any], field: str) -> None:
    assert_invalid(api.post("/jobs/", json=body), field)


def test_numbers_at_their_bounds_are_accepted(api: ApiClient) -> None:
    job = api.submit(
        priority=100,
        timeout_seconds=7 * 86400,
        retry_policy={"max_retries": 100, "backoff_multiplier": 10},
        gang={"enabled": True, "min_members": 64},
        resources={"cpu": "1m", "memory": "1"},
    )
    detail = api.get(f"/jobs/{job['id']}").json()
    assert detail["timeout_seconds"] == 7 * 86400
    assert detail["retry_policy"] == {"max_retries": 100, "backoff_multiplier": 10.0}
    assert detail["gang"] == {"enabled": True, "min_members": 64}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (f"offset={2**63}", "offset"),
        (f"offset={MAX_OFFSET + 1}", "offset"),
        ("limit=101", "limit"),
        (f"priority_min={10**30}", "priority_min"),
        ("job_type=" + "x" * 64, "job_type"),
        ("stauts=failed", "stauts"),  # unknown: a misspelt filter must not list everything
    ],
)
def test_list_queries_are_bounded(api: ApiClient, query: str, field: str) -> None:
    assert_invalid(api.get(f"/jobs/?{query}"), field)


def test_a_5000_digit_number_is_refused_before_python_parses_it(api: ApiClient) -> None:
    for text in (
        '{"job_type": "a", "image": "b", "priority": ' + "9" * 5000 + "}",
        '{"job_type": "a", "image": "b", "config": {"n": -' + "1" * 5000 + "}}",
        '{"job_type": "a", "image": "b", "config": {"n": 1.' + "1" * 5000 + "}}",
    ):
        assert_invalid(post_raw(api, text))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_not_json(api: ApiClient, literal: str) -> None:
    assert_invalid(post_raw(api, '{"job_type": "a", "image": "b", "config": {"x": ' + literal + "}}"))


# --- strings: no NUL, no lone surrogates, bounded sizes ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"job_type": "a", "image": "b", "config": {"k": "a\\u0000b"}}', "config.k"),
        ('{"job_type": "a", "image": "b", "config": {"a\\u0000b": 1}}', "config"),
        ('{"job_type": "a", "command": ["echo", "\\u0000"]}', "command.1"),
        ('{"job_type": "a", "image": "b", "env": {"A": "x\\u0000"}}', "env.A"),
        ('{"job_type": "a", "image": "b", "config": {"k": "\\ud800"}}', "config.k"),
        ('{"job_type": "a", "image": "b", "config": {"k": "\\udc00x"}}', "config.k"),
        ('{"job_type": "a", "command": ["\\udfff"]}', "command.0"),
    ],
)
def test_nul_and_lone_surrogates_in_the_body_are_refused(api: ApiClient, text: str, field: str) -> None:
    assert_invalid(post_raw(api, text), field)


def test_paired_surrogates_are_text(api: ApiClient) -> None:
    response = post_raw(api, '{"job_type": "a", "image": "b", "config": {"emoji": "\\ud83d\\ude00"}}')
    assert response.status_code == 201, response.text
    assert api.get(f"/jobs/{response.json()['id']}").json()["config"] == {"emoji": "\U0001F600"}


def test_invalid_utf8_is_refused(api: ApiClient) -> None:
    assert_invalid(post_raw(api, b'{"job_type": "a\xff", "image": "b"}'))


@pytest.mark.parametrize(
    "path",
    ["/jobs/job-%00", "/jobs/job-%00/logs", "/jobs/job-%00/events", "/queues/default%00", "/clusters/%00", "/jobs/a%01b"],
)
def test_nul_and_control_characters_in_the_path_are_refused(api: ApiClient, path: str) -> None:
    assert_invalid(api.get(path), "path")
    assert_invalid(api.delete("/jobs/job-%00"), "path")


@pytest.mark.parametrize("query", ["job_type=%00", "status=%00", "job_type=a%00b", "%00=1"])
def test_nul_in_the_query_is_refused(api: ApiClient, query: str) -> None:
    assert_invalid(api.get(f"/jobs/?{query}"))


def test_control_characters_in_a_header_are_refused(live_server: LiveServer) -> None:
    # requests and http.client refuse to send such a header: write the request by hand.
    host, port = live_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/jobs/ HTTP/1.1\r\nHost: x\r\nX-Trace: a\x01b\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize("value", ["\xb2", "9" * 19, "-1", "abc"])
def test_a_last_event_id_that_is_not_an_id_is_refused(api: ApiClient, value: str) -> None:
    job = api.submit()
    api.delete(f"/jobs/{job['id']}")
    for path in (f"/jobs/{job['id']}/events", f"/jobs/{job['id']}/logs"):
        response = api.get(path, params={"follow": "true"}, headers={"Last-Event-ID": value.encode("latin-1")})
        assert_invalid(response, "Last-Event-ID")
    resumed = api.get(f"/jobs/{job['id']}/events", params={"follow": "true"}, headers={"Last-Event-ID": "1"})
    assert resumed.status_code == 200 and "event: end" in resumed.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (with_(image="x" * 513), "image"),
        (with_(image="busy box"), "image"),
        (with_(job_type="a\n"), "job_type"),
        (with_(job_type="a" * 64), "job_type"),
        (with_(command=["x" * (MAX_ARG_BYTES + 1)]), "command"),
        (with_(command=["é" * (MAX_ARG_BYTES // 2 + 1)]), "command"),  # bytes, not characters
        (with_(command=["true"] * (MAX_COMMAND_ITEMS + 1)), "command"),
        (with_(command=[]), "command"),
        (with_(env={f"K{i}": "" for i in range(MAX_ENV_VARS + 1)}), "env"),
        (with_(env={"K": "v" * MAX_ARG_BYTES}), "env"),
        (with_(env={"A" * 257: "v"}), "env"),
        (with_(env={"JOB_ID": "x"}), "env"),
        (with_(config={"blob": "x" * (64 * 1024)}), "config"),
    ],
)
def test_strings_and_collections_are_bounded(api: ApiClient, body: dict[str, Any], field: str) -> None:
    assert_invalid(api.post("/jobs/", json=body), field)


def test_an_argument_of_900_kb_and_10000_env_keys_fail_at_submit_not_at_exec(api: ApiClient) -> None:
    assert_invalid(api.post("/jobs/", json=with_(command=["echo", "x" * 900_000])), "command")
    assert_invalid(api.post("/jobs/", json=with_(env={f"K{i}": "v" for i in range(10_000)})), "env")


def test_command_env_and_config_together_stay_below_the_exec_limit(serve: Callable[..., LiveServer]) -> None:
    # Each part within its own bound, together beyond MAX_EXEC_BYTES (1 MiB): reachable once an operator
    # raises MAX_CONTENT_LENGTH.
    server = serve(auth_enabled=False, max_content_length=4 * 1024 * 1024)
    client = ApiClient(server.url)
    command = ["x" * 60_000] * 20
    assert_invalid(client.post("/jobs/", json=with_(command=command, config={"c": "y" * 60_000})), "command")
    assert client.post("/jobs/", json=with_(command=command[:10])).status_code == 201


# --- structure: depth, duplicate keys, size however sent ---------------------------------------------


def test_deep_nesting_is_refused_without_recursion(api: ApiClient) -> None:
    depth = 100_000
    assert_invalid(post_raw(api, '{"job_type": "a", "image": "b", "config": {"x": ' + "[" * depth + "]" * depth + "}}"))


def test_config_depth_is_capped(api: ApiClient) -> None:
    def nested(levels: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(levels - 1):
            value = {"a": value}
        return value

    assert_invalid(api.post("/jobs/", json=with_(config=nested(MAX_CONFIG_DEPTH + 1))), "config")
    assert api.post("/jobs/", json=with_(config=nested(MAX_CONFIG_DEPTH))).status_code == 201


def test_duplicate_keys_are_refused(api: ApiClient) -> None:
    assert_invalid(post_raw(api, '{"job_type": "a", "image": "b", "priority": 1, "priority": 99}'))
    assert_invalid(post_raw(api, '{"job_type": "a", "image": "b", "config": {"k": 1, "k": 2}}'))


def test_a_chunked_body_beyond_the_limit_is_413(api: ApiClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"job_type": "a", "image": "b", "config": {"blob": "'
        for _ in range(100):
            yield b"x" * 100_000
        yield b'"}}'

    assert_error(api.post("/jobs/", data=chunks(), headers=JSON), 413, "PAYLOAD_TOO_LARGE")
    # A small chunked body still works.
    small = api.post("/jobs/", data=iter([json.dumps(BODY).encode()]), headers=JSON)
    assert small.status_code == 201, small.text


# --- loose types --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, "yes", "on", "true", None])
def test_gang_enabled_is_a_json_boolean(api: ApiClient, value: Any) -> None:
    assert_invalid(api.post("/jobs/", json=with_(gang={"enabled": value, "min_members": 2})), "gang.enabled")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (with_(retry_policy={"backoff_multiplier": "2"}), "retry_policy.backoff_multiplier"),
        (with_(retry_policy={"backoff_multiplier": True}), "retry_policy.backoff_multiplier"),
        (with_(priority=50.0), "priority"),  # integers are JSON integers: 50.0 is refused
        (with_(priority="50"), "priority"),
        (with_(priority=True), "priority"),
        (with_(resources={"cpu": 2}), "resources.cpu"),
        (with_(resources={"memory": 1073741824}), "resources.memory"),
        (with_(resources={"cpu": "0"}), "resources.cpu"),
        (with_(resources={"cpu": "0m"}), "resources.cpu"),
        (with_(resources={"memory": "0"}), "resources.memory"),
        (with_(resources={"gpu": 1.0}), "resources.gpu"),
    ],
)
def test_loose_types_are_refused(api: ApiClient, body: dict[str, Any], field: str) -> None:
    assert_invalid(api.post("/jobs/", json=body), field)


def cursor_of(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        cursor_of([True, "2024-01-01T00:00:00+00:00", "job-1"]),
        cursor_of([2**63, "2024-01-01T00:00:00+00:00", "job-1"]),
        cursor_of([50, "2024-01-01T00:00:00+00:00", "job-\u0000"]),
        cursor_of([50, "2024-01-01T00:00:00", "job-1"]),
        cursor_of({"a": 1}),
        "not base64!",
        "QQ==",
        "A" * 600,
    ],
)
def test_queue_cursors_are_checked_for_type_and_shape(api: ApiClient, cursor: str) -> None:
    assert_invalid(api.get("/queues/default", params={"after": cursor}), "after")


# --- the envelope with the right code; no redirects -------------------------------------------------


def test_each_status_has_its_own_code(api: ApiClient) -> None:
    error = assert_error(api.request("PATCH", "/jobs/"), 405, "METHOD_NOT_ALLOWED")
    assert "PATCH" in error["message"]
    assert_error(api.post("/jobs/", data="a=b", headers={"Content-Type": "text/plain"}), 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(api.post("/jobs/", json=with_(config={"b": "x" * 2_000_000})), 413, "PAYLOAD_TOO_LARGE")
    assert_error(api.get("/nothing-here"), 404, "NOT_FOUND")


@pytest.mark.parametrize("path", ["/jobs", "/queues", "/clusters", "/metrics"])
def test_collections_answer_without_the_slash(api: ApiClient, path: str) -> None:
    response = api.get(path, allow_redirects=False)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"


def test_submit_without_the_slash(api: ApiClient) -> None:
    response = api.post("/jobs", json=BODY, allow_redirects=False)
    assert response.status_code == 201, response.text


# --- tokens -------------------------------------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(serve: Callable[..., LiveServer]) -> None:
    server = serve()
    token = make_token("alice")
    for scheme in ("bearer", "BEARER", "bEaReR", "Bearer"):
        response = requests.get(f"{server.url}/api/v1/jobs/", headers={"Authorization": f"{scheme} {token}"}, timeout=10)
        assert response.status_code == 200, (scheme, response.text)
    response = requests.get(f"{server.url}/api/v1/jobs/", headers={"Authorization": f"Basic {token}"}, timeout=10)
    assert_error(response, 401, "UNAUTHORIZED")


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 1e308},
        {"exp": 10**20},
        {"exp": int(time.time()) + 32 * 86400},
        {"exp": int(time.time()) + 600.5},
        {"exp": "9999999999"},
        {"exp": True},
        {"sub": "al\u0000ice"},
        {"sub": "al\nice"},
        {"sub": "al\u009bice"},
        {"sub": "\ud800"},
        {"sub": "a" * 257},
    ],
)
def test_tokens_with_absurd_claims_are_refused(serve: Callable[..., LiveServer], claims: dict[str, Any]) -> None:
    import jwt

    from tests.conftest import TEST_JWT_SECRET

    server = serve()
    now = int(time.time())
    payload = {"sub": "alice", "scope": "jobs:read jobs:write", "iat": now, "exp": now + 600, **claims}
    token = jwt.encode(payload, TEST_JWT_SECRET, algorithm="HS256")
    response = requests.get(f"{server.url}/api/v1/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert_error(response, 401, "UNAUTHORIZED")


def test_token_lifetime_cap_is_a_setting(serve: Callable[..., LiveServer]) -> None:
    server = serve(jwt_max_token_lifetime_seconds=3600)
    ok = make_token("alice", expires_in=3000)
    too_long = make_token("alice", expires_in=7200)
    assert requests.get(f"{server.url}/api/v1/jobs/", headers={"Authorization": f"Bearer {ok}"}, timeout=10).status_code == 200
    refused = requests.get(f"{server.url}/api/v1/jobs/", headers={"Authorization": f"Bearer {too_long}"}, timeout=10)
    assert_error(refused, 401, "UNAUTHORIZED")


# --- rate limits ----------------------------------------------------------------------------------------


def test_head_counts_against_the_list_limit(serve: Callable[..., LiveServer]) -> None:
    server = serve(ratelimit_enabled=True, ratelimit_list="3/minute", ratelimit_default="100/minute")
    headers = {"Authorization": f"Bearer {make_token('heady')}"}
    url = f"{server.url}/api/v1/jobs/"
    assert requests.get(url, headers=headers, timeout=10).status_code == 200
    assert requests.head(url, headers=headers, timeout=10).status_code == 200
    assert requests.head(url, headers=headers, timeout=10).status_code == 200
    assert requests.head(url, headers=headers, timeout=10).status_code == 429
    assert_error(requests.get(url, headers=headers, timeout=10), 429, "RATE_LIMITED")


# --- the document states the bounds --------------------------------------------------------------------


def test_the_openapi_document_states_bounds_security_and_errors(api: ApiClient) -> None:
    doc = api.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    job = schemas["JobCreate"]["properties"]
    assert job["priority"]["minimum"] == 0 and job["priority"]["maximum"] == 100
    assert job["timeout_seconds"]["maximum"] == 7 * 86400
    assert job["image"]["maxLength"] == 512 and "pattern" in job["image"]
    assert job["command"]["maxItems"] == MAX_COMMAND_ITEMS
    assert job["command"]["items"]["maxLength"] == MAX_ARG_BYTES
    assert job["env"]["maxProperties"] == MAX_ENV_VARS
    assert schemas["Gang"]["properties"]["min_members"]["maximum"] == 64
    assert schemas["Gang"]["properties"]["enabled"]["type"] == "boolean"
    assert schemas["RetryPolicy"]["properties"]["max_retries"]["maximum"] == 100
    assert schemas["RetryPolicy"]["properties"]["backoff_multiplier"]["maximum"] == 10
    assert schemas["Resources"]["properties"]["gpu"]["maximum"] == 64
    assert schemas["Resources"]["properties"]["cpu"]["maxLength"] == 32
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}

    paths = doc["paths"]
    listing = paths["/api/v1/jobs/"]["get"]
    assert listing["security"] == [{"bearerAuth": []}]
    offset = next(p for p in listing["parameters"] if p["name"] == "offset")
    assert offset["schema"]["maximum"] == MAX_OFFSET
    for status in ("400", "401", "403", "429"):
        assert status in listing["responses"], status
    assert set(paths["/api/v1/jobs/{job_id}"]["delete"]["responses"]) >= {"200", "401", "403", "404", "409"}
    assert paths["/api/v1/health/live"]["get"]["security"] == []
    assert set(paths["/api/v1/jobs/{job_id}/logs"]["get"]["responses"]["200"]["content"]) == {"text/plain", "text/event-stream"}
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in paths["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    not_found = doc["components"]["responses"]["NOT_FOUND"]
    assert not_found["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}


def test_bounds_from_settings_reach_the_document_and_the_check(serve: Callable[..., LiveServer]) -> None:
    server = serve(auth_enabled=False, max_gang_members=8, max_job_timeout_seconds=60, max_retries=3)
    client = ApiClient(server.url)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Gang"]["properties"]["min_members"]["maximum"] == 8
    assert schemas["JobCreate"]["properties"]["timeout_seconds"]["maximum"] == 60
    assert schemas["RetryPolicy"]["properties"]["max_retries"]["maximum"] == 3
    assert_invalid(client.post("/jobs/", json=with_(gang={"enabled": True, "min_members": 9})), "gang.min_members")
    assert_invalid(client.post("/jobs/", json=with_(timeout_seconds=61)), "timeout_seconds")
    assert client.post("/jobs/", json=with_(gang={"enabled": True, "min_members": 8}, timeout_seconds=60)).status_code == 201
