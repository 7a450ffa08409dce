"""Quotas per tenant: a nominal amount of GPUs, CPU and memory per cluster (or fleet-wide, '*'), and a
borrowing limit beyond it.

A tenant is whom fair share counts a job for: the submitter's JWT_TENANT_CLAIM, else its `sub`
(COALESCE(jobs.tenant, jobs.owner)). No quota row: unlimited. A job is admitted only while its
tenant's usage plus the job stays within nominal + borrowing on the fleet-wide row and on the row of
the cluster it is placed on; beyond the nominal quota the tenant borrows capacity that is idle (the
job fits the free capacity now). Submit refuses a job that alone exceeds nominal + borrowing.

The rules (`Quota`, `Ledger`) are pure: the policy (app.domain.policy) applies them. The rest reads
and writes the `quotas` table, auditing every change in `quota_changes`.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db import transaction
from app.domain.errors import InvalidRequest
from app.domain.quantities import format_bytes, format_millis
from app.models import Job, Node, QuotaChange, QuotaRow

FLEET = "*"
RESOURCES = ("gpu", "cpu", "memory")
HISTORY = 20  # audit entries GET /quotas/{tenant} returns
log = logging.getLogger("jobservice.quotas")

Amounts = tuple[int, int, int]  # gpus, cpu millis, memory bytes


def _fmt(resource: int, amount: int | None) -> str:
    if amount is None:
        return "unlimited"
    return str(amount) if resource == 0 else format_millis(amount) if resource == 1 else format_bytes(amount)


@dataclass(frozen=True, slots=True)
class Quota:
    tenant: str
    cluster: str  # FLEET or a cluster name
    nominal: tuple[int | None, int | None, int | None]  # None: not limited
    borrowing: Amounts = (0, 0, 0)

    def limit(self, resource: int) -> int | None:
        nominal = self.nominal[resource]
        return None if nominal is None else nominal + self.borrowing[resource]


@dataclass(frozen=True, slots=True)
class Exceeded:
    """Why a job waits (or is refused): the resource, the quota and the tenant's usage."""

    tenant: str
    cluster: str
    resource: str
    quota: str
    borrowing_limit: str
    used: str
    requested: str

    @property
    def message(self) -> str:
        where = "fleet-wide" if self.cluster == FLEET else f"on cluster {self.cluster}"
        return (f"Tenant {self.tenant} would exceed its {self.resource} quota {where}: it uses {self.used} and the job "
                f"asks {self.requested}; quota {self.quota} + borrowing limit {self.borrowing_limit}")

    def as_dict(self) -> dict[str, str]:
        return {"tenant": self.tenant, "cluster": self.cluster, "resource": self.resource, "quota": self.quota,
                "borrowing_limit": self.borrowing_limit, "used": self.used, "requested": self.requested}


def exceeded(quota: Quota, used: Sequence[int], ask: Sequence[int]) -> Exceeded | None:
    for r in range(3):
        limit = quota.limit(r)
        if limit is not None and ask[r] > 0 and used[r] + ask[r] > limit:
            return Exceeded(quota.tenant, quota.cluster, RESOURCES[r], _fmt(r, quota.nominal[r]), _fmt(r, quota.borrowing[r]),
                            _fmt(r, used[r]), _fmt(r, ask[r]))
    return None


