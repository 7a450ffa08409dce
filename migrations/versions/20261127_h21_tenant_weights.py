"""fair-share weights per tenant, set by admins, and their audit

Revision ID: h21_tenant_weights
Revises: h11_quotas
Create Date: 2026-11-27 18:00:00

- `fair_share_weights`: one row per tenant (the fair-share owner: JWT_TENANT_CLAIM, else the token's sub) whose
  weight an admin set; it wins over FAIR_SHARE_WEIGHTS, which is the default for tenants without a row.
- `fair_share_weight_changes`: who changed which tenant's weight when, with the weight before and after
  (NULL: none was set).
"""
from alembic import op
import sqlalchemy as sa

revision = 'h21_tenant_weights'
down_revision = 'h11_quotas'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fair_share_weights',
        sa.Column('tenant', sa.Text(), nullable=False),
        sa.Column('weight', sa.Float(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_by', sa.Text(), nullable=False),
        # The API's bounds (app.domain.weights), also for rows written by hand: the policy divides by it.
        sa.CheckConstraint('weight >= 0.001 AND weight <= 1000', name=op.f('ck_fair_share_weights_bounded')),
        sa.PrimaryKeyConstraint('tenant', name=op.f('pk_fair_share_weights')),
    )
    op.create_table(
        'fair_share_weight_changes',
        sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column('tenant', sa.Text(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('actor', sa.Text(), nullable=False),
        sa.Column('action', sa.Text(), nullable=False),
        sa.Column('before', sa.Float(), nullable=True),
        sa.Column('after', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_fair_share_weight_changes')),
    )
    op.create_index('ix_fair_share_weight_changes_tenant', 'fair_share_weight_changes', ['tenant', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_fair_share_weight_changes_tenant', table_name='fair_share_weight_changes')
    op.drop_table('fair_share_weight_changes')
    op.drop_table('fair_share_weights')
