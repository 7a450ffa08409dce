"""index of the preemption events: the scheduler's pass reads the last minute's (budget, who preempted whom)

Revision ID: h34_preemption_events
Revises: h24_roll_up_submits
Create Date: 2026-11-27 21:40:00

Every admission pass counts the preemptions of the last minute per cluster (PREEMPTION_MAX_PER_MINUTE) and
looks up who preempted the jobs it decodes. Both read `pending` events with a `preempted_by` key; the
(to_status, at) index also returns every `submitted` event of the window, so a pass scanned the whole
minute's submits (2,000 in benchmarks/dispatch.py: 1.7-3 ms of every pass). A partial index holds only the
preemptions.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = 'h34_preemption_events'
down_revision = 'h24_roll_up_submits'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_job_events_preemptions", "job_events", ["at"],
                    postgresql_where=sa.text("to_status = 'pending' AND details ? 'preempted_by'"))


def downgrade() -> None:
    op.drop_index("ix_job_events_preemptions", table_name="job_events")
