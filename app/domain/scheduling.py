"""Admission: PostgreSQL holds the backlog; the scheduler admits from it and writes the tasks to publish.

One admission pass, in one transaction:
- only one scheduler admits at a time (an advisory lock), so capacity is never promised twice;
- it accrues fair-share usage, loads the snapshot (live nodes and what holds them until when, the
  backlog pruned per owner and per pool) and lets the policy decide (app.domain.policy);
- the jobs the policy admits are locked with FOR UPDATE SKIP LOCKED, so a job being cancelled at that
  instant is skipped rather than waited for, and each gets a placement (node, GPUs), a fresh dispatch
  token and an outbox row, in a savepoint of its own (a row that cannot be written fails alone).
The outbox rows are published after the commit (see app.dispatch); a row left unpublished by a
crash is published again by the next pass's sweep.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from app.db import GENERIC_PLAN, Prepared, transaction
from app.domain import capacity, fairshare, policy, pools, quotas, weights
from app.domain.callers import SYSTEM
from app.domain.jobs import clear_placement, notify_scheduler, record_transition, utcnow
from app.domain.states import TERMINAL, JobStatus
from app.models import Job, Node, OutboxMessage
from config import Settings

log = logging.getLogger("jobservice.scheduler")
T = TypeVar("T")
REQUEUE_BATCH = 500  # unclaimed jobs returned to the backlog per sweep

EXECUTE_TASK = "jobservice.execute_job"
ADOPT_TASK = "jobservice.adopt_job"
ADMISSION_LOCK = 7_311_001  # pg advisory lock key shared by every scheduler process


def broker_queue(queue: str, cluster: str, node: str | None) -> str:
    """The Celery queue a placed job's task goes to: its logical queue, on the workers of its node."""
    return ".".join(part for part in (queue, cluster, node) if part)


@dataclass
class AdmissionResult:
    messages: list[OutboxMessage] = field(default_factory=list)  # to publish once the admission committed
    locked_out: bool = False
    next_wakeup: datetime | None = None  # earliest backoff expiry among waiting jobs
    failed: list[str] = field(default_factory=list)  # jobs whose handling raised: ended as failed
    plan: "policy.Plan | None" = None
    preempted: list[str] = field(default_factory=list)  # running jobs told to stop for higher-priority work

    @property
    def admitted(self) -> list[str]:
        return [message.job_id for message in self.messages]


# The pass's lock, one statement for two things:
# - the admission lock, whose result reaches the nodes statement (its `locked`) through a setting local to the
#   transaction: psycopg2 returns only the last statement of a round trip's rows;
# - deleting the outbox rows of tasks the previous pass published (`published`): their delete rides on this
#   statement instead of a transaction of its own after each publication. Losing it costs a second publication,
#   which the claim ignores.
# A pass with no fair-share accrual due (the common case: one is due once a second at most) sends it in the nodes
# read's round trip, ahead of the read's EXECUTE (_LOCK_PASS_AND_NODES): a round trip less. Two statements, not one:
# the nodes read takes its snapshot after the lock is held (in one statement, a pass could read nodes and holders as
# they were before the commit of the pass that held the lock until then, and promise its capacity again). A pass
# whose accrual is due sends it alone: the accrual must follow the lock and precede the nodes read's facts.
_LOCK_PASS = Prepared(
    "jobservice_lock_pass",
    """
    WITH published AS (DELETE FROM outbox WHERE id = ANY(:published))
    SELECT set_config('jobservice.pass_locked', CAST(pg_try_advisory_xact_lock(:lock_key) AS text), true) AS locked
    """,
    {"published": "bigint[]", "lock_key": "bigint"},
)


@dataclass
class PassStart:
    """A pass's lock and outbox delete (_LOCK_PASS), sent alone or with its nodes read; what they found."""

    published: list[int]
    lock_sent: bool = False
    locked: bool = False
    next_wakeup: datetime | None = None

    def lock(self, session: Session) -> bool:
        """The lock alone, ahead of the nodes read (which then reads whether it was taken from the setting)."""
        self.lock_sent = True
        self.locked = _LOCK_PASS.execute(session, self.params()).scalar() == "true"
        return self.locked

    def params(self) -> dict[str, Any]:
        return {"published": self.published, "lock_key": ADMISSION_LOCK}


class _LockedOut(Exception):
    """Another scheduler's pass holds the admission lock."""


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while the policy decides (on again after, unless it was off before).

    The policy makes tens of thousands of short-lived objects (decisions, tuples, node copies) that reference counting
    frees; they set off ~20 young-generation collections per pass at 100,000 pending jobs and 1,000 nodes, each also
    traversing what the pass keeps alive: ~25 ms of a ~70 ms policy (benchmarks/scheduler_pass.py --ran 3600). With it
    off the pass pays one collection afterwards instead. Pure computation, no I/O or locks: off for its few tens of ms.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def admit(session: Session, settings: Settings, now: datetime | None = None, cache: "SnapshotCache | None" = None,
          published: Sequence[int] = ()) -> AdmissionResult:
    """One admission pass: load the snapshot, let the policy decide, write its admissions.

    `cache`: the scheduler process's SnapshotCache (rows decoded in earlier passes); the decisions are the same without it.
    `published`: outbox rows whose tasks were published since; deleted in this pass's transaction (even when locked out).
    """
    now = now or utcnow()
    result = AdmissionResult()
    unhandled: list[tuple[str, str]] = []
    with transaction(session):
        start = PassStart(list(published))
        if cache is None or fairshare.accrual_due(now, cache.accrued_at):
            if not start.lock(session):
                result.locked_out = True
                return result
            accrued_at = fairshare.accrue(session, now, settings.fair_share_half_life_seconds,
                                          cache.accrued_at if cache is not None else None)
            if cache is not None:
                cache.accrued_at = accrued_at
        config = policy_config(settings, admissions_only=True)
        short = cache is not None and cache.short_backlog
        try:
            snapshot = load_snapshot(session, settings, now, cache=cache, start=start, heads=ADMISSION_HEADS if short else None)
        except _LockedOut:
            result.locked_out = True
            return result
        result.next_wakeup = start.next_wakeup
        with collector_paused():
            plan = policy.decide(snapshot, config)
        within = plan.stopped_after is not None and plan.stopped_after < ADMISSION_HEADS
        if short and not within and len(snapshot.backlog) >= ADMISSION_HEADS:
            # The walk needed more than the short backlog holds (or the heads were all it holds): read them all.
            snapshot = load_snapshot(session, settings, now, cache=cache, start=start)
            with collector_paused():
                plan = policy.decide(snapshot, config)
            within = plan.stopped_after is not None and plan.stopped_after < ADMISSION_HEADS
        if cache is not None:
            cache.short_backlog = within or len(snapshot.backlog) < ADMISSION_HEADS  # the latter: the heads all fit in it
        result.plan = plan
        for preemption in plan.preemptions:
            result.preempted += _preempt(session, preemption, now)
        unhandled = [(d.job.id, d.reason) for d in plan.decisions.values() if isinstance(d, policy.Fail)]
        admits = plan.admitted
        if admits:
            try:
                # The fast path: every admission of the pass (row locks, jobs, events, outbox rows) in one statement,
                # behind a savepoint it sets itself (a failed statement is undone to it: _place_all).
                result.messages += _place_all(session, [(d.job, d.placement) for d in admits], now)
            except _INFRASTRUCTURE_ERRORS:
                raise
            except Exception:  # noqa: BLE001 - some row cannot be written: find it, one savepoint per job
                log.warning("writing the pass's admissions together failed; writing them one by one", exc_info=True)
                result.messages.clear()
                # Locked only now, and skipped if someone (a cancel) holds the row: it is simply not admitted.
                locked = {
                    job.id: job
                    for job in session.scalars(
                        select(Job)
                        .where(Job.id.in_([d.job.id for d in admits]), Job.status == JobStatus.PENDING.value)
                        .with_for_update(skip_locked=True)
                    )
                }
                for job, placement in [(locked[d.job.id], d.placement) for d in admits if d.job.id in locked]:
                    try:
                        with session.begin_nested():  # a row that cannot be written fails alone
                            message = _place(session, job, placement, now)
                    except _INFRASTRUCTURE_ERRORS:
                        raise
                    except Exception as exc:  # noqa: BLE001 - one job must never stop admission of the others
                        log.exception("writing an admission failed; failing that job", extra={"job_id": job.id})
                        unhandled.append((job.id, f"the scheduler could not admit this job: {type(exc).__name__}: {exc}"[:1000]))
                        continue
                    result.messages.append(message)
    for job_id, reason in unhandled:
        if fail_unhandled(session, job_id, reason, now):
            result.failed.append(job_id)
    return result


