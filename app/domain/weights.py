"""Fair-share weights per tenant: set by admins (the `fair_share_weights` table), else FAIR_SHARE_WEIGHTS, else 1.

A tenant is whom fair share counts a job for: the submitter's JWT_TENANT_CLAIM, else its `sub`. The policy
divides a tenant's share by its weight, so a tenant of weight 2 is entitled to twice the fleet of one of weight 1.
What an admin set wins over the setting, which stays the default of every tenant without a row (a DELETE
returns a tenant to it). Every change is audited in `fair_share_weight_changes` in the same transaction.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.db import transaction
from app.models import FairShareWeight, FairShareWeightChange

# Far apart enough for any policy (a ratio of a million), and the database CHECK says the same.
MIN_WEIGHT = 0.001
MAX_WEIGHT = 1000.0
DEFAULT_WEIGHT = 1.0
HISTORY = 20  # audit entries GET /fairness/weights/{tenant} returns
LOCK_SPACE = 7_311_021  # first key of the (int, int) advisory locks serializing one tenant's weight changes

ADMIN, SETTING, DEFAULT = "admin", "setting", "default"  # where a tenant's weight comes from


@dataclass(frozen=True)
class TenantWeight:
    tenant: str
    weight: float
    source: str  # ADMIN (the table), SETTING (FAIR_SHARE_WEIGHTS) or DEFAULT (1)
    updated_at: datetime | None = None
    updated_by: str | None = None


def stored(session: Session) -> dict[str, float]:
    """The weights admins set (the policy reads them in its pass's transaction)."""
    return dict(session.execute(select(FairShareWeight.tenant, FairShareWeight.weight)).tuples().all())


def effective(tenant: str, admin_set: Mapping[str, float], setting: Mapping[str, float]) -> tuple[float, str]:
    if tenant in admin_set:
        return admin_set[tenant], ADMIN
    if tenant in setting:
        return setting[tenant], SETTING
    return DEFAULT_WEIGHT, DEFAULT


def of_tenant(session: Session, tenant: str, setting: Mapping[str, float]) -> TenantWeight:
    row = session.get(FairShareWeight, tenant)
    if row is not None:
        return TenantWeight(tenant, row.weight, ADMIN, row.updated_at, row.updated_by)
    weight, source = effective(tenant, {}, setting)
    return TenantWeight(tenant, weight, source)


def listing(session: Session, setting: Mapping[str, float]) -> list[TenantWeight]:
    """Every tenant whose weight is not the default: set by an admin, or by FAIR_SHARE_WEIGHTS."""
    rows = {r.tenant: TenantWeight(r.tenant, r.weight, ADMIN, r.updated_at, r.updated_by)
            for r in session.scalars(select(FairShareWeight))}
    for tenant, weight in setting.items():
        rows.setdefault(tenant, TenantWeight(tenant, weight, SETTING))
    return [rows[t] for t in sorted(rows)]


def history(session: Session, tenant: str, limit: int = HISTORY) -> list[FairShareWeightChange]:
    return list(session.scalars(
        select(FairShareWeightChange).where(FairShareWeightChange.tenant == tenant).order_by(FairShareWeightChange.id.desc()).limit(limit)
    ))


def check(weight: float) -> float:
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:  # also False for NaN
        raise ValueError(f"weight must be between {MIN_WEIGHT:g} and {MAX_WEIGHT:g}")
    return float(weight)


def _locked(session: Session, tenant: str) -> FairShareWeight | None:
    """The tenant's row, with its changes serialized: a transaction lock on the tenant's name (a row lock cannot
    cover a row not yet there), so two concurrent first PUTs neither collide nor audit the same `before`."""
    session.execute(text("SELECT pg_advisory_xact_lock(:space, hashtext(:tenant))"), {"space": LOCK_SPACE, "tenant": tenant})
    return session.get(FairShareWeight, tenant, populate_existing=True)


def put(session: Session, tenant: str, weight: float, actor: str, now: datetime) -> None:
    """Set a tenant's weight and audit the change, in one transaction."""
    weight = check(weight)
    with transaction(session):
        row = _locked(session, tenant)
        before = row.weight if row is not None else None
        if row is None:
            row = FairShareWeight(tenant=tenant, weight=weight, updated_at=now, updated_by=actor)
            session.add(row)
        else:
            row.weight, row.updated_at, row.updated_by = weight, now, actor
        session.add(FairShareWeightChange(tenant=tenant, at=now, actor=actor, action="put", before=before, after=weight))


def remove(session: Session, tenant: str, actor: str, now: datetime) -> bool:
    """Remove what an admin set (the tenant is back to the setting's weight, or 1); False when nothing was set."""
    with transaction(session):
        row = _locked(session, tenant)
        if row is None:
            return False
        session.add(FairShareWeightChange(tenant=tenant, at=now, actor=actor, action="delete", before=row.weight, after=None))
        session.delete(row)
    return True
