"""worker pools: jobs ask for GPU types and pools, nodes record their pool, demand counted by triggers

Revision ID: h12_gpu_type
Revises: h6_scheduler_state
Create Date: 2026-11-27 16:10:00

- `jobs.gpu_types`: acceptable GPU models in order of preference (NULL: any); `jobs.pool`: the worker
  pool that must run it (NULL: any). `nodes.pool`: the pool its worker serves (WORKER_POOL).
- `ix_jobs_pending_demand`: the backlog bound to a type or pool, per demand class (pool, types; '' and
  '{}' for none) in admission order: the scheduler reads the head of each class.
- `pool_demand` / `pool_demand_deltas`: pending jobs and GPUs per demand class, kept as the job counters
  of 0002_observability are (statement-level triggers append deltas, the scheduler folds them), so a
  /metrics scrape reads a few rows, never the backlog.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = 'h12_gpu_type'
down_revision = 'h10_node_state'
branch_labels = None
depends_on = None

_DEMAND = "status = 'pending' AND (pool IS NOT NULL OR gpu_types IS NOT NULL)"

# Only pending jobs bound to a type or pool count; updates that keep them so (or never were) add nothing.
COUNT_DEMAND = f"""
CREATE FUNCTION jobservice_count_pool_demand() RETURNS trigger LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pool_demand_deltas (pool, gpu_types, jobs, gpus)
        SELECT COALESCE(pool, ''), COALESCE(gpu_types, '{{}}'), count(*),
               sum(gpus::bigint * CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END)
        FROM new_jobs WHERE {_DEMAND} GROUP BY 1, 2;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO pool_demand_deltas (pool, gpu_types, jobs, gpus)
        SELECT COALESCE(pool, ''), COALESCE(gpu_types, '{{}}'), -count(*),
               -sum(gpus::bigint * CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END)
        FROM old_jobs WHERE {_DEMAND} GROUP BY 1, 2;
    ELSE
        INSERT INTO pool_demand_deltas (pool, gpu_types, jobs, gpus)
        SELECT pool, gpu_types, sum(sign), sum(sign * gpus)
        FROM (SELECT COALESCE(pool, '') AS pool, COALESCE(gpu_types, '{{}}') AS gpu_types, 1 AS sign,
                     gpus::bigint * CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END AS gpus
              FROM new_jobs WHERE {_DEMAND}
              UNION ALL
              SELECT COALESCE(pool, ''), COALESCE(gpu_types, '{{}}'), -1,
                     gpus::bigint * CASE WHEN gang_enabled THEN gang_min_members ELSE 1 END
              FROM old_jobs WHERE {_DEMAND}) AS changes
        GROUP BY 1, 2
        HAVING sum(sign) <> 0 OR sum(sign * gpus) <> 0;
    END IF;
    RETURN NULL;
END $$;
"""

RESET_DEMAND = """
CREATE FUNCTION jobservice_reset_pool_demand() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM pool_demand;
    DELETE FROM pool_demand_deltas;
    RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.add_column('jobs', sa.Column('gpu_types', postgresql.ARRAY(sa.Text()), nullable=True))
    op.add_column('jobs', sa.Column('pool', sa.Text(), nullable=True))
    op.add_column('nodes', sa.Column('pool', sa.Text(), nullable=True))
    op.create_index(
        'ix_jobs_pending_demand', 'jobs',
        [sa.text("COALESCE(pool, '')"), sa.text("COALESCE(gpu_types, '{}'::text[])"), sa.text('priority DESC'), 'created_at', 'id'],
        unique=False, postgresql_where=sa.text(_DEMAND),
    )
    op.create_table(
        'pool_demand',
        sa.Column('pool', sa.Text(), nullable=False),
        sa.Column('gpu_types', postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column('jobs', sa.BigInteger(), nullable=False),
        sa.Column('gpus', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('pool', 'gpu_types', name=op.f('pk_pool_demand')),
    )
    op.create_table(
        'pool_demand_deltas',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('pool', sa.Text(), nullable=False),
        sa.Column('gpu_types', postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column('jobs', sa.BigInteger(), nullable=False),
        sa.Column('gpus', sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_pool_demand_deltas')),
    )
    op.execute("ALTER TABLE pool_demand_deltas SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000, "
               "autovacuum_vacuum_cost_delay = 0)")
    op.execute(COUNT_DEMAND)
    op.execute(RESET_DEMAND)
    op.execute("CREATE TRIGGER jobs_pool_demand_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_count_pool_demand()")
    op.execute("CREATE TRIGGER jobs_pool_demand_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_count_pool_demand()")
    op.execute("CREATE TRIGGER jobs_pool_demand_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_count_pool_demand()")
    op.execute("CREATE TRIGGER jobs_pool_demand_truncate AFTER TRUNCATE ON jobs "
               "FOR EACH STATEMENT EXECUTE FUNCTION jobservice_reset_pool_demand()")


def downgrade() -> None:
    for trigger in ('insert', 'update', 'delete', 'truncate'):
        op.execute(f"DROP TRIGGER jobs_pool_demand_{trigger} ON jobs")
    op.execute("DROP FUNCTION jobservice_count_pool_demand()")
    op.execute("DROP FUNCTION jobservice_reset_pool_demand()")
    op.drop_table('pool_demand_deltas')
    op.drop_table('pool_demand')
    op.drop_index('ix_jobs_pending_demand', table_name='jobs', postgresql_where=sa.text(_DEMAND))
    op.drop_column('nodes', 'pool')
    op.drop_column('jobs', 'pool')
    op.drop_column('jobs', 'gpu_types')
