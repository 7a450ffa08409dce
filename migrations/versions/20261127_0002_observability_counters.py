"""observability: job counters, event roll-ups, backlog-entry time, indexes for the metrics

Revision ID: 0002_observability
Revises: 0001
Create Date: 2026-11-27 09:00:00

Counters are kept by PostgreSQL itself, in the transaction that changes the jobs, so they can never
drift from the rows they count, whoever writes (API, scheduler, workers, an operator's SQL):

- `job_counts` (queue, status, priority) -> count, and `job_count_deltas`, appended to by
  statement-level triggers on `jobs`. Appending never updates a shared row, so concurrent submits
  never queue behind one hot counter row; `app.domain.counters.fold` moves the deltas into
  `job_counts` periodically (the scheduler does it every sweep). Readers add both tables up in one
  statement, so they see exactly the committed jobs of their snapshot.
- `job_stats_deltas`, appended to by a statement-level trigger on `job_events`: each transition adds
  to `submitted`, `finished` (by final status), `wait` (backlog entry -> running), `dispatch` (submit
  -> first running, in ms) and `execution` (running -> end, by outcome), with the histogram bucket of
  the value (1/8 of a power of two wide, about 9%). The fold moves them into `job_stats` (count and
  sum per minute, hour and since ever) and `job_stat_buckets` (histograms since ever per queue and
  outcome, and per hour fleet-wide): finer histograms would be most of the rows and no query needs them.
Statement-level triggers with transition tables mean a bulk INSERT ... SELECT of a million rows costs
one aggregated delta row per group, not a million. JIT is off in the trigger functions: compiling
costs hundreds of milliseconds, far more than the row or two a transition carries.
"""
from alembic import op
import sqlalchemy as sa

revision = '0002_observability'
down_revision = '0001'
branch_labels = None
depends_on = None


COUNT_JOBS = """
CREATE FUNCTION jobservice_count_jobs() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_count_deltas (queue, status, priority, delta)
        SELECT queue, status, priority, count(*) FROM new_jobs GROUP BY queue, status, priority;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO job_count_deltas (queue, status, priority, delta)
        SELECT queue, status, priority, -count(*) FROM old_jobs GROUP BY queue, status, priority;
    ELSE
        -- Heartbeats and other updates that keep the status add nothing (HAVING drops zero sums).
        INSERT INTO job_count_deltas (queue, status, priority, delta)
        SELECT queue, status, priority, sum(change)
        FROM (SELECT queue, status, priority, 1 AS change FROM new_jobs
              UNION ALL
              SELECT queue, status, priority, -1 FROM old_jobs) AS changes
        GROUP BY queue, status, priority
        HAVING sum(change) <> 0;
    END IF;
    RETURN NULL;
END $$;
"""

HISTOGRAM_BUCKET = """
CREATE FUNCTION jobservice_histogram_bucket(value double precision) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT floor(8 * ln(greatest(value, 1e-6)) / ln(2))::integer
$$;
"""

ROLL_UP_EVENTS = """
CREATE FUNCTION jobservice_roll_up_events() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    INSERT INTO job_stats_deltas (minute, queue, metric, label, bucket, count, total)
    SELECT date_trunc('minute', e.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', j.queue,
           m.metric, m.label, m.bucket, count(*), sum(m.value)
    FROM new_events e
    JOIN jobs j ON j.id = e.job_id
    CROSS JOIN LATERAL (
        SELECT 'submitted'::text, ''::text, 0, 0::float8 WHERE e.from_status IS NULL
        UNION ALL
        SELECT 'finished', e.to_status, 0, 0 WHERE e.to_status IN ('succeeded', 'failed', 'cancelled')
        UNION ALL
        SELECT 'wait', '', jobservice_histogram_bucket(w.seconds), w.seconds
        FROM (SELECT greatest(extract(epoch FROM e.at - j.pending_since)::float8, 0) AS seconds) AS w
        WHERE e.to_status = 'running'
        UNION ALL
        -- Attempt 0 starts once per job: its distance from the submit is the dispatch latency.
        SELECT 'dispatch', '', jobservice_histogram_bucket(d.ms), d.ms
        FROM (SELECT greatest(extract(epoch FROM e.at - j.created_at)::float8 * 1000, 0) AS ms) AS d
        WHERE e.to_status = 'running' AND e.attempt = 0
        UNION ALL
        -- The attempt's start is still on the job row (claim sets started_at; ending leaves it).
        SELECT 'execution', e.to_status, jobservice_histogram_bucket(x.seconds), x.seconds
        FROM (SELECT greatest(extract(epoch FROM e.at - coalesce(j.started_at, e.at))::float8, 0) AS seconds) AS x
        WHERE e.from_status = 'running'
    ) AS m(metric, label, bucket, value)
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END $$;
"""

# TRUNCATE fires no row or statement DML trigger: without these the counters would outlive the rows.
RESET_COUNTS = """
CREATE FUNCTION jobservice_reset_job_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_counts;
    DELETE FROM job_count_deltas;
    RETURN NULL;
END $$;
"""

