"""Fair-share usage: each owner's resource-seconds, decayed with a half-life, kept in PostgreSQL.

The admitting scheduler (it holds the admission lock, so exactly one does it) accrues what every
owner holds times the time since the last accrual, decaying what was there before; readers decay a
row from its `updated_at` to now, so owners that hold nothing need no writes at all.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.domain.policy import Usage
from app.models import FairShareUsage

ACCRUE_EVERY_SECONDS = 1.0

# The whole accrual in one statement (it was four: lock and read the state row, the upsert, the state's update and the
# purge; a round trip each on every pass). What it does, in order of the old statements:
# - lock the single scheduler_state row (insert it, with nothing accrued, when missing);
# - if at least :every seconds passed since the last accrual: add what every owner holds times the seconds elapsed
#   to its decayed usage, and record the accrual's time;
# - then delete the rows decayed below a millionth of what they were (:cutoff), except the ones just accrued (the
#   statement's parts all see the rows as they were before it, so an accrued row must be excluded by hand);
# - answer the accrual's time as it leaves it (`accrue` sends nothing more until the next accrual is due).
_ACCRUE = text(
    """
    WITH state AS (
        SELECT usage_accrued_at FROM scheduler_state WHERE id = 1 FOR UPDATE
    ), due AS (
        SELECT dt FROM (SELECT CAST(extract(epoch FROM (CAST(:now AS timestamptz) - COALESCE(usage_accrued_at, :now))) AS float8) AS dt
                        FROM state) AS s
        WHERE dt >= :every
    ), accrued AS (
        INSERT INTO fair_share_usage AS u (owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at)
        SELECT owner,
               sum(gpus * members) * due.dt,
               sum(cpu_millis * members) / 1000.0 * due.dt,
               sum(memory_bytes * members) / 1073741824.0 * due.dt,
               :now
        FROM (SELECT COALESCE(tenant, owner) AS owner, gpus, cpu_millis, memory_bytes,
                     CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END AS members
              FROM jobs WHERE holds_resources) AS held
        CROSS JOIN due
        GROUP BY owner, due.dt
        ON CONFLICT (owner) DO UPDATE SET
            gpu_seconds = u.gpu_seconds * power(0.5, extract(epoch FROM (EXCLUDED.updated_at - u.updated_at)) / :half_life)
                          + EXCLUDED.gpu_seconds,
            cpu_seconds = u.cpu_seconds * power(0.5, extract(epoch FROM (EXCLUDED.updated_at - u.updated_at)) / :half_life)
                          + EXCLUDED.cpu_seconds,
            memory_gib_seconds = u.memory_gib_seconds * power(0.5, extract(epoch FROM (EXCLUDED.updated_at - u.updated_at)) / :half_life)
                          + EXCLUDED.memory_gib_seconds,
            updated_at = EXCLUDED.updated_at
        RETURNING u.owner
    ), stamped AS (
        UPDATE scheduler_state SET usage_accrued_at = :now WHERE id = 1 AND EXISTS (SELECT 1 FROM due)
    ), purged AS (
        DELETE FROM fair_share_usage f WHERE f.updated_at < :cutoff AND EXISTS (SELECT 1 FROM due)
          AND NOT EXISTS (SELECT 1 FROM accrued a WHERE a.owner = f.owner)
    ), seeded AS (
        INSERT INTO scheduler_state (id, usage_accrued_at) SELECT 1, :now WHERE NOT EXISTS (SELECT 1 FROM state)
        ON CONFLICT (id) DO NOTHING
    )
    SELECT CASE WHEN EXISTS (SELECT 1 FROM due) OR NOT EXISTS (SELECT 1 FROM state) THEN CAST(:now AS timestamptz)
                ELSE (SELECT usage_accrued_at FROM state) END AS accrued_at
    """
)


def accrual_due(now: datetime, accrued_at: datetime | None) -> bool:
    """Whether an accrual may be due at `now`, given the time an earlier accrue() of this process returned (see there)."""
    return accrued_at is None or (now - accrued_at).total_seconds() >= ACCRUE_EVERY_SECONDS


def accrue(session: Session, now: datetime, half_life_seconds: float, accrued_at: datetime | None = None) -> datetime | None:
    """Add what each owner holds since the last accrual (at most once per ACCRUE_EVERY_SECONDS). Caller holds the
    admission lock and commits.

    Returns the time of the last accrual as this statement left it (None: unknown). `accrued_at`: what an earlier call
    of this process returned; while `now` is within ACCRUE_EVERY_SECONDS of it, nothing can be due (the stored time
    only ever moves forward, whoever accrues), so the statement, a round trip of every pass, is not sent at all. If
    that earlier pass rolled back, the next accrual still adds everything since the stored time: deferred, not lost.
    """
    if not accrual_due(now, accrued_at):
        return accrued_at
    half_life = max(half_life_seconds, 1.0)
    return session.execute(_ACCRUE, {"now": now, "every": ACCRUE_EVERY_SECONDS, "half_life": half_life,
                                     "cutoff": now - timedelta(seconds=20 * half_life)}).scalar()


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
    return usage_from_rows(session.execute(query), now, half_life_seconds)


def usage_from_rows(rows: Iterable[tuple[str, float, float, float, datetime]], now: datetime,
                    half_life_seconds: float) -> dict[str, Usage]:
    """fair_share_usage rows (owner, GPU, CPU and memory GiB seconds, updated_at) decayed to `now`."""
    result = {}
    for owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at in rows:
        factor = 0.5 ** (max(0.0, (now - updated_at).total_seconds()) / max(half_life_seconds, 1.0))
        result[owner] = Usage(gpu_seconds * factor, cpu_seconds * factor, memory_gib_seconds * factor)
    return result

