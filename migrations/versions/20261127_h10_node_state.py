"""node state: operators cordon and drain nodes; an audit row for each change

Revision ID: h10_node_state
Revises: 0002_observability
Create Date: 2026-11-27 16:00:00

`nodes.state` is what the scheduler may do with a node: `ready` (place jobs), `cordoned` (place nothing
new), `draining` (place nothing new; its running jobs are stopped and requeued once `drain_deadline`
passes). `node_events` records who changed a node's state, when and why (it outlives the node's row).
"""
from alembic import op
import sqlalchemy as sa

revision = 'h10_node_state'
down_revision = 'h8_idempotency'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('nodes', sa.Column('state', sa.Text(), server_default='ready', nullable=False))
    op.add_column('nodes', sa.Column('state_reason', sa.Text(), nullable=True))
    op.add_column('nodes', sa.Column('state_by', sa.Text(), nullable=True))
    op.add_column('nodes', sa.Column('state_at', sa.DateTime(timezone=True), nullable=True))
    op.add_column('nodes', sa.Column('drain_deadline', sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(op.f('ck_nodes_state_known'), 'nodes', "state IN ('ready', 'cordoned', 'draining')")
    op.create_table(
        'node_events',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.Column('cluster', sa.Text(), nullable=False),
        sa.Column('node', sa.Text(), nullable=False),
        sa.Column('from_state', sa.Text(), nullable=True),
        sa.Column('to_state', sa.Text(), nullable=False),
        sa.Column('actor', sa.Text(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('details', sa.dialects.postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_node_events')),
    )
    op.create_index('ix_node_events_node', 'node_events', ['cluster', 'node', 'id'])


def downgrade() -> None:
    op.drop_index('ix_node_events_node', table_name='node_events')
    op.drop_table('node_events')
    op.drop_constraint(op.f('ck_nodes_state_known'), 'nodes', type_='check')
    for column in ('drain_deadline', 'state_at', 'state_by', 'state_reason', 'state'):
        op.drop_column('nodes', column)
