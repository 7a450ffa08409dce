"""Authentication: every request but the probes and the API document carries a valid bearer JWT.

The verified token becomes `g.caller` (a `Caller`), which `app.api.identity` hands to the views; the
rate limiter registered after this module keys its counters on that caller's `sub`.

Keys come from configuration only: an HS shared secret (JWT_SECRET_KEY), a PEM public key
(JWT_PUBLIC_KEY) or a JWKS URL (JWT_JWKS_URL). The accepted algorithms are exactly JWT_ALGORITHMS.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

import click
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import Flask, current_app, g, request
from flask.cli import AppGroup
from flask.wrappers import Response
from flask_jwt_extended import JWTManager, get_jwt, verify_jwt_in_request
from flask_jwt_extended.exceptions import InvalidHeaderError, JWTExtendedException, NoAuthorizationError
from jwt.algorithms import get_default_algorithms
from jwt.api_jwk import PyJWK, PyJWKSet

from app.api.errors import envelope
from app.domain.callers import SCOPE_ADMIN, SCOPE_READ, SCOPE_WRITE, Caller, with_tenant
from config import Settings

log = logging.getLogger(__name__)

KNOWN_SCOPES = (SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN)
# Rules (not paths) so that an unrouted path such as /health/../jobs/ never counts as public.
_PROBE_PREFIXES = ("/api/v1/health/", "/health/")
# /metrics: Prometheus scrapers carry no JWT; it shows only aggregate numbers (app.api.prometheus).
_PUBLIC_RULES = frozenset({"/api/v1/openapi.json", "/api/v1/docs", "/api/v1/docs/assets/<path:filename>", "/metrics"})
# A token naming an unknown `kid` forces a JWKS refetch so that rotated keys work at once; this
# bounds how often forged kids can make us hit the identity provider.
JWKS_FORCED_REFETCH_INTERVAL_SECONDS = 5.0
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
MAX_SUB_LENGTH = 256
_BEARER = "bearer"
_KEY_TYPES_BY_FAMILY: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


class KeysUnavailable(Exception):
    """The JWKS endpoint cannot be read and nothing was cached: our outage, not the caller's fault."""


def is_health_probe() -> bool:
    rule = request.url_rule
    return rule is not None and rule.rule.startswith(_PROBE_PREFIXES)


def is_public() -> bool:
    rule = request.url_rule
    return is_health_probe() or (rule is not None and rule.rule in _PUBLIC_RULES)


# --- keys -------------------------------------------------------------------------------------


