"""Authentication and authorization over real HTTP: bearer JWTs (HS256, RS256, ES256, JWKS), scopes, owners."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import func, select

from app import create_app
from app.db import Database
from app.models import Job
from config import Settings
from tests.conftest import TEST_JWT_SECRET, ApiClient, LiveServer, free_port, make_token
from tests.test_jobs_api import assert_error

ROOT = Path(__file__).resolve().parent.parent
READ = "jobs:read"
WRITE = "jobs:write"
RW = "jobs:read jobs:write"


# --- helpers ----------------------------------------------------------------------------------


def client(server: LiveServer, token: str | None = None, **headers: str) -> ApiClient:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return ApiClient(server.url, headers)


def assert_unauthorized(response: requests.Response) -> dict[str, Any]:
    error = assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    return error


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str = "alice", scope: str = RW, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "scope": scope, "iat": now, "exp": now + 600, **extra}


def hand_signed(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand: PyJWT refuses to produce the forgeries these tests need."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest() if hmac_key is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def serve(settings: Settings, database: Database) -> Iterator[Callable[..., LiveServer]]:
    """serve(**setting overrides) -> a LiveServer with authentication on, stopped after the test."""
    servers: list[LiveServer] = []

    def start(**overrides: Any) -> LiveServer:
        server = LiveServer(settings.with_overrides(auth_enabled=True, **overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def auth_server(settings: Settings, database: Database) -> Iterator[LiveServer]:
    """HS256 with the test secret, as conftest's service_env configures it, but with auth on."""
    server = LiveServer(settings.with_overrides(auth_enabled=True))
    yield server
    server.stop()


def as_user(server: LiveServer, sub: str, scopes: str | list[str] | None = RW, **claims: Any) -> ApiClient:
    return client(server, make_token(sub, scopes, **claims))


# --- who may call without a token -------------------------------------------------------------


def test_health_probes_and_the_api_document_need_no_token(auth_server: LiveServer) -> None:
    anonymous = client(auth_server)
    for path in ("/api/v1/health/live", "/api/v1/health/ready", "/health/live", "/health/ready"):
        response = anonymous.get(f"{auth_server.url}{path}")
        assert response.status_code == 200, (path, response.text)
    assert anonymous.get("/openapi.json").json()["info"]["title"] == "Job Service"
    assert anonymous.get("/docs").status_code == 200
    # A bad token on a public path is ignored, not refused.
    assert client(auth_server, "garbage").get("/health/live").status_code == 200


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/jobs/"),
        ("POST", "/jobs/"),
        ("GET", "/jobs/job-000000000000"),
        ("DELETE", "/jobs/job-000000000000"),
        ("GET", "/jobs/job-000000000000/logs"),
        ("GET", "/queues/"),
        ("GET", "/clusters/"),
        ("GET", "/metrics/"),
        ("GET", "/no-such-route"),
    ],
)
def test_every_other_endpoint_needs_a_token(auth_server: LiveServer, method: str, path: str) -> None:
    error = assert_unauthorized(client(auth_server).request(method, path, json={"job_type": "x", "image": "y"}))
    assert "Authorization: Bearer" in error["message"]


@pytest.mark.parametrize("prefix", ["/queues/", "/clusters/", "/metrics/"])
def test_queues_clusters_and_metrics_accept_any_valid_token(auth_server: LiveServer, prefix: str) -> None:
    response = as_user(auth_server, "nobody-special", scopes=None).get(prefix)
    # Built by others: whatever they answer, authentication and scopes are not in the way.
    assert response.status_code not in (401, 403), response.text


# --- refused tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Basic YWxpY2U6c2VjcmV0",
        "Token abc.def.ghi",
        "Bearer a b",
        "Bearer garbage",
        "Bearer a.b.c",
        "Bearer ....",
        "Bearer eyJhbGciOiJIUzI1NiJ9.bm90LWpzb24.c2ln",
        "bearer " + "x" * 5000,
    ],
)
def test_missing_or_malformed_header_is_401(auth_server: LiveServer, authorization: str) -> None:
    assert_unauthorized(client(auth_server, Authorization=authorization).get("/jobs/"))


def test_no_header_is_401_with_a_bearer_challenge(auth_server: LiveServer) -> None:
    response = client(auth_server).get("/jobs/")
    error = assert_unauthorized(response)
    assert error["details"] == []
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="jobservice"'


