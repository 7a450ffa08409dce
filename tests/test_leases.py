"""Leases renewed in one statement for every attempt a worker process supervises (app.domain.leases)."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from app.db import Database
from app.domain import execution, jobs, leases, logs, nodes
from app.domain.callers import LOCAL_ADMIN
from app.domain.capacity import LOCAL_CLUSTER
from app.models import Job
from config import Settings
from tests.test_nodes import _admit, _register, _submit


def test_one_round_renews_every_owned_attempt_and_names_what_was_lost_or_drains(database: Database, settings: Settings) -> None:
    _register(database)
    ids = [_submit(database, settings) for _ in range(3)]
    assert sorted(_admit(database, settings)) == sorted(ids)
    tokens = {}
    with database.session() as s:
        for job_id in ids:
            tokens[job_id] = s.get(Job, job_id).dispatch_token
            assert execution.claim(s, job_id, tokens[job_id], "w1") is not None
        stale = jobs.utcnow() - timedelta(minutes=5)
        s.execute(update(Job).where(Job.id.in_(ids)).values(heartbeat_at=stale))
        s.commit()
    cancelled, kept, other = ids
    with database.session() as s:
        jobs.cancel(s, LOCAL_ADMIN, cancelled)
    pairs = [(job_id, tokens[job_id]) for job_id in ids] + [(other, "not-its-token")]

    with database.session() as s:
        owned = leases.check_many(s, pairs, heartbeat=True)
    assert owned == {kept: None, other: None}  # the cancelled attempt (and a stale token) no longer own a job
    with database.session() as s:
        beats = {j.id: j.heartbeat_at for j in s.query(Job).filter(Job.id.in_(ids))}
    assert beats[kept] > stale and beats[other] > stale and beats[cancelled] == stale

    with database.session() as s:
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.DRAINING, actor="ops", grace_seconds=30)
    with database.session() as s:
        owned = leases.check_many(s, pairs, heartbeat=False)
    assert set(owned) == {kept, other} and all(deadline is not None for deadline in owned.values())


def test_many_attempts_log_lines_are_stored_in_one_statement_once(database: Database, settings: Settings) -> None:
    a, b = _submit(database, settings), _submit(database, settings)
    at = jobs.utcnow()
    batches = [(a, 0, [(at, "stdout", 0, "a1"), (at, "stdout", 0, "a2")]), (b, 1, [(at, "stdout", 1, "b1")])]
    with database.session() as s:
        assert logs.append_many_once(s, batches, retry=False)
    with database.session() as s:  # a retry after a commit nobody acknowledged stores nothing again
        assert not logs.append_many_once(s, batches, retry=True)
    with database.session() as s:
        assert [l.line for l in logs.tail(s, a, 10)] == ["a1", "a2"]
        assert [(l.line, l.member) for l in logs.tail(s, b, 10)] == [("b1", 1)]
