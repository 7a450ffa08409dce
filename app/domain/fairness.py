"""The fair-share report (GET /api/v1/fairness, Prometheus): per owner, as the scheduler's policy sees it."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.domain import capacity, fairshare, policy, quotas, scheduling, weights
from app.domain.policy import Usage
from app.domain.states import JobStatus
from app.models import Job
from config import Settings


@dataclass(frozen=True)
class OwnerReport:
    owner: str
    weight: float
    gpu_seconds: float  # decayed usage
    cpu_seconds: float
    memory_gib_seconds: float
    usage_share: float  # decayed usage, as a steady-state dominant fraction of the fleet
    held_share: float  # dominant fraction of the fleet it holds now
    share: float  # (usage_share + held_share) / weight: at equal priority, the lowest goes first
    rank: int | None  # among owners with a backlog; None without one
    pending: int
    quotas: list[dict] = field(default_factory=list)  # quotas.standing: quota, used, borrowed per cluster ('*': fleet-wide)


@dataclass(frozen=True)
class FairnessReport:
    half_life_seconds: float
    owners: list[OwnerReport]


def report(session: Session, settings: Settings, now: datetime, owner: str | None = None) -> FairnessReport:
    """Every owner (or only `owner`): decayed usage, weight, share, rank among owners with a backlog, backlog."""
    holders: list = []
    nodes = capacity.load_nodes(session, alive_since=capacity.node_alive_since(now, settings.node_lease_seconds), holders=holders)
    running = [scheduling.running_attempt(row, now, settings) for row in holders]
    owner_of = func.coalesce(Job.tenant, Job.owner)
    pending = dict(session.execute(select(owner_of, func.count()).where(Job.status == JobStatus.PENDING.value).group_by(owner_of)).all())
    usage = fairshare.usage_of(session, None, now, settings.fair_share_half_life_seconds)
    config = scheduling.policy_config(settings)
    admin_set = weights.stored(session)
    shares = policy.owner_shares(policy.Snapshot(now.timestamp(), nodes, running, [], usage, weights=admin_set), config, waiting=pending)
    all_quotas = quotas.load_all(session)
    held = quotas.usage(session) if all_quotas else {}
    rows = []
    for name, share in shares.items():
        if owner is not None and name != owner:
            continue
        used = usage.get(name, Usage())
        rows.append(OwnerReport(name, share.weight, used.gpu_seconds, used.cpu_seconds, used.memory_gib_seconds,
                                share.usage_share, share.held_share, share.share, share.rank or None, int(pending.get(name, 0)),
                                quotas.standing(all_quotas.get(name, []), held)))
    listed = {row.owner for row in rows}
    # A tenant with a quota or a weight set by an admin, but no usage or backlog yet.
    for name in sorted((set(all_quotas) | set(admin_set)) - listed):
        if owner is None or name == owner:
            rows.append(OwnerReport(name, config.weight(name, admin_set), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0,
                                    quotas.standing(all_quotas.get(name, []), held)))
    if owner is not None and not rows:
        rows.append(OwnerReport(owner, config.weight(owner, admin_set), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0))
    rows.sort(key=lambda r: (r.rank is None, r.rank or 0, r.owner))
    return FairnessReport(settings.fair_share_half_life_seconds, rows)