def test_alg_none_is_refused(auth_server: LiveServer) -> None:
    for header in ({"alg": "none", "typ": "JWT"}, {"alg": "None"}, {"alg": "NONE"}):
        assert_unauthorized(client(auth_server, hand_signed(header, claims(scope="admin"), None)).get("/jobs/"))


@pytest.mark.filterwarnings("ignore:The HMAC key is")  # HS512 with the HS256 test secret: on purpose
def test_another_algorithm_is_refused(auth_server: LiveServer, rsa_key: rsa.RSAPrivateKey) -> None:
    # Same secret, stronger HMAC: still not on the configured list (HS256 only).
    hs512 = make_token("alice", RW, algorithm="HS512")
    error = assert_unauthorized(client(auth_server, hs512).get("/jobs/"))
    assert "algorithm" in error["message"]
    rs256 = make_token("alice", RW, key=rsa_key, algorithm="RS256")
    assert_unauthorized(client(auth_server, rs256).get("/jobs/"))


def test_bad_signature_and_tampered_payload_are_refused(auth_server: LiveServer) -> None:
    assert_unauthorized(as_user(auth_server, "alice", key="another-secret-that-is-long-enough-0123456789").get("/jobs/"))
    header, payload, signature = make_token("alice", READ).split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["scope"] = "admin"
    tampered = f"{header}.{b64url(json.dumps(forged).encode())}.{signature}"
    error = assert_unauthorized(client(auth_server, tampered).get("/jobs/"))
    assert "signature" in error["message"].lower()


def test_expired_and_not_yet_valid_tokens_are_refused(auth_server: LiveServer) -> None:
    now = int(time.time())
    error = assert_unauthorized(as_user(auth_server, "alice", exp=now - 5).get("/jobs/"))
    assert "expired" in error["message"]
    error = assert_unauthorized(as_user(auth_server, "alice", nbf=now + 300).get("/jobs/"))
    assert "not yet valid" in error["message"]
    assert_unauthorized(as_user(auth_server, "alice", iat=now + 300).get("/jobs/"))


def test_claims_the_service_relies_on_must_be_present(auth_server: LiveServer) -> None:
    assert_unauthorized(as_user(auth_server, None).get("/jobs/"))  # no sub
    assert_unauthorized(as_user(auth_server, "").get("/jobs/"))
    assert_unauthorized(as_user(auth_server, "alice", exp=None).get("/jobs/"))  # never expires
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(sub=123), TEST_JWT_SECRET.encode())  # type: ignore[arg-type]
    assert_unauthorized(client(auth_server, token).get("/jobs/"))
    for weird in ({"exp": "tomorrow"}, {"nbf": [1]}, {"iat": {"a": 1}}, {"scope": {"admin": True}}):
        token = hand_signed({"alg": "HS256"}, {**claims(), **weird}, TEST_JWT_SECRET.encode())
        response = client(auth_server, token).get("/jobs/")
        assert response.status_code in (401, 403), (weird, response.text)


def test_wrong_issuer_or_audience_is_refused(serve: Callable[..., LiveServer]) -> None:
    server = serve(jwt_issuer="https://idp.example", jwt_audience="jobservice")
    good = {"iss": "https://idp.example", "aud": "jobservice"}
    assert as_user(server, "alice", **good).get("/jobs/").status_code == 200
    assert as_user(server, "alice", iss="https://idp.example", aud=["other", "jobservice"]).get("/jobs/").status_code == 200
    error = assert_unauthorized(as_user(server, "alice", iss="https://evil.example", aud="jobservice").get("/jobs/"))
    assert "issuer" in error["message"]
    error = assert_unauthorized(as_user(server, "alice", iss="https://idp.example", aud="someone-else").get("/jobs/"))
    assert "audience" in error["message"]
    assert_unauthorized(as_user(server, "alice", aud="jobservice").get("/jobs/"))  # no iss
    assert_unauthorized(as_user(server, "alice", iss="https://idp.example").get("/jobs/"))  # no aud


def test_leeway_tolerates_small_clock_skew(serve: Callable[..., LiveServer]) -> None:
    server = serve(jwt_leeway_seconds=30)
    now = int(time.time())
    assert as_user(server, "alice", exp=now - 10).get("/jobs/").status_code == 200
    assert_unauthorized(as_user(server, "alice", exp=now - 60).get("/jobs/"))


# --- asymmetric keys --------------------------------------------------------------------------