def policy_config(settings: Settings, *, admissions_only: bool = False) -> policy.PolicyConfig:
    """`admissions_only`: for the admission pass, which uses a plan's admissions, failures and preemptions alone."""
    return policy.PolicyConfig(
        admissions_only=admissions_only,
        reservation_depth=settings.scheduler_reservation_depth,
        half_life_seconds=settings.fair_share_half_life_seconds,
        weights=dict(settings.fair_share_weights),
        priority_band=settings.fair_share_priority_band,
        scan_limit=settings.scheduler_scan_limit,
        end_margin_seconds=settings.kill_grace_seconds,
        preemption=settings.preemption_enabled,
        preemption_min_run_seconds=settings.preemption_min_run_seconds,
    )


def _preempt(session: Session, preemption: policy.Preemption, now: datetime) -> list[str]:
    """Send the victims back to the backlog; their workers notice at their next lease renewal and stop them.

    A victim becomes pending at once (its place: its submit time; no retry spent) but keeps holding its
    capacity (`holds_resources`) until its worker reports its processes gone (app.domain.execution.end),
    so nothing, not even the preemptor, is placed on GPUs that are still in use.
    """
    job = preemption.job
    victims = {v.id: v for v in preemption.victims}
    rows = list(session.scalars(
        select(Job).where(Job.id.in_(list(victims)), Job.status == JobStatus.RUNNING.value).with_for_update(skip_locked=True)
    ))
    if len(rows) != len(victims):
        return []  # one ended or is being changed meanwhile: the next pass decides afresh
    done = []
    for victim in rows:
        members = sum(int(p["members"]) for p in victim.placement or []) or 1
        ran = max(0.0, (now - victim.started_at).total_seconds()) if victim.started_at else 0.0
        record_transition(
            session, victim, JobStatus.PENDING, actor="scheduler", at=now,
            reason=f"preempted by {job.id} (priority {job.priority})",
            details={"preempted_by": job.id, "preemptor_priority": job.priority, "tenant": victim.tenant or victim.owner,
                     "gpu_seconds_lost": round(victim.gpus * members * ran, 3), "placement": victim.placement},
        )
        victim.not_before = None
        done.append(victim.id)
    notify_scheduler(session, "preempted")
    log.info("preempted %s for %s (priority %d)", ", ".join(done), job.id, job.priority, extra={"job_id": job.id})
    return done


def preemption_budget(session: Session, settings: Settings, now: datetime) -> dict[str, int] | None:
    """Victims each cluster may still lose now: its limit (PREEMPTION_MAX_PER_MINUTE, raised to
    PREEMPTION_MAX_PER_NODE_PER_MINUTE per node it has) less those of the last minute."""
    nodes = session.execute(select(Node.cluster, func.count()).group_by(Node.cluster)).all()
    recent = session.execute(text(
        "SELECT cluster, count(*) FROM job_events WHERE to_status = 'pending' AND at > :since AND details ? 'preempted_by' "
        "GROUP BY cluster"), {"since": now - timedelta(seconds=60)}).all()
    return budget_left(settings, nodes, recent)


def budget_left(settings: Settings, nodes: Iterable[Sequence[Any]], recent: Iterable[Sequence[Any]]) -> dict[str, int]:
    """Per cluster, from (cluster, nodes) and (cluster, victims of the last minute): what it may still lose now."""
    preempted = {cluster: int(n) for cluster, n in recent}
    return {cluster: max(0, preemption_limit(settings, int(n)) - preempted.get(cluster, 0)) for cluster, n in nodes}


def preemption_limit(settings: Settings, nodes: int) -> int:
    """Victims a cluster of `nodes` nodes may lose per minute: a guard against preemption storms that scales with
    the cluster (a fixed number either throttles a big cluster's urgent work or lets a small one churn)."""
    return max(settings.preemption_max_per_minute, math.floor(settings.preemption_max_per_node_per_minute * nodes))


# The backlog the policy sees, pruned per owner and per pool in PostgreSQL: the head of every owner's
# (its fair-share owner: the tenant when JWT_TENANT_CLAIM set one, else the submitter)
# backlog (fair share must see a light owner's job however long a heavy owner's burst is) and the
# head of each pool (a CPU-only job is seen however many GPU jobs are ahead of it). Each part is an
# index range scan; nothing sorts the whole backlog.
BACKLOG_PER_OWNER = 100
BACKLOG_PER_POOL = 300
# An admission pass on a busy fleet admits the few jobs at the head of the walk and stops there, every worker slot
# taken (policy.PolicyConfig.admissions_only); it reads first at most this many jobs per owner, pool and demand
# class. A walk that stopped after fewer jobs than that admits exactly what it would from the whole heads (the walk
# takes each owner's jobs in their order: policy.Plan.stopped_after); one that did not reads the whole heads and decides
# again. Reading, sending and decoding 300 heads, and their known versions, each pass was a third of its time.
ADMISSION_HEADS = 32
_PENDING_COLUMNS = """
    j.id, COALESCE(j.tenant, j.owner) AS owner, j.priority, j.queue, j.created_at, j.cpu_millis, j.memory_bytes, j.gpus,
    CASE WHEN j.gang_enabled THEN j.gang_min_members ELSE 1 END AS members,
    CASE WHEN jsonb_typeof(j.command) = 'array' THEN jsonb_array_length(j.command) > 0 ELSE false END AS has_command,
    j.timeout_seconds, j.gpu_types, j.pool, j.started_at IS NOT NULL AS ever_started
"""
_ONE_PENDING = text(f"SELECT {_PENDING_COLUMNS} FROM jobs j WHERE j.id = :id AND j.status = 'pending'")
# Jobs bound to a GPU type or worker pool (ix_jobs_pending_demand): the head of each such class (listed by the
# pool_demand counters, not by reading the backlog) is read too, so an A100 job is seen however many H100 jobs
# are ahead of it.
_DEMAND = "j.status = 'pending' AND (j.pool IS NOT NULL OR j.gpu_types IS NOT NULL)"
BACKLOG_DEMAND_CLASSES = 50
BACKLOG_PER_CLASS = 100
# NOT holds_resources: a preempted job is pending but its processes are still stopping (execution.end releases it).
# Queues at their max_concurrency (`full`) are left out.
_ELIGIBLE_ALL = "j.status = 'pending' AND (j.not_before IS NULL OR j.not_before <= :now) AND NOT j.holds_resources"
_ELIGIBLE = f"{_ELIGIBLE_ALL} AND NOT (j.queue = ANY(CAST(:full AS text[])))"
# A pool's head (and a demand class's) does not count the preemptors waiting for their room (`waiting`: waiting_for_room):
# they were decided already (their room is being freed, and the policy keeps it for them), so they would only push the
# newer jobs behind them out of the head. A burst of urgent jobs otherwise filled a pool's head with preemptors, and
# the urgent jobs submitted just after waited unseen for a pass or two (the simulator's p99 start was 25 s against a
# target of the kill grace plus one pass). They still reach the policy, by id: each needs its kept room.
_NOT_WAITING = "NOT (j.id = ANY(CAST(:waiting AS text[])))"


# The backlog query returns each job's id and row version (xmin: a committed row version's own, changed by every
# UPDATE), and decodes a row only when the caller's cache does not hold that version (SnapshotCache): between
# two passes few rows of the head change, and decoding ~2,000 rows into Python objects was most of a pass.
def _heads_sql(*, full_or_waiting: bool) -> str:
    """The backlog's heads (ids and row versions). Without `full_or_waiting`, the statement for a pass with no full queue
    and no preemptor waiting for its room (most passes): it names neither list, so its generic plan walks the pools'
    indexes as a custom plan does. With the lists, a generic plan, blind to the arrays' contents, sorted a whole pool's
    backlog after a sequential scan (4,000 pending, cache warm: 2.7-3.7 ms, against 0.9 ms without them)."""
    eligible = _ELIGIBLE if full_or_waiting else _ELIGIBLE_ALL
    not_waiting = f" AND {_NOT_WAITING}" if full_or_waiting else ""
    by_id = (f"""SELECT j.id, j.xmin::text FROM jobs j WHERE j.id = ANY(CAST(:waiting AS text[])) AND {eligible}
        UNION
        """ if full_or_waiting else "")
    return f"""
    WITH RECURSIVE owners(owner) AS (
        (SELECT COALESCE(tenant, owner) FROM jobs WHERE status = 'pending' ORDER BY COALESCE(tenant, owner) LIMIT 1)
        UNION ALL
        SELECT (SELECT COALESCE(j.tenant, j.owner) FROM jobs j WHERE j.status = 'pending' AND COALESCE(j.tenant, j.owner) > o.owner
                ORDER BY COALESCE(j.tenant, j.owner) LIMIT 1)
        FROM owners o WHERE o.owner IS NOT NULL
    ), heads(id, version) AS (
        SELECT h.id, h.version FROM owners o CROSS JOIN LATERAL (
            SELECT j.id, j.xmin::text AS version FROM jobs j WHERE {eligible} AND COALESCE(j.tenant, j.owner) = o.owner
            ORDER BY j.priority DESC, j.created_at, j.id LIMIT :per_owner) h
        WHERE o.owner IS NOT NULL
        UNION
        (SELECT j.id, j.xmin::text FROM jobs j WHERE {eligible}{not_waiting} AND j.gpus > 0
         ORDER BY j.priority DESC, j.created_at, j.id LIMIT :per_pool)
        UNION
        (SELECT j.id, j.xmin::text FROM jobs j WHERE {eligible}{not_waiting} AND j.gpus = 0
         ORDER BY j.priority DESC, j.created_at, j.id LIMIT :per_pool)
        UNION
        {by_id}SELECT h.id, h.version FROM (SELECT pool, gpu_types FROM ({pools.DEMAND_CLASSES_SQL}) AS d LIMIT :classes) c CROSS JOIN LATERAL (
            SELECT j.id, j.xmin::text AS version FROM jobs j WHERE {eligible} AND {_DEMAND}{not_waiting}
              AND COALESCE(j.pool, '') = c.pool AND COALESCE(j.gpu_types, '{{}}'::text[]) = c.gpu_types
            ORDER BY j.priority DESC, j.created_at, j.id LIMIT :per_class) h
    )
"""


