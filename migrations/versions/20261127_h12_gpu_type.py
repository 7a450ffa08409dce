"""worker pools: jobs ask for GPU types and pools, nodes record their pool

Revision ID: h12_gpu_type
Revises: h6_scheduler_state
Create Date: 2026-11-27 16:10:00

- `jobs.gpu_types`: acceptable GPU models in order of preference (NULL: any); `jobs.pool`: the worker
  pool that must run it (NULL: any). `nodes.pool`: the pool its worker serves (WORKER_POOL).
- `ix_jobs_pending_demand`: the backlog of jobs bound to a type or pool, by demand class, with what the
  per-pool metrics sum (index-only), so a scrape reads only that part of the backlog.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = 'h12_gpu_type'
down_revision = 'h6_scheduler_state'
branch_labels = None
depends_on = None

_DEMAND = "status = 'pending' AND (pool IS NOT NULL OR gpu_types IS NOT NULL)"


def upgrade() -> None:
    op.add_column('jobs', sa.Column('gpu_types', postgresql.ARRAY(sa.Text()), nullable=True))
    op.add_column('jobs', sa.Column('pool', sa.Text(), nullable=True))
    op.add_column('nodes', sa.Column('pool', sa.Text(), nullable=True))
    op.create_index(
        'ix_jobs_pending_demand', 'jobs', ['pool', 'gpu_types', sa.text('priority DESC'), 'created_at', 'id'], unique=False,
        postgresql_include=['gpus', 'gang_enabled', 'gang_min_members'], postgresql_where=sa.text(_DEMAND),
    )


def downgrade() -> None:
    op.drop_index('ix_jobs_pending_demand', table_name='jobs', postgresql_where=sa.text(_DEMAND))
    op.drop_column('nodes', 'pool')
    op.drop_column('jobs', 'pool')
    op.drop_column('jobs', 'gpu_types')
