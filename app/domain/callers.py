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

    @property
    def is_admin(self) -> bool:
        return SCOPE_ADMIN in self.scopes

    def can(self, scope: str) -> bool:
        return self.is_admin or scope in self.scopes


# The caller when authentication is switched off (AUTH_ENABLED=false): a single-user installation.
LOCAL_ADMIN = Caller("local", frozenset({SCOPE_READ, SCOPE_WRITE, SCOPE_ADMIN}))
SYSTEM = "system"