# Only what changed travels: the heads the cache does not hold in this version (decoded, in the same statement, so in
# the same version), and the ids of the rows the cache holds that are no longer heads in that version (a NULL version).
# The cache's rows travel as one JSON object {id: version}: two text[] parameters of 2,000 elements each were 2,000
# quoted literals for the server to parse per statement, more time than the scan itself. Returning and walking the
# ~2,000 unchanged heads every pass was most of the backlog's time once their decoding was cached.
_KNOWN = "json_each_text(CAST(:known AS json)) AS k(id, version)"


def _backlog_sql(*, full_or_waiting: bool) -> str:
    return f"""{_heads_sql(full_or_waiting=full_or_waiting)}, k AS MATERIALIZED (SELECT k.id, k.version FROM {_KNOWN}),
    changed AS (SELECT h.id, h.version FROM heads h WHERE NOT EXISTS (SELECT 1 FROM k WHERE k.id = h.id AND k.version = h.version)),
    dropped AS (SELECT k.id, NULL::text AS version FROM k
                WHERE NOT EXISTS (SELECT 1 FROM heads h WHERE h.id = k.id AND h.version = k.version))
    SELECT c.id, c.version, f.* FROM (SELECT * FROM changed UNION ALL SELECT * FROM dropped) c
    LEFT JOIN LATERAL (SELECT {_PENDING_COLUMNS.replace("j.id,", "", 1)} FROM jobs j WHERE j.id = c.id AND c.version IS NOT NULL
                          OFFSET 0) f ON true  -- OFFSET 0: a primary key lookup per changed row, never a join over all jobs
    """


_BACKLOG_SQL = _backlog_sql(full_or_waiting=True)
_BACKLOG_TYPES = {"now": "timestamptz", "full": "text[]", "per_owner": "bigint", "per_pool": "bigint", "classes": "bigint",
                  "per_class": "bigint", "known": "text", "waiting": "text[]"}
# A pass with no full queue and no preemptor waiting for its room (most passes) reads the backlog with the statement that
# names neither list (_heads_sql), prepared whatever the backlog's size: planning it was most of its cost at any size.
_BACKLOG_PLAIN_TYPES = {name: kind for name, kind in _BACKLOG_TYPES.items() if name not in ("full", "waiting")}
_BACKLOG_PLAIN = Prepared("jobservice_backlog_plain", _backlog_sql(full_or_waiting=False), _BACKLOG_PLAIN_TYPES)
# With full queues or waiting preemptors: prepared while the backlog is small, as in an idle pass (planning the
# statement cost several times running it there). Not when the last pass saw more heads: a generic plan, blind to the
# arrays' contents, sorted a whole pool's backlog (at 100,000 pending: 14.4 -> 20.6 ms per pass).
PREPARED_BACKLOG_MAX_HEADS = 100
_BACKLOG = text(_BACKLOG_SQL)
_BACKLOG_PREPARED = Prepared("jobservice_backlog", _BACKLOG_SQL, _BACKLOG_TYPES)
# The jobs holding capacity (the running attempts) that changed since the cache's rows (`known`: the holders decoded
# in earlier passes, by version), decoded; and the known ones that no longer hold anything in that version (their id,
# with a NULL version). Unchanged holders do not travel at all: returning and walking 1,000 unchanged rows per pass
# was most of the holders' time once their decoding was cached. All in one statement, so in one version of every row.
# Plain `holds_resources`, not IS TRUE: only this form uses the partial index ix_jobs_holding_node.
# Read in the nodes' statement (_NODES), as one JSON array of [id, version, *_HOLDER_COLUMNS] (version and columns
# null for a dropped one): a statement of its own was a round trip of every pass.
_HOLDER_COLUMNS = ("cluster", "placement", "cpu_millis", "memory_bytes", "gpus", "owner", "status", "queued_at", "started_at",
                   "timeout_seconds", "priority", "preemptible", "queue")
_HOLDERS = """
    hk AS MATERIALIZED (SELECT k.id, k.version FROM json_each_text(CAST(:holders_known AS json)) AS k(id, version)),
    hchanged AS (
        SELECT j.id, j.xmin::text AS version FROM jobs j
        WHERE j.holds_resources AND NOT EXISTS (SELECT 1 FROM hk WHERE hk.id = j.id AND hk.version = j.xmin::text)
    ), hdropped AS (
        SELECT hk.id, NULL::text AS version FROM hk
        WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = hk.id AND j.holds_resources AND j.xmin::text = hk.version)
    ), h AS (
        SELECT json_agg(json_build_array(c.id, c.version, f.cluster, f.placement, f.cpu_millis, f.memory_bytes, f.gpus, f.owner,
                                         f.status, f.queued_at, f.started_at, f.timeout_seconds, f.priority, f.preemptible,
                                         f.queue, p.preempted)) AS holders
        FROM (SELECT * FROM hchanged UNION ALL SELECT * FROM hdropped) c
        LEFT JOIN LATERAL (
            SELECT j.cluster, j.placement, j.cpu_millis, j.memory_bytes, j.gpus, COALESCE(j.tenant, j.owner) AS owner, j.status,
                   j.queued_at, j.started_at, j.timeout_seconds, j.priority, j.preemptible, j.queue
            FROM jobs j WHERE j.id = c.id AND c.version IS NOT NULL OFFSET 0) f ON true
        LEFT JOIN LATERAL (
            SELECT json_agg(json_build_array(e.details->>'preempted_by', e.at)) AS preempted FROM job_events e
            WHERE :preemption AND f.started_at IS NOT NULL AND e.job_id = c.id AND e.to_status = 'pending'
              AND e.at > :preempted_by_since AND e.details ? 'preempted_by') p ON true
    )
"""


class _HolderRow(NamedTuple):
    """A holder as _NODES returns it (in its JSON array), with the types a row of its columns would have."""

    id: str
    version: str | None
    cluster: str | None
    placement: Any
    cpu_millis: int
    memory_bytes: int
    gpus: int
    owner: str
    status: str
    queued_at: datetime | None
    started_at: datetime | None
    timeout_seconds: int | None
    priority: int
    preemptible: bool
    queue: str
    # [[preempted_by, at], ...]: who preempted it within PREEMPTED_BY_WINDOW (with preemption on, for a holder that ran).
    preempted: list[list[str]] | None = None

    @classmethod
    def of(cls, values: list[Any]) -> "_HolderRow":
        row = cls(*values)
        return row._replace(queued_at=_timestamp(row.queued_at), started_at=_timestamp(row.started_at))


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None
PREEMPTED_BY_WINDOW = timedelta(days=1)  # a job never preempts one that preempted it within this window


@dataclass
class _Held:
    """A holder row (a running attempt) decoded: what it holds on which node, and its attempt for the policy."""

    row: Any
    holding: capacity.Holding
    attempt: policy.Running
    valid_until: float  # `attempt` depends on the pass's time (its end is at least now): reusable while now < this
    preempted: Any = ()  # (job, at) of the preemptions of it in the window, as read when it was decoded


@dataclass
class _Backlogged:
    job: policy.Pending
    valid_until: float  # the oldest preemption it remembers leaves the window then


