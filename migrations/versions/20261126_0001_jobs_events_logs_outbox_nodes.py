"""jobs, events, logs, outbox, nodes

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 03:29:14.469694
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('owner', sa.Text(), nullable=False),
    sa.Column('job_type', sa.Text(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('image', sa.Text(), nullable=True),
    sa.Column('command', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('env', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('resources', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('cpu_millis', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('gpus', sa.Integer(), server_default='0', nullable=False),
    sa.Column('gang_enabled', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('gang_min_members', sa.Integer(), server_default='1', nullable=False),
    sa.Column('timeout_seconds', sa.Integer(), nullable=True),
    sa.Column('max_retries', sa.Integer(), server_default='0', nullable=False),
    sa.Column('backoff_multiplier', sa.Float(), server_default='2', nullable=False),
    sa.Column('retry_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cluster', sa.Text(), nullable=True),
    sa.Column('node', sa.Text(), nullable=True),
    sa.Column('gpu_indices', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('placement', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('holds_resources', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('dispatch_token', sa.Text(), nullable=True),
    sa.Column('worker_id', sa.Text(), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_jobs_status_known')),
    sa.CheckConstraint('gang_min_members >= 1', name=op.f('ck_jobs_gang_min_members_positive')),
    sa.CheckConstraint('priority BETWEEN 0 AND 100', name=op.f('ck_jobs_priority_range')),
    sa.CheckConstraint('retry_count >= 0 AND max_retries >= 0', name=op.f('ck_jobs_retries_non_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index('ix_jobs_admission_order', 'jobs', [sa.literal_column('priority DESC'), 'created_at', 'id'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_jobs_holding_node', 'jobs', ['cluster', 'node'], unique=False, postgresql_where=sa.text('holds_resources'))
    op.create_index('ix_jobs_owner_created', 'jobs', ['owner', 'created_at'], unique=False)
    op.create_index('ix_jobs_pending_order', 'jobs', ['queue', sa.literal_column('priority DESC'), 'created_at', 'id'], unique=False, postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_jobs_status_created', 'jobs', ['status', 'created_at'], unique=False)
    op.create_table('nodes',
    sa.Column('cluster', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('gpu_indices', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('gpu_type', sa.Text(), nullable=True),
    sa.Column('cpu_millis', sa.BigInteger(), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('slots', sa.Integer(), nullable=False),
    sa.Column('ready', sa.Boolean(), server_default='true', nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('cluster', 'name', name=op.f('pk_nodes'))
    )
    op.create_table('job_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Text(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('from_status', sa.Text(), nullable=True),
    sa.Column('to_status', sa.Text(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('actor', sa.Text(), nullable=False),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('worker_id', sa.Text(), nullable=True),
    sa.Column('cluster', sa.Text(), nullable=True),
    sa.Column('node', sa.Text(), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('details', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_events_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_events'))
    )
    op.create_index('ix_job_events_job', 'job_events', ['job_id', 'id'], unique=False)
    op.create_table('job_log_lines',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Text(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stream', sa.Text(), nullable=False),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('member', sa.Integer(), server_default='0', nullable=False),
    sa.Column('line', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_log_lines_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_log_lines'))
    )
    op.create_index('ix_job_log_lines_at', 'job_log_lines', ['at'], unique=False)
    op.create_index('ix_job_log_lines_job', 'job_log_lines', ['job_id', 'id'], unique=False)
    op.create_table('outbox',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Text(), nullable=False),
    sa.Column('task_name', sa.Text(), nullable=False),
    sa.Column('queue', sa.Text(), nullable=False),
    sa.Column('args', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_outbox_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox'))
    )


def downgrade() -> None:
    op.drop_table('outbox')
    op.drop_index('ix_job_log_lines_job', table_name='job_log_lines')
    op.drop_index('ix_job_log_lines_at', table_name='job_log_lines')
    op.drop_table('job_log_lines')
    op.drop_index('ix_job_events_job', table_name='job_events')
    op.drop_table('job_events')
    op.drop_table('nodes')
    op.drop_index('ix_jobs_status_created', table_name='jobs')
    op.drop_index('ix_jobs_pending_order', table_name='jobs', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('ix_jobs_owner_created', table_name='jobs')
    op.drop_index('ix_jobs_admission_order', table_name='jobs', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('ix_jobs_holding_node', table_name='jobs', postgresql_where=sa.text('holds_resources'))
    op.drop_table('jobs')