def test_rs256_with_a_configured_public_key(
    serve: Callable[..., LiveServer], rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    server = serve(jwt_public_key=pem(rsa_key.public_key()), jwt_algorithms=("RS256",), jwt_secret_key=None)
    alice = client(server, make_token("alice", RW, key=rsa_key, algorithm="RS256"))
    created = alice.submit()
    assert alice.get(f"/jobs/{created['id']}").status_code == 200
    assert_unauthorized(client(server, make_token("alice", RW, key=other_rsa_key, algorithm="RS256")).get("/jobs/"))
    # Signed with the right key but an algorithm not on the list.
    assert_unauthorized(client(server, make_token("alice", RW, key=rsa_key, algorithm="RS512")).get("/jobs/"))
    assert_unauthorized(client(server, make_token("alice", RW, key=rsa_key, algorithm="PS256")).get("/jobs/"))


def test_public_key_given_with_escaped_newlines(serve: Callable[..., LiveServer], rsa_key: rsa.RSAPrivateKey) -> None:
    one_line = pem(rsa_key.public_key()).replace("\n", "\\n")
    server = serve(jwt_public_key=one_line, jwt_algorithms=("RS256",), jwt_secret_key=None)
    assert client(server, make_token("alice", RW, key=rsa_key, algorithm="RS256")).get("/jobs/").status_code == 200


@pytest.mark.parametrize("also_hs256", [False, True])
def test_hmac_token_signed_with_the_public_key_is_refused(
    serve: Callable[..., LiveServer], rsa_key: rsa.RSAPrivateKey, also_hs256: bool
) -> None:
    """The classic key confusion: HS256 'signed' with the RS public key text, which an attacker knows."""
    public_pem = pem(rsa_key.public_key())
    server = serve(
        jwt_public_key=public_pem,
        jwt_algorithms=("RS256", "HS256") if also_hs256 else ("RS256",),
        jwt_secret_key=TEST_JWT_SECRET if also_hs256 else None,
    )
    for key_text in (public_pem, public_pem.strip()):
        forged = hand_signed({"alg": "HS256", "typ": "JWT"}, claims(scope="admin"), key_text.encode())
        assert_unauthorized(client(server, forged).get("/jobs/"))
    if also_hs256:
        assert as_user(server, "alice").get("/jobs/").status_code == 200


def test_es256_with_a_configured_public_key(
    serve: Callable[..., LiveServer], ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    server = serve(jwt_public_key=pem(ec_key.public_key()), jwt_algorithms=("ES256",), jwt_secret_key=None)
    alice = client(server, make_token("alice", RW, key=ec_key, algorithm="ES256"))
    assert alice.submit()["status"] == "pending"
    other = ec.generate_private_key(ec.SECP256R1())
    assert_unauthorized(client(server, make_token("alice", RW, key=other, algorithm="ES256")).get("/jobs/"))
    assert_unauthorized(client(server, make_token("alice", RW, key=rsa_key, algorithm="RS256")).get("/jobs/"))


class JwksServer:
    """A JWKS document served over HTTP from a thread, replaceable while running; counts fetches."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, *keys: dict[str, Any]) -> None:
        self.document = {"keys": list(keys)}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def jwk(public_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
    return {**algorithm.to_jwk(public_key, as_dict=True), "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


def test_jwks_keys_are_cached_and_rotation_by_kid_works(
    serve: Callable[..., LiveServer], jwks: JwksServer, rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks.publish(jwk(rsa_key.public_key(), "k1", "RS256"))
    server = serve(jwt_jwks_url=jwks.url, jwt_algorithms=("RS256", "ES256"), jwt_secret_key=None, jwks_cache_seconds=300)

    def token(key: Any, kid: str, alg: str = "RS256", sub: str = "alice") -> str:
        return make_token(sub, RW, key=key, algorithm=alg, headers={"kid": kid})

    assert client(server, token(rsa_key, "k1")).get("/jobs/").status_code == 200
    assert client(server, token(rsa_key, "k1")).get("/jobs/").status_code == 200
    assert jwks.fetches == 1, "the key set is cached, not fetched per request"

    # The identity provider rotates: a new kid appears after the service cached the old document.
    jwks.publish(jwk(rsa_key.public_key(), "k1", "RS256"), jwk(other_rsa_key.public_key(), "k2", "RS256"),
                 jwk(ec_key.public_key(), "k3", "ES256"))
    assert client(server, token(other_rsa_key, "k2")).get("/jobs/").status_code == 200
    assert jwks.fetches == 2, "an unknown kid refetches the key set once"
    assert client(server, token(rsa_key, "k1")).get("/jobs/").status_code == 200
    assert client(server, token(ec_key, "k3", "ES256")).get("/jobs/").status_code == 200
    assert jwks.fetches == 2

    # Forged kids cannot make the service hammer the identity provider.
    for _ in range(3):
        assert_unauthorized(client(server, token(rsa_key, "k-unknown")).get("/jobs/"))
    assert jwks.fetches == 2
    # A kid that names another key than the one that signed, a key used for the wrong algorithm, no kid.
    assert_unauthorized(client(server, token(rsa_key, "k2")).get("/jobs/"))
    assert_unauthorized(client(server, token(rsa_key, "k1", "RS384")).get("/jobs/"))
    assert_unauthorized(client(server, make_token("alice", RW, key=rsa_key, algorithm="RS256")).get("/jobs/"))
    forged = hand_signed({"alg": "HS256", "kid": "k1"}, claims(scope="admin"), pem(rsa_key.public_key()).encode())
    assert_unauthorized(client(server, forged).get("/jobs/"))


def test_jwks_outage_after_a_fetch_keeps_the_known_keys(
    serve: Callable[..., LiveServer], jwks: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks.publish(jwk(rsa_key.public_key(), "k1", "RS256"))
    server = serve(jwt_jwks_url=jwks.url, jwt_algorithms=("RS256",), jwt_secret_key=None, jwks_cache_seconds=1)
    alice = client(server, make_token("alice", RW, key=rsa_key, algorithm="RS256", headers={"kid": "k1"}))
    assert alice.get("/jobs/").status_code == 200
    jwks.stop()
    time.sleep(1.2)  # past the cache lifespan: the refetch fails
    assert alice.get("/jobs/").status_code == 200
    assert alice.get("/jobs/").status_code == 200


def test_jwks_endpoint_down_is_503_not_500(serve: Callable[..., LiveServer], rsa_key: rsa.RSAPrivateKey) -> None:
    server = serve(
        jwt_jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json", jwt_algorithms=("RS256",), jwt_secret_key=None
    )
    token = make_token("alice", RW, key=rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert_error(client(server, token).get("/jobs/"), 503, "SERVICE_UNAVAILABLE")


# --- configuration that cannot work is refused at start ---------------------------------------


@pytest.mark.parametrize(
    "overrides, complaint",
    [
        ({"jwt_algorithms": ("none",)}, "none"),
        ({"jwt_algorithms": ()}, "JWT_ALGORITHMS"),
        ({"jwt_algorithms": ("HS256",), "jwt_secret_key": None}, "JWT_SECRET_KEY"),
        ({"jwt_algorithms": ("RS256",)}, "JWT_PUBLIC_KEY"),
        ({"jwt_algorithms": ("RS256",), "jwt_public_key": "not a key"}, "PEM"),
    ],
)
def test_unusable_key_configuration_fails_at_start(settings: Settings, overrides: dict[str, Any], complaint: str) -> None:
    with pytest.raises(RuntimeError, match=complaint):
        create_app(settings.with_overrides(auth_enabled=True, **overrides))


# --- scopes -----------------------------------------------------------------------------------


def test_read_only_caller_cannot_submit_or_cancel(auth_server: LiveServer) -> None:
    job = as_user(auth_server, "alice", RW).submit()
    reader = as_user(auth_server, "alice", READ)
    error = assert_error(reader.post("/jobs/", json={"job_type": "x", "image": "busybox:1"}), 403, "FORBIDDEN")
    assert WRITE in error["message"]
    assert_error(reader.delete(f"/jobs/{job['id']}"), 403, "FORBIDDEN")
    assert reader.get("/jobs/").json()["total"] == 1
    assert reader.get(f"/jobs/{job['id']}").status_code == 200


def test_write_only_caller_cannot_read(auth_server: LiveServer) -> None:
    writer = as_user(auth_server, "alice", WRITE)
    job = writer.submit()
    error = assert_error(writer.get("/jobs/"), 403, "FORBIDDEN")
    assert READ in error["message"]
    assert_error(writer.get(f"/jobs/{job['id']}"), 403, "FORBIDDEN")
    assert_error(writer.get(f"/jobs/{job['id']}/logs"), 403, "FORBIDDEN")
    assert writer.delete(f"/jobs/{job['id']}").status_code == 200


def test_a_token_without_scopes_reaches_no_job(auth_server: LiveServer) -> None:
    nobody = as_user(auth_server, "alice", None)
    assert_error(nobody.get("/jobs/"), 403, "FORBIDDEN")
    assert_error(nobody.post("/jobs/", json={"job_type": "x", "image": "busybox:1"}), 403, "FORBIDDEN")
    unknown = as_user(auth_server, "alice", "jobs:* root superuser")
    assert_error(unknown.get("/jobs/"), 403, "FORBIDDEN")


def test_scope_claim_as_a_list(auth_server: LiveServer) -> None:
    alice = as_user(auth_server, "alice", [READ, WRITE])
    alice.submit()
    assert alice.get("/jobs/").json()["total"] == 1


@pytest.mark.parametrize("claim", ["scp", "roles"])
def test_scope_claim_name_is_configurable(serve: Callable[..., LiveServer], claim: str) -> None:
    server = serve(jwt_scope_claim=claim)
    reader = client(server, make_token("alice", None, **{claim: [READ]}))
    assert reader.get("/jobs/").status_code == 200
    assert_error(reader.post("/jobs/", json={"job_type": "x", "image": "busybox:1"}), 403, "FORBIDDEN")
    writer = client(server, make_token("alice", None, **{claim: f"{READ} {WRITE}"}))
    writer.submit()
    # The default claim no longer counts.
    assert_error(client(server, make_token("alice", RW)).get("/jobs/"), 403, "FORBIDDEN")
    admin = client(server, make_token("root", None, **{claim: ["admin"]}))
    assert admin.get("/jobs/").json()["total"] == 1


# --- owners -----------------------------------------------------------------------------------


def logs_endpoint_exists(server: LiveServer) -> bool:
    return any(rule.rule == "/api/v1/jobs/<string:job_id>/logs" for rule in server.app.url_map.iter_rules())


def test_callers_see_only_their_own_jobs_on_every_endpoint(auth_server: LiveServer) -> None:
    alice, bob = as_user(auth_server, "alice"), as_user(auth_server, "bob")
    a = alice.submit(job_type="training")
    b = bob.submit(job_type="training")

    assert [j["id"] for j in alice.get("/jobs/").json()["items"]] == [a["id"]]
    assert [j["id"] for j in bob.get("/jobs/").json()["items"]] == [b["id"]]
    assert bob.get("/jobs/", params={"job_type": "training"}).json()["total"] == 1
    assert_error(bob.get(f"/jobs/{a['id']}"), 404, "NOT_FOUND")
    assert_error(bob.delete(f"/jobs/{a['id']}"), 404, "NOT_FOUND")
    # Someone else's job and a job that does not exist are indistinguishable.
    assert bob.get(f"/jobs/{a['id']}").json()["error"]["message"].replace(a["id"], "X") == \
        bob.get("/jobs/job-ffffffffffff").json()["error"]["message"].replace("job-ffffffffffff", "X")
    assert alice.get(f"/jobs/{a['id']}").json()["status"] == "pending", "bob's cancel did nothing"


def test_logs_of_another_callers_job_are_not_found(auth_server: LiveServer) -> None:
    if not logs_endpoint_exists(auth_server):
        pytest.skip("GET /api/v1/jobs/{id}/logs is not built yet (another engineer's endpoint)")
    alice, bob = as_user(auth_server, "alice"), as_user(auth_server, "bob")
    a = alice.submit()
    assert alice.get(f"/jobs/{a['id']}/logs").status_code == 200
    assert_error(bob.get(f"/jobs/{a['id']}/logs"), 404, "NOT_FOUND")


def test_admin_sees_and_cancels_everyones_jobs(auth_server: LiveServer) -> None:
    a = as_user(auth_server, "alice").submit()
    b = as_user(auth_server, "bob").submit()
    admin = as_user(auth_server, "ops", "admin")
    assert {j["id"] for j in admin.get("/jobs/").json()["items"]} == {a["id"], b["id"]}
    assert admin.get(f"/jobs/{a['id']}").status_code == 200
    if logs_endpoint_exists(auth_server):
        assert admin.get(f"/jobs/{b['id']}/logs").status_code == 200
    assert admin.delete(f"/jobs/{b['id']}").json()["status"] == "cancelled"
    assert as_user(auth_server, "bob").get(f"/jobs/{b['id']}").json()["status"] == "cancelled"
    # admin alone implies the job scopes.
    assert admin.submit()["status"] == "pending"


def test_jobs_belong_to_the_token_subject(auth_server: LiveServer, database: Database) -> None:
    created = as_user(auth_server, "carol@example.com").submit()
    with database.session() as s:
        assert s.get(Job, created["id"]).owner == "carol@example.com"


def test_filter_values_reach_sql_only_as_parameters(auth_server: LiveServer, database: Database) -> None:
    alice, bob = as_user(auth_server, "alice"), as_user(auth_server, "bob")
    alice.submit(job_type="inference")
    bob.submit(job_type="inference")
    for value in (
        "' OR '1'='1",
        "inference' OR owner <> 'bob",
        "x'; DROP TABLE jobs; --",
        "inference\" OR 1=1 --",
        "%",
        "inference' UNION SELECT id FROM jobs --",
    ):
        listing = bob.get("/jobs/", params={"job_type": value})
        assert listing.status_code == 200, listing.text
        assert listing.json()["total"] == 0, value
    assert bob.get("/jobs/", params={"job_type": "inference"}).json()["total"] == 1
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2


# --- the tokens command -----------------------------------------------------------------------


def test_tokens_command_mints_a_token_the_service_accepts(auth_server: LiveServer) -> None:
    runner = auth_server.app.test_cli_runner()
    result = runner.invoke(args=["tokens", "create", "alice", "--scope", "jobs:read jobs:write", "--expires-in", "120"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    decoded = jwt.decode(token, TEST_JWT_SECRET, algorithms=["HS256"])
    assert decoded["sub"] == "alice" and decoded["scope"] == "jobs:read jobs:write"
    assert decoded["exp"] - decoded["iat"] == 120
    alice = client(auth_server, token)
    created = alice.submit()
    assert alice.get(f"/jobs/{created['id']}").status_code == 200

    result = runner.invoke(args=["tokens", "create", "bob", "--scope", "jobs:read"])
    assert result.exit_code == 0, result.output
    bob = client(auth_server, result.stdout.strip())
    assert bob.get("/jobs/").json()["total"] == 0
    assert_error(bob.post("/jobs/", json={"job_type": "x", "image": "busybox:1"}), 403, "FORBIDDEN")
    default_expiry = jwt.decode(result.stdout.strip(), TEST_JWT_SECRET, algorithms=["HS256"])
    assert default_expiry["exp"] - default_expiry["iat"] == 24 * 3600


def test_tokens_command_refuses_what_it_cannot_sign(settings: Settings, rsa_key: rsa.RSAPrivateKey) -> None:
    only_public = create_app(settings.with_overrides(
        auth_enabled=True, jwt_secret_key=None, jwt_public_key=pem(rsa_key.public_key()), jwt_algorithms=("RS256",)
    ))
    result = only_public.test_cli_runner().invoke(args=["tokens", "create", "alice"])
    assert result.exit_code != 0
    assert "JWT_SECRET_KEY" in result.output and "JWT_PUBLIC_KEY" in result.output

    app = create_app(settings.with_overrides(auth_enabled=True))
    result = app.test_cli_runner().invoke(args=["tokens", "create", "alice", "--scope", "jobs:delete"])
    assert result.exit_code != 0 and "jobs:delete" in result.output
    result = app.test_cli_runner().invoke(args=["tokens", "create", "alice", "--expires-in", "0"])
    assert result.exit_code != 0


def test_tokens_command_carries_issuer_and_audience(serve: Callable[..., LiveServer]) -> None:
    server = serve(jwt_issuer="https://idp.example", jwt_audience="jobservice", jwt_scope_claim="scp")
    result = server.app.test_cli_runner().invoke(args=["tokens", "create", "alice", "--scope", "jobs:read,jobs:write"])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert jwt.decode(token, options={"verify_signature": False})["scp"] == [READ, WRITE]
    assert client(server, token).submit()["status"] == "pending"


def test_flask_tokens_create_from_the_shell(auth_server: LiveServer, service_env: dict[str, str]) -> None:
    env = {**os.environ, **service_env, "AUTH_ENABLED": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "tokens", "create", "dave", "--scope", "jobs:read"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2, result.stdout
    dave = client(auth_server, token)
    assert dave.get("/jobs/").status_code == 200
    assert_error(dave.post("/jobs/", json={"job_type": "x", "image": "busybox:1"}), 403, "FORBIDDEN")