class SnapshotCache:
    """What a scheduler process decoded in earlier passes, reused while the row is unchanged.

    Keyed by each row's id and version (xmin): the pass's queries get the cache's {id: version} and return only the
    rows not held in that version (decoded, in the same statement) and the ids of held rows that left (so the snapshot
    is exactly what a read of every row would give: any UPDATE gives a row a new version). Nodes are kept by a digest
    of what the scheduler reads of them (_NODES). Entries of rows that left are dropped, so the cache never outgrows
    one snapshot.
    Not shared between threads (the scheduler is one thread; explain's PlanCache holds its lock).
    """

    def __init__(self) -> None:
        self.settings_key: tuple[Any, ...] | None = None
        self.backlog: dict[str, tuple[str, _Backlogged]] = {}
        self.holders: dict[str, tuple[str, _Held]] = {}
        self.nodes: dict[tuple[str, str], capacity.NodeCapacity] = {}
        self.node_digest: str | None = None  # of the rows `nodes` was made from (see _NODES)
        # The live nodes with what the holders hold deducted, as the last pass left them, and what they were computed
        # from (`deducted_base`: the nodes with nothing held; `on_node`: the holders on each node). While the nodes are
        # unchanged, a pass recomputes only the nodes whose holders changed (each from scratch, so the result is the
        # one a full recomputation gives), instead of copying every node and deducting every holder again. The
        # NodeCapacity objects in `deducted` are never changed once made (a changed node is a new object), so the
        # snapshots of earlier passes can share them.
        self.deducted: dict[tuple[str, str], capacity.NodeCapacity] | None = None
        self.deducted_base: dict[tuple[str, str], capacity.NodeCapacity] | None = None
        self.on_node: dict[tuple[str, str], frozenset[str]] = {}
        self._known: dict[str, tuple[dict[str, str], str]] = {}  # per kind of rows (backlog, holders): the last `known` and its JSON
        self.recomputed_nodes = 0  # nodes recomputed by the last pass (benchmarks/scheduler_pass.py prints it)
        self.decoded_holders = 0  # holder rows decoded by the last pass (not known in their version)
        self.decoded_backlog = 0  # backlog rows decoded by the last pass
        # The fair-share accrual's time as the last pass's accrual statement left it: until ACCRUE_EVERY_SECONDS later
        # nothing is due, and the pass sends no accrual statement (fairshare.accrue).
        self.accrued_at: datetime | None = None
        # Whether the next admission pass reads the short backlog first (ADMISSION_HEADS): so while the passes stop
        # within it; after one did not, the passes read the whole heads until one stops within it again.
        self.short_backlog = True

    def for_settings(self, settings: Settings) -> "SnapshotCache":
        key = (settings.preemption_enabled, settings.kill_grace_seconds, settings.job_lease_seconds, settings.job_heartbeat_seconds)
        if key != self.settings_key:  # what a decoded row means depends on these
            accrued_at = self.accrued_at  # does not: it is the database's, as the last accrual statement read it
            self.__init__()  # type: ignore[misc]
            self.settings_key, self.accrued_at = key, accrued_at
        return self

    def known_rows(self, kind: str, entries: dict[str, tuple[str, Any]], now: float | None) -> tuple[dict[str, str], str]:
        """The queries' `known`: rows whose decoded form is still valid at `now` (None: every row), as {id: version} and
        as its JSON (encoded again only when it differs from the last one made for the same kind of rows: between
        passes it seldom does)."""
        known = {job_id: version for job_id, (version, entry) in entries.items() if now is None or now < entry.valid_until}
        last = self._known.get(kind)
        if last is None or last[0] != known:
            last = self._known[kind] = (known, json.dumps(known))
        return last


def load_snapshot(session: Session, settings: Settings, now: datetime, *, include: str | None = None,
                  cache: SnapshotCache | None = None, start: PassStart | None = None, heads: int | None = None
                  ) -> policy.Snapshot:
    """What the policy needs, read in the caller's transaction. `include`: a job to add if pruning left it out.

    `cache` (the scheduler's, kept between passes) only saves decoding rows whose version it holds: with or
    without it the snapshot is the same. `start`: the admission pass's lock and outbox delete, sent first in the same
    round trip unless sent already (filled in with what they found, and the next wake-up); raises _LockedOut, having
    read nothing more, when another pass holds the lock. `heads`: at most this many jobs of each owner, pool and demand
    class (fewer than BACKLOG_PER_OWNER, ...): the admission pass's short backlog (ADMISSION_HEADS).
    """
    cache = (cache or SnapshotCache()).for_settings(settings)
    stamp = now.timestamp()
    # Every holder the cache holds, valid now or not: a holder's row is all its decoding needs, and the cache keeps it.
    known_holders, known_holders_json = cache.known_rows("holders", cache.holders, None)
    # The admission pass's short backlog travels with the nodes, as the plain statement reads it (see _NODES_AND_BACKLOG:
    # only under the pass's lock, so only with `start`).
    ahead = _backlog_params(cache, now, [], heads) if heads is not None and include is None and start is not None else None
    nodes, facts = _load_nodes(session, cache, capacity.node_alive_since(now, settings.node_lease_seconds),
                               preemption=settings.preemption_enabled, preempted_since=now - timedelta(seconds=60),
                               known_holders=known_holders_json, start=start, now=now,
                               backlog=None if ahead is None else ahead[1])
    running, deducted = _load_holders(cache, nodes, now, settings, known_holders, facts.holders)
    active = dict(facts.active)
    room = {q.name: q.max_concurrency - active.get(q.name, 0) for q in settings.queues}
    full = sorted(name for name, left in room.items() if left <= 0)
    # The last minute's preemptions, read once: (cluster, victims, preemptor), for the rate limit and the waiting preemptors.
    victims_per_cluster: dict[str, int] = defaultdict(int)
    for cluster, victims, _ in facts.preempted:
        victims_per_cluster[cluster] += victims
    waiting = waiting_for_room(running, (preemptor for _, _, preemptor in facts.preempted))
    if ahead is not None and not full and not waiting:
        backlog = _backlog_from(session, cache, now, ahead[0], [_BacklogRow.of(values) for values in facts.backlog or ()],
                                None, settings.preemption_enabled)
    else:
        backlog = _load_backlog(session, cache, now, full, include, settings.preemption_enabled, waiting, heads)
    owners = {job.owner for job in backlog} | {attempt.owner for attempt in running}
    usage = fairshare.usage_from_rows(
        ((owner, gpu, cpu, memory, datetime.fromisoformat(at)) for owner, gpu, cpu, memory, at in facts.usage if owner in owners),
        now, settings.fair_share_half_life_seconds)
    budget = budget_left(settings, facts.nodes_per_cluster, victims_per_cluster.items()) if settings.preemption_enabled else None
    all_quotas = quotas.by_tenant(facts.quotas)
    # By cluster and name (_NODES), with the cache as without it: ties between nodes go to the first listed.
    return policy.Snapshot(stamp, [deducted[key] for key in nodes], running, backlog, usage, room, quotas=all_quotas,
                           preemption_budget=budget, weights=dict(facts.weights))


# The snapshot's small reads, read with the nodes (_NODES) in one round trip (each was a statement of its own: a pass
# with a small backlog was mostly round trips): the jobs admitted per queue (queued or running), fair-share usage rows, quotas and the weights
# admins set, and with preemption on what its rate limit needs (nodes per cluster, the last minute's preemptions, as
# preemption_budget reads them, by preemptor too: waiting_for_room). Each is a JSON array (of arrays);
# JSON carries float8 and bigint exactly (PostgreSQL writes the shortest text that reads back as the same double),
# timestamps as ISO text with microseconds.
_PASS_FACTS = """
      (SELECT COALESCE(json_agg(json_build_array(queue, n)), '[]') FROM (
          SELECT queue, count(*) AS n FROM jobs WHERE status IN ('queued', 'running') GROUP BY queue) a) AS active,
      (SELECT COALESCE(json_agg(json_build_array(owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at)), '[]')
         FROM fair_share_usage) AS usage,
      (SELECT COALESCE(json_agg(json_build_array(tenant, cluster, gpus, cpu_millis, memory_bytes, borrow_gpus, borrow_cpu_millis,
                                                 borrow_memory_bytes) ORDER BY tenant, cluster), '[]') FROM quotas) AS quotas,
      (SELECT COALESCE(json_agg(json_build_array(tenant, weight)), '[]') FROM fair_share_weights) AS weights,
      (SELECT COALESCE(json_agg(json_build_array(cluster, n)), '[]') FROM (
          SELECT cluster, count(*) AS n FROM nodes GROUP BY cluster) c WHERE :preemption) AS nodes_per_cluster,
      (SELECT COALESCE(json_agg(json_build_array(cluster, n, preemptor)), '[]') FROM (
          SELECT cluster, count(*) AS n, details->>'preempted_by' AS preemptor FROM job_events
          WHERE to_status = 'pending' AND at > :since AND details ? 'preempted_by'
          GROUP BY cluster, details->>'preempted_by') r WHERE :preemption) AS preempted
"""


def waiting_for_room(running: Iterable[policy.Running], recent_preemptors: Iterable[str] = ()) -> list[str]:
    """The preemptors waiting for their room, sorted: the pools' heads do not count them (_NOT_WAITING). Those whose
    victims are stopping (the policy keeps their room: policy._withheld), and those that preempted within the last
    minute (`recent_preemptors`, the rate limit's window): once its victims have ended, a preemptor must still be seen
    in the pass that their release wakes, or a lower job takes the room freed for it. So the set is bounded by the
    stopping victims and the preemption rate limit. The simulator prunes its backlog by the same rule."""
    stopping_for = {job_id for attempt in running if attempt.stopping for job_id in attempt.preempted_by}
    return sorted(stopping_for | set(recent_preemptors))


