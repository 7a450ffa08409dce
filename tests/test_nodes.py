"""Node state in the domain: placement skips cordoned and draining nodes; a drain requeues without a retry."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from app.db import Database
from app.domain import execution, jobs, nodes, scheduling
from app.domain.callers import LOCAL_ADMIN
from app.domain.capacity import LOCAL_CLUSTER
from app.models import Job, JobEvent, Node, NodeEvent, OutboxMessage
from config import Settings


def _register(database: Database, name: str = "node-a") -> None:
    with database.session() as s:
        execution.register_node(s, cluster=LOCAL_CLUSTER, name=name, gpu_indices=[], gpu_type=None, cpu_millis=4000,
                                memory_bytes=2**32, slots=4)


def _submit(database: Database, settings: Settings, max_retries: int = 2) -> str:
    request = jobs.JobRequest(job_type="t", priority=5, image=None, config={}, resources={}, cpu_millis=100,
                              memory_bytes=1000, gpus=0, command=["true"], max_retries=max_retries)
    with database.session() as s:
        return jobs.submit(s, LOCAL_ADMIN, request, settings).id


def _admit(database: Database, settings: Settings) -> list[str]:
    with database.session() as s:
        return scheduling.admit(s, settings).admitted


def test_cordoned_and_draining_nodes_get_no_new_jobs(database: Database, settings: Settings) -> None:
    _register(database)
    job_id = _submit(database, settings)
    with database.session() as s:
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.CORDONED, actor="ops")
    assert _admit(database, settings) == []
    with database.session() as s:
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.DRAINING, actor="ops", grace_seconds=60)
    assert _admit(database, settings) == []
    with database.session() as s:
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.READY, actor="ops")
    assert _admit(database, settings) == [job_id]
    with database.session() as s:
        audit = [(e.from_state, e.to_state, e.actor) for e in s.scalars(select(NodeEvent).order_by(NodeEvent.id))]
    assert audit == [("ready", "cordoned", "ops"), ("cordoned", "draining", "ops"), ("draining", "ready", "ops")]


def test_a_drain_sends_queued_jobs_back_at_once_and_running_ones_after_the_grace(database: Database, settings: Settings) -> None:
    _register(database)
    running, queued = _submit(database, settings), _submit(database, settings)
    assert sorted(_admit(database, settings)) == sorted([running, queued])
    with database.session() as s:
        token = s.get(Job, running).dispatch_token
        assert execution.claim(s, running, token, "w1") is not None
        assert nodes.lease_check(s, running, token, heartbeat=True) == (True, None)
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.DRAINING, actor="ops", grace_seconds=30)
    with database.session() as s:
        unstarted = s.get(Job, queued)
        assert (unstarted.status, unstarted.node, unstarted.dispatch_token) == ("pending", None, None)
        assert s.scalars(select(OutboxMessage).where(OutboxMessage.job_id == queued)).first() is None
        owned, deadline = nodes.lease_check(s, running, token, heartbeat=False)
        node = s.get(Node, (LOCAL_CLUSTER, "node-a"))
        assert owned and deadline == node.drain_deadline and deadline - node.state_at == timedelta(seconds=30)

    with database.session() as s:
        first = nodes.requeue_drained(s, running, token, actor="w1", reason="drained from node local/node-a", exit_code=-15)
    with database.session() as s:  # a retried report (its first try committed unacknowledged) changes nothing
        again = nodes.requeue_drained(s, running, token, actor="w1", reason="drained from node local/node-a")
    assert first == again == "pending"
    with database.session() as s:
        job = s.get(Job, running)
        assert (job.retry_count, job.not_before, job.node, job.holds_resources) == (0, None, None, False)
        drained = s.scalars(select(JobEvent).where(JobEvent.job_id == running, JobEvent.from_status == "running")).all()
    assert [(e.to_status, e.reason, e.details["retry_spent"]) for e in drained] == [("pending", "drained from node local/node-a", False)]


def test_a_worker_killed_mid_drain_leaves_a_drain_the_next_worker_undoes(database: Database, settings: Settings) -> None:
    _register(database)
    with database.session() as s:
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.CORDONED, actor="ops", reason="bad fan")
        prior = nodes.drain_for_shutdown(s, LOCAL_CLUSTER, "node-a", actor="w1", grace_seconds=30)
    assert prior is not None and prior.state == "cordoned"
    with database.session() as s:
        assert s.get(Node, (LOCAL_CLUSTER, "node-a")).state == "draining"
        # The worker was SIGKILLed before it left: the next worker on the host puts the operator's cordon back.
        assert nodes.recover_shutdown_drain(s, LOCAL_CLUSTER, "node-a", actor="w2")
    with database.session() as s:
        node = s.get(Node, (LOCAL_CLUSTER, "node-a"))
        assert (node.state, node.state_reason, node.state_by, node.drain_deadline) == ("cordoned", "bad fan", "ops", None)
        assert not nodes.recover_shutdown_drain(s, LOCAL_CLUSTER, "node-a", actor="w2")
        # Without an operator's state before it, the node is simply ready again.
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.READY, actor="ops")
        nodes.drain_for_shutdown(s, LOCAL_CLUSTER, "node-a", actor="w2", grace_seconds=30)
        assert nodes.recover_shutdown_drain(s, LOCAL_CLUSTER, "node-a", actor="w3")
        assert s.get(Node, (LOCAL_CLUSTER, "node-a")).state == "ready"
        # An operator's own drain is not the worker's to undo.
        nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.DRAINING, actor="ops", grace_seconds=5)
        assert not nodes.recover_shutdown_drain(s, LOCAL_CLUSTER, "node-a", actor="w3")


def test_a_cordon_waits_for_an_admission_pass_in_progress(database: Database, settings: Settings) -> None:
    """A pass that read the node as ready must commit before the cordon does, never place after it."""
    import threading

    from sqlalchemy import text

    from app.domain.scheduling import ADMISSION_LOCK
    from tests.conftest import wait_for

    _register(database)
    done = threading.Event()
    with database.engine.connect() as admission:
        admission.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMISSION_LOCK})  # a pass in progress

        def cordon() -> None:
            with database.session() as s:
                nodes.change_state(s, LOCAL_CLUSTER, "node-a", nodes.NodeState.CORDONED, actor="ops")
            done.set()

        worker = threading.Thread(target=cordon)
        worker.start()
        # Advisory locks are per database; other databases of the server (other suites) are not ours to count.
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = :key"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        with database.engine.connect() as probe:
            wait_for(lambda: probe.execute(text(waiting), {"key": ADMISSION_LOCK}).scalar() == 1, 10, message="the cordon waiting")
        assert not done.is_set()
        admission.rollback()  # the pass ends
    worker.join(10)
    assert done.is_set()
    with database.session() as s:
        assert s.get(Node, (LOCAL_CLUSTER, "node-a")).state == "cordoned"
