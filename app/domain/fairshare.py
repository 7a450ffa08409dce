"""Fair-share usage: each owner's resource-seconds, decayed with a half-life, kept in PostgreSQL.

The admitting scheduler (it holds the admission lock, so exactly one does it) accrues what every
owner holds times the time since the last accrual, decaying what was there before; readers decay a
row from its `updated_at` to now, so owners that hold nothing need no writes at all.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session

from app.domain.policy import Usage
from app.models import FairShareUsage, SchedulerState

ACCRUE_EVERY_SECONDS = 1.0

_ACCRUE = text(
    """
    INSERT INTO fair_share_usage AS u (owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at)
    SELECT owner,
           sum(gpus * members) * :dt,
           sum(cpu_millis * members) / 1000.0 * :dt,
           sum(memory_bytes * members) / 1073741824.0 * :dt,
           :now
    FROM (SELECT COALESCE(tenant, owner) AS owner, gpus, cpu_millis, memory_bytes,
                 CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END AS members
          FROM jobs WHERE holds_resources) AS held
    GROUP BY owner
    ON CONFLICT (owner) DO UPDATE SET
        gpu_seconds = u.gpu_seconds * power(0.5, extract(epoch FROM (EXCLUDED.updated_at - u.updated_at)) / :half_life)
                      + EXCLUDED.gpu_seconds,
        cpu_seconds = u.cpu_seconds * power(0.5, extract(epoch FROM (EXCLUDED.updated_at - u.updated_at)) / :half_life)
                      + EXCLUDED.cpu_seconds,
        memory_gib_seconds = u.memory_gib_seconds * power(0.5, extract(epoch FROM (EXCLUDED.updated_at - u.updated_at)) / :half_life)
                      + EXCLUDED.memory_gib_seconds,
        updated_at = EXCLUDED.updated_at
    """
)


def accrue(session: Session, now: datetime, half_life_seconds: float) -> None:
    """Add what each owner holds since the last accrual. Caller holds the admission lock and commits."""
    state = session.get(SchedulerState, 1, with_for_update=True)
    if state is None:
        session.add(SchedulerState(id=1, usage_accrued_at=now))
        return
    last = state.usage_accrued_at or now
    elapsed = (now - last).total_seconds()
    if elapsed < ACCRUE_EVERY_SECONDS:
        return
    session.execute(_ACCRUE, {"dt": elapsed, "now": now, "half_life": max(half_life_seconds, 1.0)})
    state.usage_accrued_at = now
    # Rows decayed below a millionth of what they were are gone for good.
    session.execute(delete(FairShareUsage).where(FairShareUsage.updated_at < now - timedelta(seconds=20 * max(half_life_seconds, 1.0))))


def usage_of(session: Session, owners: Iterable[str] | None, now: datetime, half_life_seconds: float) -> dict[str, Usage]:
    """Owners' usage decayed to `now` (every owner's when `owners` is None)."""
    # Plain rows, not ORM objects: the scheduler reads this every pass.
    query = select(FairShareUsage.owner, FairShareUsage.gpu_seconds, FairShareUsage.cpu_seconds, FairShareUsage.memory_gib_seconds,
                   FairShareUsage.updated_at)
    if owners is not None:
        wanted = sorted(set(owners))
        if not wanted:
            return {}
        query = query.where(FairShareUsage.owner.in_(wanted))
    result = {}
    for owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at in session.execute(query):
        factor = 0.5 ** (max(0.0, (now - updated_at).total_seconds()) / max(half_life_seconds, 1.0))
        result[owner] = Usage(gpu_seconds * factor, cpu_seconds * factor, memory_gib_seconds * factor)
    return result

