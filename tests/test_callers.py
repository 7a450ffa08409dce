"""Who the caller is: the tenant claim is taken only as a plain short string."""
from __future__ import annotations

import pytest

from app.domain.callers import Caller, with_tenant

ALICE = Caller("alice", frozenset({"jobs:read"}))


@pytest.mark.parametrize("value", ["team\x00a", "team\na", "team\x7f", "team\ud800", "", "   ", "t" * 201, 7, ["team"]])
def test_a_tenant_claim_that_is_not_plain_text_is_ignored(value: object) -> None:
    assert with_tenant(ALICE, {"tenant": value}, "tenant").tenant is None


def test_a_plain_tenant_claim_names_the_tenant() -> None:
    assert with_tenant(ALICE, {"tenant": " team-a "}, "tenant").tenant == "team-a"
    assert with_tenant(ALICE, {"tenant": "team-a"}, None).tenant is None