def _load_backlog(session: Session, cache: SnapshotCache, now: datetime, full: list[str], include: str | None,
                  preemption: bool, waiting: Sequence[str] = (), heads: int | None = None) -> list[policy.Pending]:
    """The backlog's heads (per owner, per pool, per demand class, each at most `heads` when given; `waiting`: preemptors
    waiting for their room, read besides the pools' heads), and `include` if they left it out."""
    known, params = _backlog_params(cache, now, full, heads, waiting)
    if not full and not waiting:
        result = _BACKLOG_PLAIN.execute(session, {name: params[name] for name in _BACKLOG_PLAIN_TYPES}).all()
    elif len(cache.backlog) <= PREPARED_BACKLOG_MAX_HEADS:
        result = _BACKLOG_PREPARED.execute(session, params).all()
    else:
        result = session.execute(_BACKLOG, params).all()
    return _backlog_from(session, cache, now, known, result, include, preemption)


def _backlog_params(cache: SnapshotCache, now: datetime, full: list[str], heads: int | None,
                    waiting: Sequence[str] = ()) -> tuple[dict[str, str], dict[str, Any]]:
    """The rows the cache holds valid now ({id: version}) and the backlog statements' parameters (`known`: their JSON)."""
    known, known_json = cache.known_rows("backlog", cache.backlog, now.timestamp())
    limit = heads if heads is not None else BACKLOG_PER_POOL
    return known, {"now": now, "full": full, "per_owner": min(BACKLOG_PER_OWNER, limit), "per_pool": min(BACKLOG_PER_POOL, limit),
                   "classes": BACKLOG_DEMAND_CLASSES, "per_class": min(BACKLOG_PER_CLASS, limit), "known": known_json,
                   "waiting": list(waiting)}


def _backlog_from(session: Session, cache: SnapshotCache, now: datetime, known: dict[str, str], result: Sequence[Any],
                  include: str | None, preemption: bool) -> list[policy.Pending]:
    """The backlog from a backlog statement's rows given the cache's `known` rows, and `include` if they left it out."""
    fresh = [r for r in result if r.version is not None]
    dropped = {r.id for r in result if r.version is None}
    old = cache.backlog
    # The heads the cache holds in their version (`known`, less those no longer heads in it), then the changed ones.
    seen: dict[str, tuple[str, _Backlogged]] = {job_id: old[job_id] for job_id in known if job_id not in dropped}
    extra = []
    if include is not None and include not in seen and not any(r.id == include for r in fresh):
        extra = list(session.execute(_ONE_PENDING, {"id": include}))
    # Only a job that once ran can have been preempted (a victim is running, so claimed: started_at is set, and nothing
    # clears it): a fresh submit, most of what a pass decodes, needs no read of the events (a round trip per pass).
    preempted = _preempted_by(session, [r.id for r in fresh + extra if r.ever_started], now) if preemption else {}
    for r in fresh:
        seen[r.id] = (r.version, _pending(r, preempted.get(r.id, ())))
    cache.backlog, cache.decoded_backlog = seen, len(fresh)
    # By id: the same list with the cache as without it (the policy orders the backlog itself).
    return [seen[job_id][1].job for job_id in sorted(seen)] + [_pending(r, preempted.get(r.id, ())).job for r in extra]


def _pending(r: Any, preempted: Any) -> _Backlogged:
    """A backlog row as the policy's Pending; `preempted`: (job, at) of the preemptions of it in the window."""
    by = frozenset(job_id for job_id, _ in preempted)
    oldest = min((at for _, at in preempted), default=None)
    job = policy.Pending(
        r.id, r.owner, r.priority, r.queue, r.created_at.timestamp(), r.cpu_millis, r.memory_bytes, r.gpus,
        r.members, bool(r.has_command), r.timeout_seconds, tuple(r.gpu_types or ()), r.pool, by,
    )
    return _Backlogged(job, (oldest + PREEMPTED_BY_WINDOW).timestamp() if oldest is not None else policy.INF)


def _load_nodes(session: Session, cache: SnapshotCache, alive_since: datetime, *, preemption: bool,
                preempted_since: datetime, known_holders: str, start: PassStart | None = None, now: datetime,
                backlog: dict[str, Any] | None = None) -> tuple[dict[tuple[str, str], capacity.NodeCapacity], Any]:
    """The live, ready nodes with nothing held, by cluster and name, and the pass's small facts (_PASS_FACTS, read in
    the same round trip, with the holders changed since `known_holders` for _load_holders: `holders`). Node rows change
    at every heartbeat but what the scheduler reads of them seldom: the statement returns a digest of that, and the rows only when the digest is not the cache's. The nodes returned are
    the cache's own: never change them (copy). `start`: see load_snapshot. `backlog`: the backlog statements' parameters
    (_backlog_params): the row also carries the plain statement's backlog (_NODES_AND_BACKLOG)."""
    params = {"alive_since": alive_since, "known": cache.node_digest, "preemption": preemption,
              "since": preempted_since, "holders_known": known_holders, "now": now,
              "preempted_by_since": now - PREEMPTED_BY_WINDOW}
    statement, with_lock = (_NODES, _LOCK_PASS_AND_NODES) if backlog is None else (_NODES_AND_BACKLOG, _LOCK_PASS_AND_NODES_AND_BACKLOG)
    if backlog is not None:  # its `known` is the nodes' digest there: the backlog's travels as `backlog_known`
        params.update({name: backlog[name] for name in _BACKLOG_PLAIN_TYPES if name not in ("now", "known")},
                      backlog_known=backlog["known"])
    if start is None or start.lock_sent:
        row = statement.execute(session, params).one()
    else:
        connection = session.connection()
        _LOCK_PASS.ensure(connection)
        statement.ensure(connection)
        row = connection.execute(with_lock, {**params, **start.params()}).one()
        start.lock_sent = True  # a second read in the same pass (admit's whole heads) reads the nodes alone
    if start is not None:
        start.locked, start.next_wakeup = row.locked == "true", row.next_wakeup
        if not start.locked:
            raise _LockedOut()
    if row.rows is None and row.digest == cache.node_digest:
        return cache.nodes, row
    nodes = {(r[0], r[1]): capacity.node_of(r) for r in row.rows or ()}
    cache.nodes, cache.node_digest = nodes, row.digest
    return nodes, row


# What the scheduler reads of the live, ready nodes (capacity._nodes_query(True, ...): ready, heartbeating, neither
# cordoned nor draining), in one JSON array, its SHA-256, and the array itself only when the caller's digest differs;
# the pass's facts (_PASS_FACTS), which need nothing from the nodes; and the jobs holding capacity that changed since
# the cache's rows (_HOLDERS): one round trip for the three, in one snapshot.
_NODES_SQL = f"""
    WITH n AS (
        SELECT json_agg(json_build_array(cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, pool)
                        ORDER BY cluster, name) AS rows
        FROM nodes WHERE ready IS true AND heartbeat_at >= :alive_since AND state = 'ready'
    ), d AS (
        SELECT rows, encode(sha256(convert_to(COALESCE(rows::text, '[]'), 'UTF8')), 'hex') AS digest FROM n
    ), {_HOLDERS}
    SELECT digest, CASE WHEN digest IS DISTINCT FROM CAST(:known AS text) THEN rows END AS rows, {_PASS_FACTS},
           (SELECT holders FROM h) AS holders,
           current_setting('jobservice.pass_locked', true) AS locked,
           CASE WHEN current_setting('jobservice.pass_locked', true) = 'true' THEN
               (SELECT min(not_before) FROM jobs WHERE status = 'pending' AND not_before > :now) END AS next_wakeup
    FROM d
    """
_NODES_TYPES = {"alive_since": "timestamptz", "known": "text", "preemption": "boolean", "since": "timestamptz",
                "holders_known": "text", "now": "timestamptz", "preempted_by_since": "timestamptz"}
_NODES = Prepared("jobservice_nodes", _NODES_SQL, _NODES_TYPES)
# The admission pass's short backlog (the plain statement: no full queue, no preemptor waiting for its room, as most
# passes find), read in the nodes' round trip as one JSON array of [id, version, *columns] (version and columns null for
# a dropped one). A round trip of its own was on every admitted job's way to its worker. When the facts read with it
# show a full queue or a waiting preemptor, it is not used and the backlog is read as before (_load_backlog). Read only
# by a pass holding the lock (as `next_wakeup`): a pass locked out reads nothing more.
_BACKLOG_JSON_COLUMNS = ("id", "version", "owner", "priority", "queue", "created_at", "cpu_millis", "memory_bytes", "gpus",
                         "members", "has_command", "timeout_seconds", "gpu_types", "pool", "ever_started")
