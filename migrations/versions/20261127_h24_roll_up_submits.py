"""roll-up of submits: a batch's `submitted` events are counted without the per-event lateral of the other metrics

Revision ID: h24_roll_up_submits
Revises: h11_quotas
Create Date: 2026-11-27 18:45:00

The statement trigger on `job_events` ran, for every event of the statement, a LATERAL of five branches
(submitted, finished, wait, dispatch, execution) against its job's row. A submit's events can only be
`submitted` ones: they are now counted by a plain join and GROUP BY, and the other metrics read only the
events that can yield one (into or out of `running`, or into an end state). The deltas written are the
same; the trigger itself stays. Measured with EXPLAIN ANALYZE on a 1,000-job submit (one statement): the
trigger took 31-79 ms before, 10-24 ms after (shared 2-core box, load 4-5).
"""
from __future__ import annotations

from alembic import op

revision = 'h24_roll_up_submits'
down_revision = 'h21_tenant_weights'
branch_labels = None
depends_on = None

SPLIT = """
CREATE OR REPLACE FUNCTION jobservice_roll_up_events() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    -- Submits (from no state): one row per minute and queue; no lateral per event.
    INSERT INTO job_stats_deltas (minute, queue, metric, label, bucket, count, total)
    SELECT date_trunc('minute', e.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', j.queue, 'submitted', '', 0, count(*), 0::float8
    FROM new_events e
    JOIN jobs j ON j.id = e.job_id
    WHERE e.from_status IS NULL
    GROUP BY 1, 2;
    -- The other metrics, from the events that can yield one (the WHERE is the union of the branches' conditions).
    INSERT INTO job_stats_deltas (minute, queue, metric, label, bucket, count, total)
    SELECT date_trunc('minute', e.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', j.queue,
           m.metric, m.label, m.bucket, count(*), sum(m.value)
    FROM new_events e
    JOIN jobs j ON j.id = e.job_id
    CROSS JOIN LATERAL (
        SELECT 'finished'::text, e.to_status, 0, 0::float8 WHERE e.to_status IN ('succeeded', 'failed', 'cancelled')
        UNION ALL
        SELECT 'wait', '', jobservice_histogram_bucket(w.seconds), w.seconds
        FROM (SELECT greatest(extract(epoch FROM e.at - j.pending_since)::float8, 0) AS seconds) AS w
        WHERE e.to_status = 'running' AND e.from_status IS DISTINCT FROM 'running'
        UNION ALL
        -- Attempt 0 starts once per job: its distance from the submit is the dispatch latency.
        SELECT 'dispatch', '', jobservice_histogram_bucket(d.ms), d.ms
        FROM (SELECT greatest(extract(epoch FROM e.at - j.created_at)::float8 * 1000, 0) AS ms) AS d
        WHERE e.to_status = 'running' AND e.attempt = 0 AND e.from_status IS DISTINCT FROM 'running'
        UNION ALL
        -- The attempt's start is still on the job row (claim sets started_at; ending leaves it).
        SELECT 'execution', e.to_status, jobservice_histogram_bucket(x.seconds), x.seconds
        FROM (SELECT greatest(extract(epoch FROM e.at - coalesce(j.started_at, e.at))::float8, 0) AS seconds) AS x
        WHERE e.from_status = 'running' AND e.to_status <> 'running'
    ) AS m(metric, label, bucket, value)
    WHERE e.to_status IN ('succeeded', 'failed', 'cancelled', 'running') OR e.from_status = 'running'
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END $$;
"""

# h7_takeover_events' function, as it was.
PREVIOUS = """
CREATE OR REPLACE FUNCTION jobservice_roll_up_events() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
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
        WHERE e.to_status = 'running' AND e.from_status IS DISTINCT FROM 'running'
        UNION ALL
        -- Attempt 0 starts once per job: its distance from the submit is the dispatch latency.
        SELECT 'dispatch', '', jobservice_histogram_bucket(d.ms), d.ms
        FROM (SELECT greatest(extract(epoch FROM e.at - j.created_at)::float8 * 1000, 0) AS ms) AS d
        WHERE e.to_status = 'running' AND e.attempt = 0 AND e.from_status IS DISTINCT FROM 'running'
        UNION ALL
        -- The attempt's start is still on the job row (claim sets started_at; ending leaves it).
        SELECT 'execution', e.to_status, jobservice_histogram_bucket(x.seconds), x.seconds
        FROM (SELECT greatest(extract(epoch FROM e.at - coalesce(j.started_at, e.at))::float8, 0) AS seconds) AS x
        WHERE e.from_status = 'running' AND e.to_status <> 'running'
    ) AS m(metric, label, bucket, value)
    GROUP BY 1, 2, 3, 4, 5;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.execute(SPLIT)


def downgrade() -> None:
    op.execute(PREVIOUS)
