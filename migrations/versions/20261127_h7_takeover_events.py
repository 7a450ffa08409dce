"""takeover events: a running -> running event (a worker adopting an attempt) is not counted as a start or an end

Revision ID: h7_takeover_events
Revises: 0002_observability
Create Date: 2026-11-27 16:00:00

A Kubernetes attempt whose worker went silent is taken over by another worker of its cluster; the takeover
is written to the timeline as a running -> running event. The event roll-up counted every event into
`running` as a start (wait, dispatch) and every event out of `running` as an end (execution): it now
counts only real transitions. The function is replaced in place; its trigger stays.
"""
from __future__ import annotations


from alembic import op

revision = 'h7_takeover_events'
down_revision = 'h6_scheduler_state'
branch_labels = None
depends_on = None



def _roll_up(sql: str) -> str:
    return sql.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _original() -> str:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("20261127_0002_observability_counters.py")
    spec = importlib.util.spec_from_file_location("_observability_counters", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.ROLL_UP_EVENTS)


def upgrade() -> None:
    sql = _original()
    guarded = (
        sql.replace("WHERE e.to_status = 'running' AND e.attempt = 0",
                    "WHERE e.to_status = 'running' AND e.attempt = 0 AND e.from_status IS DISTINCT FROM 'running'")
        .replace("WHERE e.to_status = 'running'\n",
                 "WHERE e.to_status = 'running' AND e.from_status IS DISTINCT FROM 'running'\n")
        .replace("WHERE e.from_status = 'running'\n",
                 "WHERE e.from_status = 'running' AND e.to_status <> 'running'\n")
    )
    assert guarded.count("IS DISTINCT FROM 'running'") == 2 and "e.to_status <> 'running'" in guarded, "roll-up changed"
    op.execute(_roll_up(guarded))


def downgrade() -> None:
    op.execute(_roll_up(_original()))