_NODES_AND_BACKLOG = Prepared(
    "jobservice_nodes_backlog",
    _NODES_SQL.replace(
        "\n    FROM d\n",
        ", CASE WHEN current_setting('jobservice.pass_locked', true) = 'true' THEN "
        f"(SELECT json_agg(json_build_array({', '.join('b.' + c for c in _BACKLOG_JSON_COLUMNS)})) FROM ("
        f"{_backlog_sql(full_or_waiting=False).replace('CAST(:known AS json)', 'CAST(:backlog_known AS json)')}) b) END AS backlog"
        "\n    FROM d\n"),
    {**_NODES_TYPES, **{name: kind for name, kind in _BACKLOG_PLAIN_TYPES.items() if name not in ("now", "known")},
     "backlog_known": "text"},
)
# _LOCK_PASS and the nodes read in one round trip. `locked`: whether this transaction's _LOCK_PASS took the lock (NULL
# or '' for a read with none: explain). `next_wakeup`, the pass's next wake-up (the earliest backoff expiry), is read
# only by a pass holding the lock: the pass itself never changes it (it admits only jobs whose backoff ended; a victim
# of a preemption has none), and a backoff set meanwhile is set by an end that wakes the scheduler again.
_LOCK_PASS_AND_NODES = text(f"{_LOCK_PASS.run_sql}; {_NODES.run_sql}")
_LOCK_PASS_AND_NODES_AND_BACKLOG = text(f"{_LOCK_PASS.run_sql}; {_NODES_AND_BACKLOG.run_sql}")


class _BacklogRow(NamedTuple):
    """A backlog row as _NODES_AND_BACKLOG returns it (in its JSON array), with the types the backlog statement's have."""

    id: str
    version: str | None
    owner: str
    priority: int
    queue: str
    created_at: datetime
    cpu_millis: int
    memory_bytes: int
    gpus: int
    members: int
    has_command: bool
    timeout_seconds: int | None
    gpu_types: list[str] | None
    pool: str | None
    ever_started: bool

    @classmethod
    def of(cls, values: list[Any]) -> "_BacklogRow":
        row = cls(*values)
        return row._replace(created_at=datetime.fromisoformat(row.created_at)) if row.version is not None else row  # type: ignore[arg-type]


def _load_holders(cache: SnapshotCache, nodes: dict[tuple[str, str], capacity.NodeCapacity], now: datetime,
                  settings: Settings, known: dict[str, str], holders_json: list[list[Any]] | None
                  ) -> tuple[list[policy.Running], dict[tuple[str, str], capacity.NodeCapacity]]:
    """Every job holding capacity, as the policy's running attempts, and `nodes` (nothing held) with what they hold
    deducted. `nodes` is left as it is. `holders_json`: what _NODES read of them given `known` (the changed and the
    dropped ones). No database work: the cache's holders are replaced by a complete read of them or not at all."""
    stamp = now.timestamp()
    result = [_HolderRow.of(values) for values in holders_json or ()]
    rows = [row for row in result if row.version is not None]
    dropped = {row.id for row in result if row.version is None}
    old = cache.holders
    # Who preempted each newly decoded holder (within the window), read with it: that job never preempts it again. (A
    # preemption is recorded in the transaction that changes the victim's row: a holder known in its version needs no
    # new read.) A holder never started (queued: admitted, not claimed yet) cannot have been preempted (see _load_backlog).
    preempted = {row.id: [(by, datetime.fromisoformat(at)) for by, at in row.preempted] for row in rows if row.preempted} \
        if settings.preemption_enabled else {}
    since = now - PREEMPTED_BY_WINDOW
    # The known holders still holding in the same version, then the changed and new ones. A known holder whose attempt
    # depends on the pass's time (queued, stopping, past its end: valid_until) is made again from its cached row, with
    # the preemptions of it still in the window; what it holds is the same (its row is), so no node is recomputed.
    seen: dict[str, tuple[str, _Held]] = {}
    for job_id in known:
        if job_id not in dropped:
            version, held = old[job_id]
            if stamp >= held.valid_until:
                held = _held(held.row, now, settings, [(by, at) for by, at in held.preempted if at > since]
                             if settings.preemption_enabled else (), before=held)
            seen[job_id] = (version, held)
    changed: list[tuple[str, _Held | None, _Held | None]] = []  # (id, what it held before, what it holds now)
    for row in rows:
        entry = (row.version, _held(row, now, settings, preempted.get(row.id, ())))
        before = old.get(row.id)
        changed.append((row.id, before[1] if before is not None else None, entry[1]))
        seen[row.id] = entry
    changed += [(job_id, old[job_id][1], None) for job_id in old.keys() - seen.keys()]  # hold nothing now, or are gone
    # By id: the same order with the cache as without it, whichever rows it held.
    running = [seen[job_id][1].attempt for job_id in sorted(seen)]
    if cache.deducted is not None and cache.deducted_base == nodes:
        deducted, on_node, recomputed = _deduct_changes(nodes, cache.deducted, cache.on_node, seen, changed)
    else:
        deducted, on_node, recomputed = _deduct_all(nodes, seen)
    cache.holders, cache.deducted, cache.deducted_base, cache.on_node = seen, deducted, nodes, on_node
    cache.recomputed_nodes, cache.decoded_holders = recomputed, len(rows)
    return running, deducted


NodeKey = tuple[str, str]


def _deduct_all(nodes: dict[NodeKey, capacity.NodeCapacity], holders: dict[str, tuple[str, _Held]]
                ) -> tuple[dict[NodeKey, capacity.NodeCapacity], dict[NodeKey, frozenset[str]], int]:
    """Every node with every holder deducted; the holders on each node."""
    deducted = {key: template.copy() for key, template in nodes.items()}
    on_node: dict[NodeKey, set[str]] = {}
    for job_id, (_, held) in holders.items():
        capacity.hold(deducted, held.holding)
        for part in held.holding:
            on_node.setdefault(part[0], set()).add(job_id)
    return deducted, {key: frozenset(ids) for key, ids in on_node.items()}, len(deducted)


def _deduct_changes(nodes: dict[NodeKey, capacity.NodeCapacity], before: dict[NodeKey, capacity.NodeCapacity],
                    on_node_before: dict[NodeKey, frozenset[str]], holders: dict[str, tuple[str, _Held]],
                    changed: list[tuple[str, "_Held | None", "_Held | None"]]
                    ) -> tuple[dict[NodeKey, capacity.NodeCapacity], dict[NodeKey, frozenset[str]], int]:
    """`before` (the same nodes with the last pass's holders deducted) brought up to date with the holders that
    changed since: each node they were or are on is recomputed from scratch (its nothing-held self and every holder
    on it now), so it is exactly what `_deduct_all` would make, whatever the changes (two holders naming the same GPU
    included). `before` and the nodes in it are left as they are."""
    if not changed:
        return before, on_node_before, 0
    on_node = dict(on_node_before)
    touched: set[NodeKey] = set()
    for job_id, old, new in changed:
        old_keys = {part[0] for part in old.holding} if old is not None else set()
        new_keys = {part[0] for part in new.holding} if new is not None else set()
        for key in old_keys - new_keys:
            on_node[key] = on_node.get(key, frozenset()) - {job_id}
        for key in new_keys - old_keys:
            on_node[key] = on_node.get(key, frozenset()) | {job_id}
        touched |= old_keys | new_keys
    deducted = dict(before)
    recomputed = 0
    for key in touched:
        template = nodes.get(key)
        if template is None:
            continue  # not a live node: what is held there is not deducted anywhere
        node = template.copy()
        one = {key: node}
        for job_id in on_node.get(key, ()):
            capacity.hold(one, holders[job_id][1].holding)
        deducted[key] = node
        recomputed += 1
    return deducted, {key: ids for key, ids in on_node.items() if ids}, recomputed


def _held(row: Any, now: datetime, settings: Settings, preempted: Any = (), before: _Held | None = None) -> _Held:
    """`row` decoded for the pass at `now`. `before`: the same row (same version) decoded by an earlier pass: what it
    holds and its attempt but for the end and who preempted it are the row's alone, so they are taken from it instead
    of parsing the placement again (the stopping and queued holders are made again every pass: hundreds after a burst
    of preemptions)."""
    preempted_by = frozenset(job_id for job_id, _ in preempted)
    if before is not None:
        attempt = dataclasses.replace(before.attempt, ends_at=_ends_at(row, now, settings), preempted_by=preempted_by)
        holding = before.holding
    else:
        attempt = running_attempt(row, now, settings, preempted_by)
        holding = capacity.holding_of(row.cluster, row.placement, row.cpu_millis, row.memory_bytes, row.gpus)
    if row.status == JobStatus.RUNNING.value and row.started_at is not None:
        # Its end depends on the pass's time only once past it (then it is "ending now"): reusable until then.
        valid_until = attempt.ends_at
    else:
        valid_until = -policy.INF  # cancelled, preempted or not started yet: "ends at now + ...", made afresh each pass
    oldest = min((at for _, at in preempted), default=None)
    if oldest is not None:  # the remembered preemption leaves the window then
        valid_until = min(valid_until, (oldest + PREEMPTED_BY_WINDOW).timestamp())
    return _Held(row, holding, attempt, valid_until, tuple(preempted))


