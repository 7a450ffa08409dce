"""scheduler state: pass heartbeats (readiness), fair-share usage per owner, the backlog per owner

Revision ID: h6_scheduler_state
Revises: 0002_observability
Create Date: 2026-11-27 15:00:00

- `scheduler_heartbeats`: one row per scheduler process, its last successful pass; every API process
  reads it for the `scheduler` readiness check.
- `fair_share_usage`: each owner's decayed resource-seconds (GPU, CPU, memory), accrued by the
  admitting scheduler; `scheduler_state` remembers when usage was last accrued.
- `jobs.tenant`: whom fair share counts a job for (the JWT_TENANT_CLAIM of its submitter; NULL: its owner).
- `ix_jobs_pending_owner`: each fair-share owner's (COALESCE(tenant, owner)) backlog in admission order, so the scheduler reads the head of
  every owner's backlog without sorting the whole backlog; `ix_jobs_pending_gpu` / `_cpu`: the head
  of each pool (GPU jobs, CPU-only jobs) in admission order; `ix_jobs_pending_retry`: the next backoff
  to end (the scheduler's next wake-up) without scanning the backlog.
"""
from alembic import op
import sqlalchemy as sa

revision = 'h6_scheduler_state'
down_revision = '0002_observability'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'scheduler_heartbeats',
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_pass_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_error_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_scheduler_heartbeats')),
    )
    op.create_table(
        'fair_share_usage',
        sa.Column('owner', sa.Text(), nullable=False),
        sa.Column('gpu_seconds', sa.Float(), nullable=False, server_default='0'),
        sa.Column('cpu_seconds', sa.Float(), nullable=False, server_default='0'),
        sa.Column('memory_gib_seconds', sa.Float(), nullable=False, server_default='0'),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('owner', name=op.f('pk_fair_share_usage')),
    )
    op.create_table(
        'scheduler_state',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('usage_accrued_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint('id = 1', name=op.f('ck_scheduler_state_single_row')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_scheduler_state')),
    )
    op.add_column('jobs', sa.Column('tenant', sa.Text(), nullable=True))
    op.create_index(
        'ix_jobs_pending_owner', 'jobs', [sa.text('COALESCE(tenant, owner)'), sa.text('priority DESC'), 'created_at', 'id'], unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index('ix_jobs_pending_gpu', 'jobs', [sa.text('priority DESC'), 'created_at', 'id'], unique=False,
                    postgresql_where=sa.text("status = 'pending' AND gpus > 0"))
    op.create_index('ix_jobs_pending_retry', 'jobs', ['not_before'], unique=False,
                    postgresql_where=sa.text("status = 'pending' AND not_before IS NOT NULL"))
    op.create_index('ix_jobs_pending_cpu', 'jobs', [sa.text('priority DESC'), 'created_at', 'id'], unique=False,
                    postgresql_where=sa.text("status = 'pending' AND gpus = 0"))


def downgrade() -> None:
    op.drop_index('ix_jobs_pending_retry', table_name='jobs', postgresql_where=sa.text("status = 'pending' AND not_before IS NOT NULL"))
    op.drop_index('ix_jobs_pending_cpu', table_name='jobs', postgresql_where=sa.text("status = 'pending' AND gpus = 0"))
    op.drop_index('ix_jobs_pending_gpu', table_name='jobs', postgresql_where=sa.text("status = 'pending' AND gpus > 0"))
    op.drop_index('ix_jobs_pending_owner', table_name='jobs', postgresql_where=sa.text("status = 'pending'"))
    op.drop_table('scheduler_state')
    op.drop_table('fair_share_usage')
    op.drop_table('scheduler_heartbeats')
    op.drop_column('jobs', 'tenant')