class Ledger:
    """Each tenant's usage per cluster and fleet-wide, against its quotas, as a pass admits jobs."""

    def __init__(self, quotas: Mapping[str, Sequence[Quota]], holding: Iterable[tuple[str, str, Amounts]]) -> None:
        self.quotas = {tenant: {q.cluster: q for q in rows} for tenant, rows in quotas.items() if rows}
        self.used: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        if not self.quotas:
            return  # no quota anywhere: what each tenant holds need not be added up (the scheduler's pass is hot)
        for tenant, cluster, amounts in holding:
            if tenant in self.quotas:
                self.charge(tenant, cluster, amounts)

    @property
    def active(self) -> bool:
        return bool(self.quotas)

    def check(self, tenant: str, cluster: str | None, ask: Amounts) -> Exceeded | None:
        """The first quota `ask` would exceed fleet-wide, or on `cluster` when one is given."""
        rows = self.quotas.get(tenant)
        if not rows:
            return None
        for scope in (FLEET, cluster):
            quota = rows.get(scope) if scope is not None else None
            if quota is not None:
                found = exceeded(quota, self.used[(tenant, scope)], ask)
                if found is not None:
                    return found
        return None

    def check_any(self, tenant: str, clusters: Sequence[str], ask: Amounts) -> Exceeded | None:
        """Blocked fleet-wide, or on every one of `clusters`: no placement could keep within the quotas."""
        first = self.check(tenant, None, ask)
        if first is not None or not clusters:
            return first
        blocks = [self.check(tenant, c, ask) for c in clusters]
        return blocks[0] if all(b is not None for b in blocks) else None

    def within_nominal(self, tenant: str, ask: Amounts) -> bool:
        """True when the tenant has quotas and stays within every nominal amount with `ask` added (no borrowing)."""
        rows = self.quotas.get(tenant)
        if not rows:
            return False
        return all(q.nominal[r] is None or self.used[(tenant, q.cluster)][r] + ask[r] <= q.nominal[r] for q in rows.values() for r in range(3))

    def borrowing(self, tenant: str) -> bool:
        """True when the tenant uses more than a nominal amount anywhere: what it holds beyond is reclaimable."""
        rows = self.quotas.get(tenant) or {}
        return any(q.nominal[r] is not None and self.used[(tenant, q.cluster)][r] > q.nominal[r] for q in rows.values() for r in range(3))

    def reclaimable(self, tenant: str, cluster: str, amounts: Amounts) -> bool:
        """Whether `amounts` (held on `cluster`) stand wholly on capacity the tenant borrows: giving them back leaves
        it at or above its nominal quota wherever it borrows. Reclaiming more would put the tenant under its quota,
        and it would reclaim the same capacity right back (a preemption loop)."""
        rows = self.quotas.get(tenant) or {}
        borrowing = False
        for scope in (FLEET, cluster):
            quota = rows.get(scope)
            if quota is None:
                continue
            used = self.used[(tenant, scope)]
            for r in range(3):
                if quota.nominal[r] is None or used[r] <= quota.nominal[r]:
                    continue
                borrowing = True
                if used[r] - amounts[r] < quota.nominal[r]:
                    return False
        return borrowing

    def charge(self, tenant: str, cluster: str, amounts: Amounts) -> None:
        if tenant not in self.quotas:
            return
        for scope in (FLEET, cluster):
            used = self.used[(tenant, scope)]
            for r in range(3):
                used[r] += amounts[r]


# --- persistence -----------------------------------------------------------------------------------


def _quota_of(row: QuotaRow) -> Quota:
    return Quota(row.tenant, row.cluster, (row.gpus, row.cpu_millis, row.memory_bytes),
                 (row.borrow_gpus, row.borrow_cpu_millis, row.borrow_memory_bytes))


def by_tenant(rows: Iterable[Sequence[Any]]) -> dict[str, list[Quota]]:
    """Quotas from (tenant, cluster, gpus, cpu_millis, memory_bytes, borrow_gpus, borrow_cpu_millis, borrow_memory_bytes)
    rows (the scheduler's one-statement read), per tenant in the rows' order."""
    grouped: dict[str, list[Quota]] = defaultdict(list)
    for tenant, cluster, *amounts in rows:
        grouped[tenant].append(Quota(tenant, cluster, tuple(amounts[:3]), tuple(amounts[3:])))
    return dict(grouped)


def as_json(quota: Quota) -> dict[str, Any]:
    """The API's (and the audit's) form: quantities as strings, as a job's resources."""
    nominal = quota.nominal
    return {
        "cluster": quota.cluster,
        "gpu": nominal[0],
        "cpu": None if nominal[1] is None else format_millis(nominal[1]),
        "memory": None if nominal[2] is None else format_bytes(nominal[2]),
        "borrowing_limit": {"gpu": quota.borrowing[0], "cpu": format_millis(quota.borrowing[1]),
                            "memory": format_bytes(quota.borrowing[2])},
    }


def load_all(session: Session) -> dict[str, list[Quota]]:
    quotas: dict[str, list[Quota]] = defaultdict(list)
    for row in session.scalars(select(QuotaRow).order_by(QuotaRow.tenant, QuotaRow.cluster)):
        quotas[row.tenant].append(_quota_of(row))
    return dict(quotas)


def of_tenant(session: Session, tenant: str) -> list[Quota]:
    return [_quota_of(r) for r in session.scalars(select(QuotaRow).where(QuotaRow.tenant == tenant).order_by(QuotaRow.cluster))]


def history(session: Session, tenant: str, limit: int = HISTORY) -> list[QuotaChange]:
    return list(session.scalars(select(QuotaChange).where(QuotaChange.tenant == tenant).order_by(QuotaChange.id.desc()).limit(limit)))


def tenants(session: Session) -> list[str]:
    return list(session.scalars(select(QuotaRow.tenant).distinct().order_by(QuotaRow.tenant)))


def replace(session: Session, tenant: str, quotas: Sequence[Quota], actor: str, now: datetime, action: str = "put") -> None:
    """Set a tenant's quotas (all its rows at once) and audit the change, in one transaction."""
    with transaction(session):
        _replace(session, tenant, quotas, actor, now, action)


