"""Database tables. Plain SQLAlchemy 2: shared by the API, the scheduler and the workers."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.domain.states import ALL_STATES

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, datetime: DateTime(timezone=True)}


_states_sql = ", ".join(f"'{s}'" for s in ALL_STATES)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_states_sql})", name="status_known"),
        CheckConstraint("priority BETWEEN 0 AND 100", name="priority_range"),
        CheckConstraint("gang_min_members >= 1", name="gang_min_members_positive"),
        CheckConstraint("retry_count >= 0 AND max_retries >= 0", name="retries_non_negative"),
        # The backlog, in admission order: serves the scheduler and queue_position.
        Index(
            "ix_jobs_pending_order",
            "queue",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        # The scheduler's walk over the whole backlog: strict priority, then age, across queues.
        Index(
            "ix_jobs_admission_order",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_jobs_owner_created", "owner", "created_at"),
        # Each owner's backlog in admission order: the scheduler reads the head of each (fair share).
        Index(
            "ix_jobs_pending_owner",
            text("COALESCE(tenant, owner)"),
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text("status = 'pending'"),
        ),
        # The head of each pool's backlog (GPU jobs, CPU-only jobs), in admission order.
        Index("ix_jobs_pending_gpu", text("priority DESC"), "created_at", "id", postgresql_where=text("status = 'pending' AND gpus > 0")),
        Index("ix_jobs_pending_retry", "not_before", postgresql_where=text("status = 'pending' AND not_before IS NOT NULL")),
        Index("ix_jobs_pending_cpu", text("priority DESC"), "created_at", "id", postgresql_where=text("status = 'pending' AND gpus = 0")),
        Index("ix_jobs_status_created", "status", "created_at"),
        Index("ix_jobs_holding_node", "cluster", "node", postgresql_where=text("holds_resources")),
        # The oldest job of each queue's backlog (GET /queues/): one index probe per queue.
        # The backlog bound to a GPU type or pool, per demand class in admission order: the scheduler reads
        # the head of each class (pool_demand lists the classes).
        Index(
            "ix_jobs_pending_demand", text("COALESCE(pool, '')"), text("COALESCE(gpu_types, '{}'::text[])"),
            text("priority DESC"), "created_at", "id",
            postgresql_where=text("status = 'pending' AND (pool IS NOT NULL OR gpu_types IS NOT NULL)"),
        ),
        Index("ix_jobs_pending_since", "queue", "pending_since", postgresql_where=text("status = 'pending'")),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    owner: Mapped[str] = mapped_column(Text)
    # Whom fair share counts the job for (JWT_TENANT_CLAIM); None: its owner.
    tenant: Mapped[str | None] = mapped_column(Text)
    job_type: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    status_reason: Mapped[str | None] = mapped_column(Text)

    image: Mapped[str | None] = mapped_column(Text)
    command: Mapped[list[Any] | None] = mapped_column(JSONB)
    env: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    config: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    resources: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    cpu_millis: Mapped[int] = mapped_column(BigInteger, server_default="0")
    memory_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    gpus: Mapped[int] = mapped_column(Integer, server_default="0")
    # Acceptable GPU models, preferred first (NULL: any), and the worker pool that must run it (NULL: any).
    gpu_types: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    pool: Mapped[str | None] = mapped_column(Text)
    gang_enabled: Mapped[bool] = mapped_column(Boolean, server_default="false")
    gang_min_members: Mapped[int] = mapped_column(Integer, server_default="1")
    timeout_seconds: Mapped[int | None] = mapped_column(Integer)
    max_retries: Mapped[int] = mapped_column(Integer, server_default="0")
    backoff_multiplier: Mapped[float] = mapped_column(Float, server_default="2")
    retry_count: Mapped[int] = mapped_column(Integer, server_default="0")
    # False: higher-priority work never preempts it (admins only above PREEMPTION_PROTECT_PRIORITY).
    preemptible: Mapped[bool] = mapped_column(Boolean, server_default="true")

    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # When it entered the backlog: its submit, or its latest return to pending (a retry, a lost node).
    pending_since: Mapped[datetime] = mapped_column(server_default=func.now())
    not_before: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]

    # Placement, set at admission; the dispatch token makes each admission's task unique.
    cluster: Mapped[str | None] = mapped_column(Text)
    node: Mapped[str | None] = mapped_column(Text)
    gpu_indices: Mapped[list[Any] | None] = mapped_column(JSONB)
    # Where the members were placed: [{"node", "members", "gpu_indices"}]; a Kubernetes gang may span nodes.
    placement: Mapped[list[Any] | None] = mapped_column(JSONB)
    # True from admission until the attempt's processes are gone (a cancelled job may still be stopping).
    holds_resources: Mapped[bool] = mapped_column(Boolean, server_default="false")
    dispatch_token: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)


class JobEvent(Base):
    """One row per state transition: the job's timeline."""

    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job", "job_id", "id"),
        Index("ix_job_events_to_status_at", "to_status", "at"),  # recent throughput (GET /metrics/)
        # Preemptions (the scheduler reads the last minute's every pass): without it, every submit of the minute
        # (`pending` too) is scanned for the key.
        Index("ix_job_events_preemptions", "at", postgresql_where=text("to_status = 'pending' AND details ? 'preempted_by'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(Text, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    from_status: Mapped[str | None] = mapped_column(Text)
    to_status: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    worker_id: Mapped[str | None] = mapped_column(Text)
    cluster: Mapped[str | None] = mapped_column(Text)
    node: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class JobLogLine(Base):
    """A line of a job's stdout/stderr; the id orders lines and serves as the SSE event id."""

    __tablename__ = "job_log_lines"
    __table_args__ = (
        Index("ix_job_log_lines_job", "job_id", "id"),
        Index("ix_job_log_lines_at", "at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(Text, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime]
    stream: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    member: Mapped[int] = mapped_column(Integer, server_default="0")
    line: Mapped[str] = mapped_column(Text)


class OutboxMessage(Base):
    """A task to publish, written in the same transaction as the admission it belongs to."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(Text, ForeignKey("jobs.id", ondelete="CASCADE"))
    task_name: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text)
    args: Mapped[list[Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


NODE_STATES = ("ready", "cordoned", "draining")


class Node(Base):
    """A place jobs run: a worker host of the `local` cluster, or a Kubernetes node."""

    __tablename__ = "nodes"
    __table_args__ = (CheckConstraint("state IN ('ready', 'cordoned', 'draining')", name="state_known"),)

    cluster: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    gpu_indices: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    gpu_type: Mapped[str | None] = mapped_column(Text)
    pool: Mapped[str | None] = mapped_column(Text)  # the worker pool serving it (WORKER_POOL)
    cpu_millis: Mapped[int] = mapped_column(BigInteger)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    slots: Mapped[int] = mapped_column(Integer)
    ready: Mapped[bool] = mapped_column(Boolean, server_default="true")
    heartbeat_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # Set by operators (app.domain.nodes) and by a stopping worker; a worker's join and heartbeats keep it.
    state: Mapped[str] = mapped_column(Text, server_default="ready")
    state_reason: Mapped[str | None] = mapped_column(Text)
    state_by: Mapped[str | None] = mapped_column(Text)
    state_at: Mapped[datetime | None]
    # While draining: running jobs still there after this are stopped and requeued by their worker.
    drain_deadline: Mapped[datetime | None]


class NodeEvent(Base):
    """Audit of node state changes: who cordoned, drained or uncordoned which node, when and why."""

    __tablename__ = "node_events"
    __table_args__ = (Index("ix_node_events_node", "cluster", "node", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(server_default=func.now())
    cluster: Mapped[str] = mapped_column(Text)
    node: Mapped[str] = mapped_column(Text)
    from_state: Mapped[str | None] = mapped_column(Text)
    to_state: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))


class SchedulerHeartbeat(Base):
    """One row per scheduler process: when its last pass succeeded (the `scheduler` readiness check)."""

    __tablename__ = "scheduler_heartbeats"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    started_at: Mapped[datetime]
    last_pass_at: Mapped[datetime | None]
    last_error_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class FairShareUsage(Base):
    """An owner's decayed resource-seconds as of `updated_at` (decay applies from then on)."""

    __tablename__ = "fair_share_usage"

    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, server_default="0")
    cpu_seconds: Mapped[float] = mapped_column(Float, server_default="0")
    memory_gib_seconds: Mapped[float] = mapped_column(Float, server_default="0")
    updated_at: Mapped[datetime]


class SchedulerState(Base):
    """A single row: when usage was last accrued (by whichever scheduler held the admission lock)."""

    __tablename__ = "scheduler_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    usage_accrued_at: Mapped[datetime | None]


class QuotaRow(Base):
    """A tenant's nominal quota on one cluster ('*': the whole fleet) and what it may borrow beyond it."""

    __tablename__ = "quotas"
    __table_args__ = (
        CheckConstraint(
            "COALESCE(gpus, 0) >= 0 AND COALESCE(cpu_millis, 0) >= 0 AND COALESCE(memory_bytes, 0) >= 0 "
            "AND borrow_gpus >= 0 AND borrow_cpu_millis >= 0 AND borrow_memory_bytes >= 0",
            name="non_negative",
        ),
    )

    tenant: Mapped[str] = mapped_column(Text, primary_key=True)
    cluster: Mapped[str] = mapped_column(Text, primary_key=True)
    # None: that resource is not limited.
    gpus: Mapped[int | None] = mapped_column(BigInteger)
    cpu_millis: Mapped[int | None] = mapped_column(BigInteger)
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    borrow_gpus: Mapped[int] = mapped_column(BigInteger, server_default="0")
    borrow_cpu_millis: Mapped[int] = mapped_column(BigInteger, server_default="0")
    borrow_memory_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(Text)


class QuotaChange(Base):
    """The audit of quota changes: who set (or removed) which tenant's quotas, when, before and after."""

    __tablename__ = "quota_changes"
    __table_args__ = (Index("ix_quota_changes_tenant", "tenant", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    before: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    after: Mapped[list[Any]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))


class FairShareWeight(Base):
    """A tenant's fair-share weight set by an admin; it wins over FAIR_SHARE_WEIGHTS (the default)."""

    __tablename__ = "fair_share_weights"
    __table_args__ = (CheckConstraint("weight >= 0.001 AND weight <= 1000", name="bounded"),)

    tenant: Mapped[str] = mapped_column(Text, primary_key=True)
    weight: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(Text)


class FairShareWeightChange(Base):
    """The audit of weight changes: who set (or removed) which tenant's weight, when, before and after (None: not set)."""

    __tablename__ = "fair_share_weight_changes"
    __table_args__ = (Index("ix_fair_share_weight_changes_tenant", "tenant", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    before: Mapped[float | None] = mapped_column(Float)
    after: Mapped[float | None] = mapped_column(Float)


# --- Counters and roll-ups, maintained by PostgreSQL triggers (migration 0002_observability) -----
# Triggers on `jobs` and `job_events` append to the *_deltas tables in the writer's transaction;
# app.domain.counters.fold moves the deltas into the folded tables. Readers add both up.


class PoolDemand(Base):
    """Pending jobs bound to a pool or GPU types, and their GPUs, per demand class ('' / '{}': none)."""

    __tablename__ = "pool_demand"

    pool: Mapped[str] = mapped_column(Text, primary_key=True)
    gpu_types: Mapped[list[str]] = mapped_column(ARRAY(Text), primary_key=True)
    jobs: Mapped[int] = mapped_column(BigInteger)
    gpus: Mapped[int] = mapped_column(BigInteger)


class PoolDemandDelta(Base):
    __tablename__ = "pool_demand_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    pool: Mapped[str] = mapped_column(Text)
    gpu_types: Mapped[list[str]] = mapped_column(ARRAY(Text))
    jobs: Mapped[int] = mapped_column(BigInteger)
    gpus: Mapped[int] = mapped_column(BigInteger)


class JobCount(Base):
    __tablename__ = "job_counts"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text, primary_key=True)
    priority: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class JobCountDelta(Base):
    __tablename__ = "job_count_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)
    delta: Mapped[int] = mapped_column(BigInteger)


class JobStat(Base):
    """Roll-up of job events per minute, per hour and since ever: count and sum of each metric."""

    __tablename__ = "job_stats"
    __table_args__ = (
        CheckConstraint("span IN ('minute', 'hour', 'total')", name="span_known"),
        Index("ix_job_stats_metric", "span", "metric", "period_start"),
    )

    span: Mapped[str] = mapped_column(Text, primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    metric: Mapped[str] = mapped_column(Text, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[float] = mapped_column(Float)


class JobStatBucket(Base):
    """Histograms of the timed metrics per hour and since ever (percentiles, Prometheus buckets)."""

    __tablename__ = "job_stat_buckets"
    __table_args__ = (CheckConstraint("span IN ('hour', 'total')", name="span_known"),)

    span: Mapped[str] = mapped_column(Text, primary_key=True)
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    metric: Mapped[str] = mapped_column(Text, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[float] = mapped_column(Float)


class JobStatDelta(Base):
    __tablename__ = "job_stats_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    minute: Mapped[datetime]
    queue: Mapped[str] = mapped_column(Text)
    metric: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(Text)
    bucket: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[float] = mapped_column(Float)


class IdempotencyKey(Base):
    """A submission's `Idempotency-Key`, per caller, with the answer it got: a retry gets the same answer."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    # The primary key is what makes two racing requests with one key create one set of jobs.
    owner: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text)  # sha256 of the operation and its canonical JSON body
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime]