def _preempted_by(session: Session, job_ids: list[str], now: datetime) -> dict[str, list[tuple[str, datetime]]]:
    """Who preempted each of these jobs, and when (within the window): they are never its victims in turn."""
    if not job_ids:
        return {}
    found: dict[str, list[tuple[str, datetime]]] = {}
    for job_id, by, at in session.execute(text(
        "SELECT job_id, details->>'preempted_by', at FROM job_events WHERE to_status = 'pending' AND at > :since "
        "AND details ? 'preempted_by' AND job_id = ANY(CAST(:ids AS text[]))"), {"since": now - PREEMPTED_BY_WINDOW, "ids": job_ids}):
        found.setdefault(job_id, []).append((by, at))
    return found


def running_attempt(row: Any, now: datetime, settings: Settings, preempted_by: frozenset[str] = frozenset()) -> policy.Running:
    """An attempt holding capacity, and the latest it ends: its start plus its timeout."""
    parts = tuple((part["node"], int(part["members"])) for part in row.placement or [])
    indices = tuple((part["node"], tuple(int(g) for g in part.get("gpu_indices") or [])) for part in row.placement or [])
    return policy.Running(
        row.id, row.owner, row.cluster or "", parts, row.cpu_millis, row.memory_bytes, row.gpus, _ends_at(row, now, settings),
        priority=row.priority, preemptible=bool(row.preemptible) and row.status == JobStatus.RUNNING.value,
        started_at=row.started_at.timestamp() if row.started_at else policy.INF,
        stopping=row.status == JobStatus.PENDING.value, gpu_indices=indices, queue=row.queue, preempted_by=preempted_by,
    )


def _ends_at(row: Any, now: datetime, settings: Settings) -> float:
    """The latest a holder's attempt ends, as the pass at `now` sees it."""
    if row.status == JobStatus.CANCELLED.value:
        return now.timestamp() + settings.job_lease_seconds  # released by its worker, or by recovery after the lease
    if row.status == JobStatus.PENDING.value:  # preempted: stopping within a lease renewal plus the kill grace
        return now.timestamp() + settings.job_heartbeat_seconds + settings.kill_grace_seconds
    if row.timeout_seconds:
        started = row.started_at or now  # not started yet: it may start any moment
        return max(started.timestamp() + row.timeout_seconds + settings.kill_grace_seconds, now.timestamp())
    return policy.INF


def _place(session: Session, job: Job, placement: capacity.Placement, now: datetime) -> OutboxMessage:
    job.cluster = placement.cluster
    job.node = placement.node
    job.placement = placement.as_json()
    job.gpu_indices = placement.gpu_indices
    job.holds_resources = True
    job.dispatch_token = secrets.token_hex(8)
    job.queued_at = now
    where = ", ".join(f"{node} x{members}" if members > 1 else node for node, members, _ in placement.parts)
    gpus = placement.gpu_indices
    record_transition(
        session,
        job,
        JobStatus.QUEUED,
        reason=f"admitted to {placement.cluster} ({where})" + (f" with GPUs {gpus}" if gpus else ""),
        actor="scheduler",
        at=now,
        details={"placement": job.placement},
    )
    message = OutboxMessage(
        job_id=job.id,
        task_name=EXECUTE_TASK,
        # Local jobs go to their host's worker; a Kubernetes cluster's workers share its queues.
        queue=broker_queue(job.queue, placement.cluster, placement.node if placement.cluster == capacity.LOCAL_CLUSTER else None),
        args=[job.id, job.dispatch_token],
        created_at=now,
    )
    session.add(message)
    return message


# The pass's admissions in one round trip (as `_place` does for one job, and with the same rows): the jobs
# become queued with their placement and a fresh dispatch token, each with its `queued` event and its outbox
# row, in the pass's transaction. The rows are locked (FOR UPDATE SKIP LOCKED) and pending.
# The statement sets the savepoint that undoes it when it fails, in the same round trip (begin_nested() cost a round
# trip for SAVEPOINT and one for RELEASE, in every pass that admits: the commit releases it anyway).
_PLACE_ALL_SAVEPOINT = "place_all"
_PLACE_ALL = Prepared(
    "jobservice_place_all",
    """
    WITH v AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(
            id text, cluster text, node text, placement jsonb, gpu_indices jsonb, token text, reason text,
            event_node text, broker_queue text)
    ), locked AS (
        -- A row someone holds (a cancel) is skipped, not waited for: that job is simply not admitted in this pass.
        -- ANY(:ids): the planner cannot count the JSON array's rows, and must find the jobs by primary key.
        SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS text[])) AND status = 'pending' FOR UPDATE SKIP LOCKED
    ), u AS (
        UPDATE jobs j SET cluster = v.cluster, node = v.node, placement = v.placement, gpu_indices = v.gpu_indices,
                          holds_resources = true, dispatch_token = v.token, queued_at = :now, status = 'queued',
                          status_reason = v.reason, updated_at = :now
        FROM v JOIN locked ON locked.id = v.id WHERE j.id = v.id AND j.status = 'pending'
        RETURNING j.id, j.retry_count, j.worker_id
    ), e AS (
        INSERT INTO job_events (job_id, at, from_status, to_status, reason, actor, attempt, worker_id, cluster, node, details)
        SELECT u.id, :now, 'pending', 'queued', v.reason, 'scheduler', u.retry_count, u.worker_id, v.cluster, v.event_node,
               jsonb_build_object('placement', v.placement)
        FROM u JOIN v ON v.id = u.id
    )
    INSERT INTO outbox (job_id, task_name, queue, args, created_at)
    SELECT u.id, :task, v.broker_queue, jsonb_build_array(u.id, v.token), :now FROM u JOIN v ON v.id = u.id
    RETURNING id, job_id, queue, args
    """,
    {"rows": "text", "ids": "text[]", "now": "timestamptz", "task": "text"},
    before=f"SAVEPOINT {_PLACE_ALL_SAVEPOINT}",
    # Its custom plans count the ids' array, its generic one cannot: PostgreSQL planned it again on every pass.
    plan=GENERIC_PLAN,
)


def _place_all(session: Session, placed: list[tuple[policy.Pending, capacity.Placement]], now: datetime) -> list[OutboxMessage]:
    """`_place` for many jobs at once, in Core SQL: one statement (one trigger run) locks the rows, writes the jobs,
    their events and outbox rows, instead of a SELECT FOR UPDATE, then a savepoint and three ORM writes per job.
    Returns the outbox rows to publish after the commit (not added to the session)."""
    if not placed:
        return []
    rows = []
    for job, placement in placed:
        placement_json = placement.as_json()
        where = ", ".join(f"{node} x{members}" if members > 1 else node for node, members, _ in placement.parts)
        gpus = placement.gpu_indices
        names = [str(part["node"]) for part in placement_json if part.get("node")]
        rows.append({
            "id": job.id, "cluster": placement.cluster, "node": placement.node, "placement": placement_json,
            "gpu_indices": gpus, "token": secrets.token_hex(8),
            "reason": f"admitted to {placement.cluster} ({where})" + (f" with GPUs {gpus}" if gpus else ""),
            "event_node": placement.node or ",".join(dict.fromkeys(names)) or None,
            "broker_queue": broker_queue(job.queue, placement.cluster, placement.node if placement.cluster == capacity.LOCAL_CLUSTER else None),
        })
    session.flush()  # what the ORM holds (preemptions of this pass) is written before, as it would have been
    try:
        returned = _PLACE_ALL.execute(
            session, {"rows": json.dumps(rows), "ids": [row["id"] for row in rows], "now": now, "task": EXECUTE_TASK}
        ).all()
        by_job = {row.job_id: row for row in returned}
        return [
            OutboxMessage(id=row.id, job_id=row.job_id, task_name=EXECUTE_TASK, queue=row.queue, args=list(row.args), created_at=now)
            for job, _ in placed if (row := by_job.get(job.id)) is not None
        ]
    except _INFRASTRUCTURE_ERRORS:
        raise
    except Exception:
        # Refused by the database (the savepoint, first in the statement, was set) or failed after it: everything back
        # to the savepoint, as begin_nested() did, so that the transaction (the pass's lock, accrual, preemptions) goes
        # on to write the admissions one by one.
        session.execute(text(f"ROLLBACK TO SAVEPOINT {_PLACE_ALL_SAVEPOINT}"))
        raise


