"""What preemption cost: preemptions and GPU-seconds lost, per queue and tenant (GET /api/v1/metrics/, Prometheus).

Read from the victims' `running -> pending` events (details: preempted_by, tenant, gpu_seconds_lost), which
the scheduler writes in the same transaction as the preemption (app.domain.scheduling._preempt).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

WINDOW = timedelta(hours=24)

_BY = text(
    """
    SELECT j.queue, e.details->>'tenant' AS tenant, count(*) AS n,
           COALESCE(sum((e.details->>'gpu_seconds_lost')::float8), 0) AS lost
    FROM job_events e JOIN jobs j ON j.id = e.job_id
    WHERE e.to_status = 'pending' AND e.at > :since AND e.details ? 'preempted_by'
    GROUP BY j.queue, e.details->>'tenant'
    """
)


@dataclass(frozen=True)
class PreemptionStats:
    preemptions_24h: int = 0
    gpu_seconds_lost_24h: float = 0.0
    by_queue: dict[str, int] = field(default_factory=dict)
    by_tenant: dict[str, int] = field(default_factory=dict)
    rows: list[tuple[str, str, int, float]] = field(default_factory=list)  # (queue, tenant, preemptions, GPU-seconds lost)


def stats(session: Session, now: datetime) -> PreemptionStats:
    rows = [(r.queue, r.tenant or "", int(r.n), float(r.lost)) for r in session.execute(_BY, {"since": now - WINDOW})]
    by_queue: dict[str, int] = {}
    by_tenant: dict[str, int] = {}
    for queue, tenant, n, _ in rows:
        by_queue[queue] = by_queue.get(queue, 0) + n
        by_tenant[tenant] = by_tenant.get(tenant, 0) + n
    return PreemptionStats(sum(r[2] for r in rows), round(sum(r[3] for r in rows), 3), by_queue, by_tenant, rows)