def _replace(session: Session, tenant: str, quotas: Sequence[Quota], actor: str, now: datetime, action: str) -> None:
    # The tenant's rows are locked first, so two concurrent changes are audited in the order they apply.
    before = [as_json(_quota_of(r)) for r in session.scalars(
        select(QuotaRow).where(QuotaRow.tenant == tenant).order_by(QuotaRow.cluster).with_for_update())]
    session.execute(delete(QuotaRow).where(QuotaRow.tenant == tenant))
    for q in quotas:
        session.add(QuotaRow(
            tenant=tenant, cluster=q.cluster, gpus=q.nominal[0], cpu_millis=q.nominal[1], memory_bytes=q.nominal[2],
            borrow_gpus=q.borrowing[0], borrow_cpu_millis=q.borrowing[1], borrow_memory_bytes=q.borrowing[2],
            updated_at=now, updated_by=actor,
        ))
    after = [as_json(q) for q in sorted(quotas, key=lambda q: q.cluster)]
    session.add(QuotaChange(tenant=tenant, at=now, actor=actor, action=action, before=before, after=after))


def remove(session: Session, tenant: str, actor: str, now: datetime) -> bool:
    """Remove a tenant's quotas (unlimited again); False when it had none."""
    with transaction(session):
        had = session.scalar(select(func.count()).select_from(QuotaRow).where(QuotaRow.tenant == tenant))
        if not had:
            return False
        _replace(session, tenant, [], actor, now, "delete")
    return True


def seed(session: Session, path: str, parse: Any, now: datetime) -> list[str]:
    """Quotas from QUOTAS_FILE (JSON: {tenant: [entries as PUT takes them]}) for tenants that have none yet.

    Tenants already in the table keep theirs: what an admin set through the API wins over the file.
    `parse(tenant, entries)` validates as the API does and returns the Quota list (raises ValueError).
    """
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected an object of tenant -> list of quotas")
    parsed = {tenant: parse(tenant, entries) for tenant, entries in document.items()}
    seeded = []
    with transaction(session):
        present = set(session.scalars(select(QuotaRow.tenant).where(QuotaRow.tenant.in_(list(parsed)))))
        for tenant, quotas in parsed.items():
            if tenant not in present:
                _replace(session, tenant, quotas, "QUOTAS_FILE", now, "seed")
                seeded.append(tenant)
    return seeded


def holding(rows: Iterable[Any]) -> list[tuple[str, str, Amounts]]:
    """(tenant, cluster, amounts) of each job holding resources (capacity.load_nodes' holder rows)."""
    out = []
    for row in rows:
        members = sum(int(part["members"]) for part in row.placement or []) or 1
        out.append((row.owner, row.cluster or "", (row.gpus * members, row.cpu_millis * members, row.memory_bytes * members)))
    return out


def usage(session: Session, tenant: str | None = None) -> dict[tuple[str, str], list[int]]:
    """What each tenant (or one) holds now, per cluster and fleet-wide (FLEET)."""
    owner_of = func.coalesce(Job.tenant, Job.owner)
    query = select(owner_of.label("owner"), Job.cluster, Job.placement, Job.gpus, Job.cpu_millis, Job.memory_bytes).where(Job.holds_resources)
    if tenant is not None:
        query = query.where(owner_of == tenant)
    used: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for owner, cluster, amounts in holding(session.execute(query)):
        for scope in (FLEET, cluster):
            for r in range(3):
                used[(owner, scope)][r] += amounts[r]
    return dict(used)


def standing(quotas: Sequence[Quota], used: Mapping[tuple[str, str], Sequence[int]]) -> list[dict[str, Any]]:
    """Per quota row: the quota, what the tenant uses under it, and how much of that is borrowed."""
    rows = []
    for q in quotas:
        now_used = list(used.get((q.tenant, q.cluster), (0, 0, 0)))
        borrowed = [max(0, now_used[r] - q.nominal[r]) if q.nominal[r] is not None else 0 for r in range(3)]
        rows.append({
            **as_json(q),
            "used": {"gpu": now_used[0], "cpu": format_millis(now_used[1]), "memory": format_bytes(now_used[2])},
            "borrowed": {"gpu": borrowed[0], "cpu": format_millis(borrowed[1]), "memory": format_bytes(borrowed[2])},
            "raw": {"quota": list(q.nominal), "borrowing_limit": list(q.borrowing), "used": now_used, "borrowed": borrowed},
        })
    return rows


def check_submit(session: Session, tenant: str, cpu_millis: int, memory_bytes: int, gpus: int, members: int) -> None:
    """Refuse (400) a job that alone exceeds its tenant's quota plus borrowing limit wherever it could run."""
    quotas = {q.cluster: q for q in of_tenant(session, tenant)}
    if not quotas:
        return
    ask = (gpus * members, cpu_millis * members, memory_bytes * members)
    fleet = quotas.get(FLEET)
    found = exceeded(fleet, (0, 0, 0), ask) if fleet is not None else None
    if found is None:
        clusters = set(session.scalars(select(Node.cluster).distinct()))
        per_cluster = [exceeded(quotas[c], (0, 0, 0), ask) if c in quotas else None for c in sorted(clusters)]
        if per_cluster and all(b is not None for b in per_cluster):
            found = per_cluster[0]
    if found is not None:
        raise InvalidRequest(
            "Job exceeds its tenant's quota",
            [{"field": "resources", "message": f"{found.message.replace('would exceed', 'exceeds')}, even with nothing else running"}],
        )