class JwksKeys:
    """Signing keys from a JWKS endpoint, cached for `cache_seconds`, refetched on an unknown kid.

    PyJWKClient does the fetching and caching. Its own unknown-kid cooldown counts from every
    fetch, including the first, so a key rotated in just after we cached the set would be refused
    for the whole cooldown; this class throttles only the forced refetches instead, and keeps
    serving the last good set when the endpoint is briefly down.
    """

    def __init__(self, url: str, cache_seconds: int) -> None:
        self._client = jwt.PyJWKClient(
            url,
            cache_jwk_set=cache_seconds > 0,
            lifespan=max(cache_seconds, 1),
            timeout=JWKS_FETCH_TIMEOUT_SECONDS,
            cooldown_duration=0,
        )
        self._lock = threading.Lock()
        self._last_forced = -math.inf
        self._last_good: PyJWKSet | None = None

    def key_for(self, kid: Any, algorithm: str) -> Any:
        if not isinstance(kid, str) or not kid:
            raise jwt.InvalidTokenError("Token header has no 'kid' to select a JWKS key")
        key = self._find(self._key_set(refresh=False), kid)
        if key is None and self._may_force_refetch():
            key = self._find(self._key_set(refresh=True), kid)
        if key is None:
            raise jwt.InvalidTokenError(f"No JWKS key has kid {kid!r}")
        # PyJWK infers "RS256" for an RSA key without "alg"; only an explicit "alg" pins the algorithm.
        declared = getattr(key, "_jwk_data", {}).get("alg")
        if declared is not None and declared != algorithm:
            raise jwt.InvalidAlgorithmError(f"JWKS key {kid!r} is for {declared}, not {algorithm}")
        return key.key

    def _may_force_refetch(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._last_forced < JWKS_FORCED_REFETCH_INTERVAL_SECONDS:
                return False
            self._last_forced = now
            return True

    def _key_set(self, refresh: bool) -> PyJWKSet:
        try:
            key_set = self._client.get_jwk_set(refresh=refresh)
        except (jwt.PyJWTError, ValueError) as exc:  # ValueError: the endpoint answered non-JSON
            if self._last_good is None:
                log.error("cannot read the JWKS at %s: %s", self._client.uri, exc)
                raise KeysUnavailable(str(exc)) from exc
            log.warning("JWKS refresh from %s failed, using the keys fetched earlier: %s", self._client.uri, exc)
            if self._client.jwk_set_cache is not None:
                # Re-arm the cache so that an outage costs one failed fetch per lifespan, not one per request.
                self._client.jwk_set_cache.put(self._last_good)
            return self._last_good
        self._last_good = key_set
        return key_set

    @staticmethod
    def _find(key_set: PyJWKSet, kid: str) -> PyJWK | None:
        return next((k for k in key_set.keys if k.key_id == kid and k.public_key_use in ("sig", None)), None)


class Verifier:
    """Chooses the verification key for a token from its (unverified) header.

    The key follows the algorithm *family*, never the header's say-so alone: HS tokens get the shared
    secret and nothing else, so a public key can never be used as an HMAC secret.
    """

    def __init__(self, settings: Settings) -> None:
        self.algorithms = tuple(settings.jwt_algorithms)
        self.secret = settings.jwt_secret_key
        self.public_key = _load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
        self.jwks = JwksKeys(settings.jwt_jwks_url, settings.jwks_cache_seconds) if settings.jwt_jwks_url else None

    def key_for(self, header: dict[str, Any], _claims: dict[str, Any]) -> Any:
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise jwt.InvalidAlgorithmError("The specified alg value is not allowed")
        if algorithm.startswith("HS"):
            if not self.secret:
                raise jwt.InvalidAlgorithmError(f"No shared secret is configured for {algorithm}")
            return self.secret
        if self.jwks is not None:
            key = self.jwks.key_for(header.get("kid"), algorithm)
        elif self.public_key is not None:
            key = self.public_key
        else:
            raise jwt.InvalidAlgorithmError(f"No public key is configured for {algorithm}")
        if not isinstance(key, _KEY_TYPES_BY_FAMILY.get(algorithm[:2], ())):
            raise jwt.InvalidAlgorithmError(f"The configured key cannot verify {algorithm}")
        return key


def _load_public_key(pem: str) -> Any:
    # Environment variables often carry PEM text with literal "\n" sequences instead of newlines.
    if "\n" not in pem and "\\n" in pem:
        pem = pem.replace("\\n", "\n")
    try:
        return load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise RuntimeError(f"JWT_PUBLIC_KEY is not a PEM public key: {exc}") from exc


def check_configuration(settings: Settings) -> None:
    """Refuse to start with an algorithm list that the configured keys cannot honour."""
    if not settings.jwt_algorithms:
        raise RuntimeError("JWT_ALGORITHMS is empty: list the algorithms your tokens are signed with, e.g. HS256")
    supported = set(get_default_algorithms()) - {"none"}
    for algorithm in settings.jwt_algorithms:
        if algorithm not in supported:
            raise RuntimeError(f"JWT_ALGORITHMS lists {algorithm!r}; accepted values are {', '.join(sorted(supported))}")
        if algorithm.startswith("HS") and not settings.jwt_secret_key:
            raise RuntimeError(f"JWT_ALGORITHMS lists {algorithm} but JWT_SECRET_KEY is not set")
        if not algorithm.startswith("HS") and not (settings.jwt_public_key or settings.jwt_jwks_url):
            raise RuntimeError(f"JWT_ALGORITHMS lists {algorithm} but neither JWT_PUBLIC_KEY nor JWT_JWKS_URL is set")
    if (settings.jwt_public_key or settings.jwt_jwks_url) and all(a.startswith("HS") for a in settings.jwt_algorithms):
        log.warning("JWT_PUBLIC_KEY/JWT_JWKS_URL is set but JWT_ALGORITHMS=%s: tokens signed with it will be refused",
                    ",".join(settings.jwt_algorithms))


# --- claims -----------------------------------------------------------------------------------


def scopes_from_claim(value: Any) -> frozenset[str]:
    """OAuth2 `scope` is one space-separated string; `scp`/`roles` are usually lists: take either."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, (list, tuple)):
        return frozenset(item for item in value if isinstance(item, str) and item)
    return frozenset()


def _has_control_characters(value: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in value)


def caller_from_claims(claims: dict[str, Any], scope_claim: str, max_lifetime_seconds: float | None = None) -> Caller:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip():
        raise jwt.InvalidTokenError("Token has no 'sub' claim")
    # `sub` becomes the owner of every job the caller submits (a text column) and a rate-limit key.
    if len(sub) > MAX_SUB_LENGTH or _has_control_characters(sub):
        raise jwt.InvalidTokenError(f"Token 'sub' must be at most {MAX_SUB_LENGTH} characters without control characters")
    if "exp" not in claims:
        # A token that never expires cannot be withdrawn short of rotating the key.
        raise jwt.MissingRequiredClaimError("exp")
    exp = claims["exp"]
    # PyJWT takes int(exp), so 1e308 would pass as a token valid for ever.
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp) or exp != int(exp):
        raise jwt.InvalidTokenError("Token 'exp' must be an integer number of seconds")
    if max_lifetime_seconds is not None and exp > time.time() + max_lifetime_seconds:
        raise jwt.InvalidTokenError(f"Token 'exp' lies more than {int(max_lifetime_seconds)} seconds ahead")
    return Caller(sub, scopes_from_claim(claims.get(scope_claim)))


# --- responses --------------------------------------------------------------------------------

_HOW_TO_SEND = "send 'Authorization: Bearer <token>'"


def unauthorized(message: str, error: str | None = "invalid_token") -> Response:
    response = envelope(401, message)
    challenge = 'Bearer realm="jobservice"'
    if error:
        challenge += f', error="{error}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


def _message_for(exc: Exception) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "Token has expired"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "Token is not yet valid"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "Token issuer is not accepted"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "Token audience is not accepted"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"Token is missing the '{exc.claim}' claim"
    if isinstance(exc, (jwt.InvalidAlgorithmError, jwt.InvalidKeyError)):
        return "Token algorithm or key is not accepted"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "Token signature is invalid"
    if isinstance(exc, jwt.DecodeError):
        return "Token is malformed"
    if isinstance(exc, jwt.InvalidTokenError) and str(exc):
        return f"Invalid token: {exc}"
    return "Invalid token"


def authenticate() -> Response | None:
    """before_request: set g.caller from the bearer token, or answer 401 (503 if keys are unreachable)."""
    if is_public():
        return None
    _normalize_scheme()
    settings: Settings = current_app.config["JOBSERVICE_SETTINGS"]
    try:
        if verify_jwt_in_request(verify_type=False) is None:
            return None  # OPTIONS (CORS preflight) carries no token; views still demand a caller
        g.caller = with_tenant(
            caller_from_claims(
                get_jwt(), settings.jwt_scope_claim, settings.jwt_max_token_lifetime_seconds + settings.jwt_leeway_seconds
            ),
            get_jwt(),
            settings.jwt_tenant_claim,
        )
    except NoAuthorizationError:
        return unauthorized(f"Missing bearer token: {_HOW_TO_SEND}", error=None)
    except InvalidHeaderError:
        return unauthorized(f"Malformed Authorization header: {_HOW_TO_SEND}", error="invalid_request")
    except KeysUnavailable:
        return envelope(503, "Cannot verify tokens now: the identity provider's keys are unavailable")
    except (jwt.PyJWTError, JWTExtendedException) as exc:
        return unauthorized(_message_for(exc))
    except Exception:  # noqa: BLE001 - whatever a hostile token trips over, it is refused, never a 500
        log.warning("token refused by an unexpected error", exc_info=True, extra={"request_id": g.get("request_id")})
        return unauthorized("Invalid token")
    return None


def _normalize_scheme() -> None:
    """RFC 7235: the scheme is case-insensitive; flask-jwt-extended compares it to "Bearer" exactly."""
    value = request.environ.get("HTTP_AUTHORIZATION")
    if not value:
        return
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() == _BEARER and scheme != "Bearer":
        request.environ["HTTP_AUTHORIZATION"] = f"Bearer {token.strip()}"


def _route_library_errors_to_envelope(manager: JWTManager) -> None:
    # flask-jwt-extended also answers its exceptions itself ({"msg": ...}, sometimes 422) if one
    # escapes a view; keep those in the envelope too.
    manager.unauthorized_loader(lambda message: unauthorized(message, error=None))
    manager.invalid_token_loader(lambda message: unauthorized(f"Invalid token: {message}"))
    manager.expired_token_loader(lambda _header, _claims: unauthorized("Token has expired"))
    for loader in (
        manager.needs_fresh_token_loader,
        manager.revoked_token_loader,
        manager.token_verification_failed_loader,
        manager.user_lookup_error_loader,
    ):
        loader(lambda _header, _claims: unauthorized("Invalid token"))


# --- development tokens -----------------------------------------------------------------------

tokens_cli = AppGroup("tokens", help="Development tokens signed with JWT_SECRET_KEY.")


def parse_scopes(values: Iterable[str]) -> list[str]:
    scopes: list[str] = []
    for value in values:
        for scope in value.replace(",", " ").split():
            if scope not in scopes:
                scopes.append(scope)
    return scopes


def mint_token(settings: Settings, sub: str, scopes: list[str], expires_in: int) -> str:
    if not settings.jwt_secret_key:
        where = "JWT_PUBLIC_KEY" if settings.jwt_public_key else "JWT_JWKS_URL" if settings.jwt_jwks_url else None
        raise click.ClickException(
            "tokens create signs with JWT_SECRET_KEY (HS256), which is not set"
            + (f"; this service verifies with {where}, so get tokens from your identity provider" if where else "")
        )
    algorithm = next((a for a in settings.jwt_algorithms if a.startswith("HS")), None)
    if algorithm is None:
        raise click.ClickException(
            f"JWT_ALGORITHMS={','.join(settings.jwt_algorithms)} accepts no HS algorithm, so the service would refuse "
            "a token signed with JWT_SECRET_KEY; add HS256 or get tokens from your identity provider"
        )
    now = datetime.now(timezone.utc)
    claim = settings.jwt_scope_claim
    claims: dict[str, Any] = {
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + timedelta(seconds=expires_in),
        "jti": uuid.uuid4().hex,
        # OAuth2's `scope` is a space-separated string; other claim names (scp, roles) are lists.
        claim: " ".join(scopes) if claim == "scope" else scopes,
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, settings.jwt_secret_key, algorithm=algorithm)


@tokens_cli.command("create")
@click.argument("sub")
@click.option(
    "--scope",
    "scope_values",
    multiple=True,
    default=("jobs:read jobs:write",),
    show_default=True,
    help=f"Space- or comma-separated permissions ({', '.join(KNOWN_SCOPES)}); may be repeated.",
)
@click.option("--expires-in", type=click.IntRange(min=1), default=24 * 3600, show_default=True, help="Lifetime in seconds.")
def create_token(sub: str, scope_values: tuple[str, ...], expires_in: int) -> None:
    """Print a token for SUB (the caller's user id)."""
    if not sub.strip():
        raise click.BadParameter("must not be empty", param_hint="SUB")
    scopes = parse_scopes(scope_values)
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; use {', '.join(KNOWN_SCOPES)}", param_hint="--scope")
    click.echo(mint_token(current_app.config["JOBSERVICE_SETTINGS"], sub, scopes, expires_in))


# --- wiring -----------------------------------------------------------------------------------


def register(app: Flask) -> None:
    """Register before the rate limiter: its key is the `sub` this hook establishes."""
    settings: Settings = app.config["JOBSERVICE_SETTINGS"]
    app.cli.add_command(tokens_cli)
    if not settings.auth_enabled:
        return  # g.caller stays unset and identity.current_caller answers LOCAL_ADMIN
    check_configuration(settings)
    verifier = Verifier(settings)
    app.config.update(
        {
            "JWT_TOKEN_LOCATION": ["headers"],
            # flask-jwt-extended appends JWT_ALGORITHM to the decode list (mutating it): keep it inside.
            "JWT_ALGORITHM": settings.jwt_algorithms[0],
            "JWT_DECODE_ALGORITHMS": list(settings.jwt_algorithms),
            "JWT_DECODE_ISSUER": settings.jwt_issuer,
            "JWT_DECODE_AUDIENCE": settings.jwt_audience,
            "JWT_DECODE_LEEWAY": settings.jwt_leeway_seconds,
            "JWT_IDENTITY_CLAIM": "sub",
        }
    )
    manager = JWTManager(app)
    manager.decode_key_loader(verifier.key_for)
    _route_library_errors_to_envelope(manager)
    app.before_request(authenticate)
