"""Who is calling: the identity every domain verb authorizes against."""
from __future__ import annotations

from dataclasses import dataclass, field

SCOPE_READ = "jobs:read"
SCOPE_WRITE = "jobs:write"
SCOPE_ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    sub: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    tenant: str | None = None  # JWT_TENANT_CLAIM: whom fair share counts the caller's jobs for (else `sub`)

    @property
    def fair_share_owner(self) -> str:
        return self.tenant or self.sub

    @property
    def is_admin(self) -> bool:
        return SCOPE_ADMIN in self.scopes

    def can(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes


MAX_TENANT_LENGTH = 200


def with_tenant(caller: Caller, claims: dict[str, object], claim: str | None) -> Caller:
    """The caller with its tenant from `claim`, when configured and present as a plain short string."""
    value = claims.get(claim) if claim else None
    if isinstance(value, str) and 0 < len(value.strip()) <= MAX_TENANT_LENGTH and _plain(value):
        return Caller(caller.sub, caller.scopes, value.strip())
    return caller


def _plain(text: str) -> bool:
    """No control characters and no lone surrogates: the tenant is stored, labelled in metrics and shown."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in text)


# The caller when authentication is switched off (AUTH_ENABLED=false): a single-user installation.
LOCAL_ADMIN = Caller("local", frozenset({SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN}))
SYSTEM = "system"