RESET_STATS = """
CREATE FUNCTION jobservice_reset_job_stats() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_stats;
    DELETE FROM job_stat_buckets;
    DELETE FROM job_stats_deltas;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    # When a job entered the backlog: its submit, or its latest return to pending (retry, lost node).
    op.add_column('jobs', sa.Column('pending_since', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET pending_since = COALESCE(updated_at, created_at) WHERE status = 'pending'")
    op.execute("UPDATE jobs SET pending_since = created_at WHERE pending_since IS NULL")
    op.alter_column('jobs', 'pending_since', nullable=False, server_default=sa.text('now()'))
    op.create_index('ix_jobs_pending_since', 'jobs', ['queue', 'pending_since'], unique=False,
                    postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_job_events_to_status_at', 'job_events', ['to_status', 'at'], unique=False)

    op.create_table('job_counts',
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('queue', 'status', 'priority', name=op.f('pk_job_counts'))
    )
    op.create_table('job_count_deltas',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('delta', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_count_deltas'))
    )
    op.create_table('job_stats',
    sa.Column('span', sa.Text(), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('metric', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.Float(), nullable=False),
    sa.CheckConstraint("span IN ('minute', 'hour', 'total')", name=op.f('ck_job_stats_span_known')),
    sa.PrimaryKeyConstraint('span', 'period_start', 'queue', 'metric', 'label', name=op.f('pk_job_stats'))
    )
    op.create_index('ix_job_stats_metric', 'job_stats', ['span', 'metric', 'period_start'], unique=False)
    op.create_table('job_stat_buckets',
    sa.Column('span', sa.Text(), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('metric', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('bucket', sa.Integer(), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.Float(), nullable=False),
    sa.CheckConstraint("span IN ('hour', 'total')", name=op.f('ck_job_stat_buckets_span_known')),
    sa.PrimaryKeyConstraint('span', 'period_start', 'queue', 'metric', 'label', 'bucket', name=op.f('pk_job_stat_buckets'))
    )
    op.create_table('job_stats_deltas',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('minute', sa.DateTime(timezone=True), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('metric', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('bucket', sa.Integer(), nullable=False),
    sa.Column('count', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_stats_deltas'))
    )

    # The delta tables are queues (appended to, emptied by every fold): vacuum them often, or their
    # dead rows would make each read scan pages of nothing.
    for table in ('job_count_deltas', 'job_stats_deltas'):
        op.execute(f"ALTER TABLE {table} SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, "
                   "autovacuum_vacuum_cost_delay = 0)")

    # The counters start from the rows already there; event roll-ups start now (history before
    # this migration is not rolled up, so the 24 h figures fill in over the first day).
    op.execute(
        "INSERT INTO job_counts (queue, status, priority, count) "
        "SELECT queue, status, priority, count(*) FROM jobs GROUP BY queue, status, priority"
    )
    op.execute(COUNT_JOBS)
    op.execute(HISTOGRAM_BUCKET)
    op.execute(ROLL_UP_EVENTS)
    op.execute(RESET_COUNTS)
    op.execute(RESET_STATS)
    op.execute("CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_count_jobs()")
    op.execute("CREATE TRIGGER jobs_count_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_count_jobs()")
    op.execute("CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_count_jobs()")
    op.execute("CREATE TRIGGER jobs_count_truncate AFTER TRUNCATE ON jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_reset_job_counts()")
    op.execute("CREATE TRIGGER job_events_roll_up AFTER INSERT ON job_events REFERENCING NEW TABLE AS new_events "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_roll_up_events()")
    op.execute("CREATE TRIGGER job_events_truncate AFTER TRUNCATE ON job_events "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_reset_job_stats()")


def downgrade() -> None:
    op.execute("DROP TRIGGER job_events_truncate ON job_events")
    op.execute("DROP TRIGGER job_events_roll_up ON job_events")
    op.execute("DROP TRIGGER jobs_count_truncate ON jobs")
    op.execute("DROP TRIGGER jobs_count_delete ON jobs")
    op.execute("DROP TRIGGER jobs_count_update ON jobs")
    op.execute("DROP TRIGGER jobs_count_insert ON jobs")
    op.execute("DROP FUNCTION jobservice_reset_job_stats()")
    op.execute("DROP FUNCTION jobservice_reset_job_counts()")
    op.execute("DROP FUNCTION jobservice_roll_up_events()")
    op.execute("DROP FUNCTION jobservice_histogram_bucket(double precision)")
    op.execute("DROP FUNCTION jobservice_count_jobs()")
    op.drop_table('job_stats_deltas')
    op.drop_table('job_stat_buckets')
    op.drop_index('ix_job_stats_metric', table_name='job_stats')
    op.drop_table('job_stats')
    op.drop_table('job_count_deltas')
    op.drop_table('job_counts')
    op.drop_index('ix_job_events_to_status_at', table_name='job_events')
    op.drop_index('ix_jobs_pending_since', table_name='jobs', postgresql_where=sa.text("status = 'pending'"))
    op.drop_column('jobs', 'pending_since')
