"""idempotency keys of submissions (POST /jobs/, /jobs/batch)

Revision ID: h8_idempotency
Revises: 0002_observability
Create Date: 2026-11-27 15:30:00

One row per (caller, Idempotency-Key) with a fingerprint of the request and the answer it got. The
primary key is the concurrency guard: the row is inserted in the submit's own transaction, so of two
racing requests with one key the second waits for the first to commit and then replays its answer.
Expired rows are purged hourly by the scheduler and replaced lazily when their key is reused.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = 'h8_idempotency'
down_revision = 'h7_takeover_events'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('idempotency_keys',
    sa.Column('owner', sa.Text(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('fingerprint', sa.Text(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('owner', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_index('ix_idempotency_keys_expires_at', 'idempotency_keys', ['expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_idempotency_keys_expires_at', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
