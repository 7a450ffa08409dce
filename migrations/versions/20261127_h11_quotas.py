"""quotas per tenant (nominal GPUs, CPU, memory per cluster or fleet-wide, and a borrowing limit) and their audit

Revision ID: h11_quotas
Revises: h6_scheduler_state
Create Date: 2026-11-27 16:00:00

- `quotas`: one row per (tenant, cluster); cluster '*' is fleet-wide. A NULL amount is not limited;
  the borrowing limits are what the tenant may use beyond its nominal quota while capacity is idle.
- `quota_changes`: who changed which tenant's quotas when, with the rows before and after.
- `jobs.preemptible`: false keeps a running job from being preempted by higher-priority work.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = 'h11_quotas'
down_revision = 'h12_gpu_type'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'quotas',
        sa.Column('tenant', sa.Text(), nullable=False),
        sa.Column('cluster', sa.Text(), nullable=False),
        sa.Column('gpus', sa.BigInteger(), nullable=True),
        sa.Column('cpu_millis', sa.BigInteger(), nullable=True),
        sa.Column('memory_bytes', sa.BigInteger(), nullable=True),
        sa.Column('borrow_gpus', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('borrow_cpu_millis', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('borrow_memory_bytes', sa.BigInteger(), nullable=False, server_default='0'),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_by', sa.Text(), nullable=False),
        sa.CheckConstraint(
            'COALESCE(gpus, 0) >= 0 AND COALESCE(cpu_millis, 0) >= 0 AND COALESCE(memory_bytes, 0) >= 0 '
            'AND borrow_gpus >= 0 AND borrow_cpu_millis >= 0 AND borrow_memory_bytes >= 0',
            name=op.f('ck_quotas_non_negative'),
        ),
        sa.PrimaryKeyConstraint('tenant', 'cluster', name=op.f('pk_quotas')),
    )
    op.create_table(
        'quota_changes',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('tenant', sa.Text(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.Text(), nullable=False),
        sa.Column('action', sa.Text(), nullable=False),
        sa.Column('before', postgresql.JSONB(astext_type=sa.Text()), nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column('after', postgresql.JSONB(astext_type=sa.Text()), nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_quota_changes')),
    )
    op.create_index('ix_quota_changes_tenant', 'quota_changes', ['tenant', 'id'], unique=False)
    op.add_column('jobs', sa.Column('preemptible', sa.Boolean(), nullable=False, server_default='true'))


def downgrade() -> None:
    op.drop_column('jobs', 'preemptible')
    op.drop_index('ix_quota_changes_tenant', table_name='quota_changes')
    op.drop_table('quota_changes')
    op.drop_table('quotas')