def retry_delay_seconds(settings: Settings, job: Job) -> float:
    """base * multiplier ** retries, capped at RETRY_BACKOFF_MAX_SECONDS; never overflows.

    The cap holds for any row in the database (a multiplier of 1e12, infinity or NaN written before
    the API bounded it), so neither a worker nor the scheduler's recovery can raise here.
    """
    cap = max(0.0, settings.retry_backoff_max_seconds)
    multiplier = 1.0 if job.backoff_multiplier is None else float(job.backoff_multiplier)
    try:
        delay = settings.retry_backoff_base_seconds * multiplier ** max(0, job.retry_count or 0)
    except OverflowError:  # float ** int raises rather than returning infinity
        return cap
    return cap if math.isnan(delay) else min(cap, max(0.0, delay))


def end_attempt(
    session: Session,
    job: Job,
    settings: Settings,
    *,
    succeeded: bool,
    retryable: bool,
    reason: str,
    actor: str,
    exit_code: int | None = None,
    details: dict | None = None,
    now: datetime | None = None,
    requeue: bool = False,
) -> None:
    """A running job's attempt ended: success, a retry after its backoff, a requeue, or failure. Caller commits.

    `requeue`: the attempt never really started (a gang not placed whole): back to the backlog after the
    base backoff, without spending one of the job's retries.
    """
    now = now or utcnow()
    job.exit_code = exit_code
    job.holds_resources = False
    if requeue:
        delay = settings.retry_backoff_base_seconds
        record_transition(
            session, job, JobStatus.PENDING, reason=f"{reason}; requeued in {delay:g}s", actor=actor, at=now,
            details={**(details or {}), "backoff_seconds": delay},
        )
        job.not_before = now + timedelta(seconds=delay)
        clear_placement(job)
    elif succeeded:
        record_transition(session, job, JobStatus.SUCCEEDED, reason=reason, actor=actor, at=now, exit_code=exit_code, details=details)
        job.completed_at = now
    elif retryable and job.retry_count < job.max_retries:
        delay = retry_delay_seconds(settings, job)
        record_transition(
            session,
            job,
            JobStatus.PENDING,
            reason=f"{reason}; retry {job.retry_count + 1} of {job.max_retries} in {delay:g}s",
            actor=actor,
            at=now,
            exit_code=exit_code,
            details={**(details or {}), "backoff_seconds": delay},
        )
        job.retry_count += 1
        job.not_before = now + timedelta(seconds=delay)
        clear_placement(job)
    else:
        record_transition(session, job, JobStatus.FAILED, reason=reason, actor=actor, at=now, exit_code=exit_code, details=details)
        job.completed_at = now
    notify_scheduler(session, "attempt-ended")


# Errors that say the database (not the job) is in trouble: the whole tick fails and is retried.
_INFRASTRUCTURE_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError)


def isolated(session: Session, job_id: str, handle: Callable[[], T], now: datetime, step: str) -> T | None:
    """Run one job's handling in its own transaction; if it raises, end that job, not the tick.

    A job whose handling raises (a row no code path expects) is failed in a transaction of its own,
    with the error in its timeline, so the next tick does not trip over it again.
    """
    try:
        with transaction(session):
            return handle()
    except _INFRASTRUCTURE_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - one job must never stop the scheduler
        log.exception("%s failed for one job; failing that job", step, extra={"job_id": job_id})
        fail_unhandled(session, job_id, f"the scheduler could not {step} this job: {type(exc).__name__}: {exc}"[:1000], now)
        return None


def fail_unhandled(session: Session, job_id: str, reason: str, now: datetime | None = None) -> bool:
    """End a job the scheduler cannot handle: failed, with the reason in its timeline. True if it was ended."""
    now = now or utcnow()
    with transaction(session):
        job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None or JobStatus(job.status) in TERMINAL:
            return False
        record_transition(session, job, JobStatus.FAILED, reason=reason, actor="scheduler", at=now)
        job.completed_at = now
        # Its lease expired (recovery) or it never held anything (admission): nothing runs for it any more.
        job.holds_resources = False
        notify_scheduler(session, "job-failed")
        return True


def recover_lost(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Running jobs whose worker stopped heartbeating, and queued jobs whose node died, are not left hanging.

    Each job is handled in its own transaction (see `isolated`): one bad row cannot stop the others.
    """
    now = now or utcnow()
    recovered: list[str] = []
    lease = now - timedelta(seconds=settings.job_lease_seconds)
    node_lease = now - timedelta(seconds=settings.node_lease_seconds)
    node_alive = select(Node.name).where(Node.cluster == Job.cluster, Node.name == Job.node, Node.heartbeat_at >= node_lease)
    # Only local attempts die with their worker. A Kubernetes attempt's truth is in its cluster: the
    # cluster's other workers adopt it (workers/node.py) and end it only when its Job is gone or failed.
    stale_running = (Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < lease, Job.cluster == capacity.LOCAL_CLUSTER)
    orphaned_queued = (Job.status == JobStatus.QUEUED.value, Job.queued_at < node_lease, ~node_alive.exists())
    with transaction(session):
        stale_ids = list(session.scalars(select(Job.id).where(*stale_running)))
        orphaned_ids = list(session.scalars(select(Job.id).where(*orphaned_queued)))
        released = session.execute(
            update(Job)
            # Cancelled or preempted (pending) while running, and its worker went silent: nothing runs for it any more.
            .where(Job.status.in_([JobStatus.CANCELLED.value, JobStatus.PENDING.value]), Job.holds_resources, Job.heartbeat_at < lease)
            .values(holds_resources=False)
        )
        if released.rowcount:
            notify_scheduler(session, "resources-released")

    def lost(job_id: str) -> Callable[[], bool]:
        def handle() -> bool:
            job = session.scalars(select(Job).where(Job.id == job_id, *stale_running).with_for_update(skip_locked=True)).first()
            if job is None:
                return False  # it heartbeated, ended or is being handled meanwhile
            silent = (now - job.heartbeat_at).total_seconds() if job.heartbeat_at else settings.job_lease_seconds
            end_attempt(
                session, job, settings, succeeded=False, retryable=True, actor=SYSTEM, now=now,
                reason=f"worker {job.worker_id} lost: no heartbeat for {silent:.0f}s",
            )
            return True

        return handle

    def orphaned(job_id: str) -> Callable[[], bool]:
        def handle() -> bool:
            job = session.scalars(select(Job).where(Job.id == job_id, *orphaned_queued).with_for_update(skip_locked=True)).first()
            if job is None:
                return False
            node = f"{job.cluster}/{job.node}"
            record_transition(session, job, JobStatus.PENDING, reason=f"node {node} lost before the job started", actor=SYSTEM, at=now)
            clear_placement(job)
            notify_scheduler(session, "requeued")
            return True

        return handle

    for job_id in stale_ids:
        if isolated(session, job_id, lost(job_id), now, "recover"):
            recovered.append(job_id)
    for job_id in orphaned_ids:
        if isolated(session, job_id, orphaned(job_id), now, "requeue"):
            recovered.append(job_id)
    return recovered


def requeue_unclaimed(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Queued jobs no worker claimed within CLAIM_TIMEOUT_SECONDS go back to the backlog.

    Admission places a job only on a free worker slot, so a claim normally follows within milliseconds;
    a job still queued long after lost its task on the way (broker lost the message, the worker's claim
    failed, the worker process died holding it). Holding capacity requires a claim: the job releases its
    placement and gets a new admission and dispatch token, which turns any late claim of the old task
    into a no-op (the claim is a compare-and-set on the token).
    """
    now = now or utcnow()
    timeout = settings.claim_timeout_seconds
    unclaimed_filter = (Job.status == JobStatus.QUEUED.value, Job.queued_at < now - timedelta(seconds=timeout))
    with transaction(session):
        candidates = list(
            session.scalars(select(Job.id).where(*unclaimed_filter).order_by(Job.queued_at).limit(REQUEUE_BATCH))
        )

    def requeue(job_id: str) -> Callable[[], bool]:
        def handle() -> bool:
            # SKIP LOCKED: a worker claiming it right now wins.
            job = session.scalars(select(Job).where(Job.id == job_id, *unclaimed_filter).with_for_update(skip_locked=True)).first()
            if job is None:
                return False
            waited = (now - job.queued_at).total_seconds() if job.queued_at else timeout
            record_transition(
                session, job, JobStatus.PENDING, actor=SYSTEM, at=now,
                reason=f"not claimed by a worker within {timeout:g}s of its admission to {job.cluster}/{job.node or '*'}; back to the backlog",
                details={"unclaimed_seconds": round(waited, 3), "placement": job.placement},
            )
            clear_placement(job)
            session.execute(delete(OutboxMessage).where(OutboxMessage.job_id == job_id))  # a stale task: no use sending it
            notify_scheduler(session, "requeued")
            return True

        return handle

    return [job_id for job_id in candidates if isolated(session, job_id, requeue(job_id), now, "requeue the unclaimed")]


def stale_outbox(session: Session, older_than: datetime) -> list[OutboxMessage]:
    return list(session.scalars(select(OutboxMessage).where(OutboxMessage.created_at < older_than).order_by(OutboxMessage.id)))
