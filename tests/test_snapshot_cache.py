"""The scheduler's snapshot cache (issue 10, pass time): rows decoded in earlier passes are reused only while
their version is unchanged, so a snapshot read with the cache is exactly the one read without it, after any
change to jobs, nodes and preemptions, on real PostgreSQL."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from app.db import GENERIC_PLAN, Database
from app.domain import scheduling
from app.domain.jobs import utcnow
from app.domain.policy import Snapshot
from config import Settings

GIB = 1 << 30


def canonical(snapshot: Snapshot) -> tuple[Any, ...]:
    nodes = sorted((n.cluster, n.name, tuple(n.gpu_indices), n.gpu_type, n.cpu_millis, n.memory_bytes, n.slots, n.pool,
                    tuple(sorted(n.used_gpus)), n.used_anonymous_gpus, n.used_cpu_millis, n.used_memory_bytes, n.used_slots)
                   for n in snapshot.nodes)
    return (snapshot.now, nodes, sorted(snapshot.running, key=lambda r: r.id), sorted(snapshot.backlog, key=lambda j: j.id),
            snapshot.usage, snapshot.queue_room, snapshot.weights)


@contextlib.contextmanager
def statements_sent(database: Database) -> Iterator[list[str]]:
    """The statements sent on `database`'s engine inside the block, whitespace folded."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(database.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(database.engine, "before_cursor_execute", record)


def insert_nodes(database: Database, now: datetime) -> None:
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "SELECT c, 'n' || g, '[0,1,2,3]', 'H100', 32000, 68719476736, 8, true, :now, :now "
            "FROM generate_series(1, 4) g, unnest(ARRAY['local', 'kube']) c"), {"now": now})


def insert_jobs(database: Database, now: datetime) -> None:
    with database.engine.begin() as conn:
        # Holders: running local jobs with GPU indices (one past its timeout, one without a timeout), a Kubernetes
        # gang spread over two nodes, a job queued but not started, and a cancelled one still stopping.
        conn.execute(text("""
            INSERT INTO jobs (id, owner, tenant, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              timeout_seconds, created_at, updated_at, pending_since, queued_at, started_at, heartbeat_at, cluster, node,
                              placement, holds_resources, dispatch_token, gang_enabled, gang_min_members)
            VALUES
            ('r1', 'alice', 'research', 't', 50, 'high-priority', 'running', 'r', '["true"]', 1000, 1073741824, 1, 600,
             :now, :now, :now, :now, :started, :now, 'local', 'n1', '[{"node": "n1", "members": 1, "gpu_indices": [0]}]', true, 't', false, 1),
            ('r2', 'bob', NULL, 't', 20, 'default', 'running', 'r', '["true"]', 1000, 1073741824, 2, 5,
             :now, :now, :now, :now, :long_ago, :now, 'local', 'n2', '[{"node": "n2", "members": 1, "gpu_indices": [1, 2]}]', true, 't', false, 1),
            ('r3', 'bob', NULL, 't', 20, 'default', 'running', 'r', '["true"]', 500, 1073741824, 0, NULL,
             :now, :now, :now, :now, :started, :now, 'local', 'n3', '[{"node": "n3", "members": 1, "gpu_indices": []}]', true, 't', false, 1),
            ('g1', 'carol', NULL, 't', 60, 'high-priority', 'running', 'r', NULL, 2000, 2147483648, 2, 3600,
             :now, :now, :now, :now, :started, :now, 'kube', NULL,
             '[{"node": "n1", "members": 2, "gpu_indices": []}, {"node": "n2", "members": 1, "gpu_indices": []}]', true, 't', true, 3),
            ('q1', 'alice', 'research', 't', 50, 'high-priority', 'queued', 'r', '["true"]', 1000, 1073741824, 1, 60,
             :now, :now, :now, :now, NULL, NULL, 'local', 'n4', '[{"node": "n4", "members": 1, "gpu_indices": [3]}]', true, 't', false, 1),
            ('c1', 'bob', NULL, 't', 50, 'high-priority', 'cancelled', 'r', '["true"]', 1000, 1073741824, 1, 60,
             :now, :now, :now, :now, :started, :now, 'local', 'n4', '[{"node": "n4", "members": 1, "gpu_indices": [0]}]', true, 't', false, 1)
        """), {"now": now, "started": now - timedelta(seconds=30), "long_ago": now - timedelta(hours=1)})
        # The backlog: several owners and pools, a gang, a job in backoff, one bound to a GPU type.
        conn.execute(text("""
            INSERT INTO jobs (id, owner, tenant, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,
                              timeout_seconds, created_at, updated_at, pending_since, gang_enabled, gang_min_members, not_before, gpu_types)
            SELECT 'p' || g, (ARRAY['alice', 'bob', 'carol', 'dave'])[1 + g % 4], CASE WHEN g % 4 = 1 THEN 'research' END, 't',
                   (ARRAY[20, 50, 80])[1 + g % 3], CASE WHEN g % 3 = 0 THEN 'default' ELSE 'high-priority' END, 'pending', 'submitted',
                   CASE WHEN g % 5 = 0 THEN NULL ELSE '["true"]'::jsonb END, 1000, 1073741824, g % 3, 60 + g,
                   :now - g * interval '1 s', :now, :now, g % 7 = 0, CASE WHEN g % 7 = 0 THEN 2 ELSE 1 END,
                   CASE WHEN g % 11 = 0 THEN :now + interval '1 hour' END, CASE WHEN g % 13 = 0 THEN ARRAY['H100'] END
            FROM generate_series(1, 60) g
        """), {"now": now})


def test_a_cached_snapshot_is_the_snapshot_after_every_kind_of_change(database: Database, settings: Settings) -> None:
    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)
    cache = scheduling.SnapshotCache()
    ahead_cache = scheduling.SnapshotCache()
    clock = [now]
    with_nodes = 0

    def both() -> tuple[Snapshot, Snapshot]:
        nonlocal with_nodes
        clock[0] += timedelta(seconds=1)
        with database.session() as s, s.begin():
            fresh = scheduling.load_snapshot(s, settings, clock[0])
            cached = scheduling.load_snapshot(s, settings, clock[0], cache=cache)
            # The admission pass's way (`heads`, under its lock: its backlog read with the nodes, decoded from JSON,
            # unless a queue is full or a preemptor waits), with limits as large as the whole heads': the same snapshot.
            with statements_sent(database) as sent:
                ahead = scheduling.load_snapshot(s, settings, clock[0], cache=ahead_cache, heads=1000,
                                                 start=scheduling.PassStart([]))
            with_nodes += not any("jobservice_backlog" in statement for statement in sent)
        assert canonical(cached) == canonical(fresh)
        assert canonical(ahead) == canonical(fresh)
        return fresh, cached

    fresh, _ = both()
    assert len(fresh.running) == 6 and len(fresh.backlog) == 60 - 5 and len(fresh.nodes) == 8  # 5 in backoff
    assert len(cache.holders) == 6 and len(cache.backlog) == 55
    both()  # everything from the cache now
    changes = [
        # a running job's placement and amounts change; another releases its capacity; a queued one starts
        "UPDATE jobs SET placement = '[{\"node\": \"n3\", \"members\": 1, \"gpu_indices\": [2]}]', gpus = 1 WHERE id = 'r1'",
        "UPDATE jobs SET holds_resources = false, status = 'succeeded' WHERE id = 'r3'",
        "UPDATE jobs SET status = 'running', started_at = now() WHERE id = 'q1'",
        # pending jobs change priority, owner, shape; one leaves its backoff; one is cancelled; a new one arrives
        "UPDATE jobs SET priority = 99 WHERE id = 'p4'",
        "UPDATE jobs SET tenant = 'infra', gpus = 3, cpu_millis = 7000 WHERE id = 'p5'",
        "UPDATE jobs SET not_before = NULL WHERE id = 'p11'",
        "UPDATE jobs SET status = 'cancelled' WHERE id = 'p6'",
        "INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus, created_at,"
        " updated_at, pending_since) VALUES ('p99', 'erin', 't', 90, 'high-priority', 'pending', 'submitted', '[]', 1, 1, 0, now(), now(), now())",
        # a node's capacity changes (a heartbeat alone does not), one goes away, one is cordoned
        "UPDATE nodes SET heartbeat_at = heartbeat_at + interval '1 s'",
        "UPDATE nodes SET slots = 2, gpu_indices = '[0,1]' WHERE name = 'n1' AND cluster = 'local'",
        "UPDATE nodes SET heartbeat_at = now() - interval '1 day' WHERE name = 'n2' AND cluster = 'kube'",
        "UPDATE nodes SET state = 'cordoned' WHERE name = 'n3' AND cluster = 'kube'",
        # a running job is preempted (pending, still holding while it stops): its attempt ends "now + ..." each pass
        "UPDATE jobs SET status = 'pending' WHERE id = 'g1'",
        "UPDATE fair_share_usage SET gpu_seconds = 1",
    ]
    for statement in changes:
        with database.engine.begin() as conn:
            conn.execute(text(statement))
        fresh, cached = both()
    assert {j.id for j in cached.backlog} >= {"p99", "p11", "p4"} and "p6" not in {j.id for j in cached.backlog}
    assert next(j for j in cached.backlog if j.id == "p5").owner == "infra"
    assert {r.id for r in cached.running} == {"r1", "r2", "q1", "g1", "c1"}
    assert with_nodes >= 10  # most reads of the backlog came with the nodes (not once a preemptor waits for its room)


def test_a_remembered_preemption_leaves_the_snapshot_when_it_leaves_the_window(database: Database, settings: Settings) -> None:
    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)
    with database.engine.begin() as conn:
        # p2 was preempted, so it ran: its claim set started_at (the scheduler reads the preemptions of such jobs only).
        conn.execute(text("UPDATE jobs SET started_at = :at WHERE id = 'p2'"), {"at": now - timedelta(days=1)})
        conn.execute(text("INSERT INTO job_events (job_id, from_status, to_status, reason, actor, at, details) "
                          "VALUES ('p2', 'running', 'pending', 'preempted', 'scheduler', :at, '{\"preempted_by\": \"g1\"}'), "
                          "('r1', 'running', 'pending', 'preempted', 'scheduler', :at, '{\"preempted_by\": \"p3\"}')"),
                     {"at": now - timedelta(hours=23, minutes=59)})
    cache = scheduling.SnapshotCache()
    preemptive = settings.with_overrides(preemption_enabled=True)
    for later in (timedelta(seconds=1), timedelta(seconds=30), timedelta(minutes=2)):  # the event leaves the window in between
        with database.session() as s, s.begin():
            fresh = scheduling.load_snapshot(s, preemptive, now + later)
            cached = scheduling.load_snapshot(s, preemptive, now + later, cache=cache)
        assert canonical(cached) == canonical(fresh)
        p2 = next(j for j in cached.backlog if j.id == "p2")
        assert p2.preempted_by == (frozenset({"g1"}) if later < timedelta(minutes=1) else frozenset())
        r1 = next(r for r in cached.running if r.id == "r1")  # a holder's, likewise
        assert r1.preempted_by == (frozenset({"p3"}) if later < timedelta(minutes=1) else frozenset())


def test_who_preempted_a_changed_holder_is_read_with_the_holders_in_the_nodes_statement(
        database: Database, settings: Settings) -> None:
    """Issue 14: a pass whose running holders changed (a claim, an end) read who had preempted them with a statement of
    its own, a round trip (and a parse and plan) of most passes under load. It now travels with the holders."""
    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)
    preemptive = settings.with_overrides(preemption_enabled=True)
    cache = scheduling.SnapshotCache()
    with database.session() as s, s.begin():
        scheduling.load_snapshot(s, preemptive, now, cache=cache)
    with database.engine.begin() as conn:  # r1 was preempted by p3 an hour ago, and its row changes now
        conn.execute(text("INSERT INTO job_events (job_id, from_status, to_status, reason, actor, at, details) "
                          "VALUES ('r1', 'running', 'pending', 'preempted', 'scheduler', :at, '{\"preempted_by\": \"p3\"}'), "
                          "('r1', 'running', 'pending', 'preempted', 'scheduler', :old, '{\"preempted_by\": \"p9\"}')"),
                     {"at": now - timedelta(hours=1), "old": now - timedelta(days=2)})
        conn.execute(text("UPDATE jobs SET heartbeat_at = now() WHERE id = 'r1'"))
    with statements_sent(database) as sent, database.session() as s, s.begin():
        cached = scheduling.load_snapshot(s, preemptive, now + timedelta(seconds=1), cache=cache)
    assert not any("preempted_by'" in statement and "job_id = ANY" in statement for statement in sent), sent
    assert len(sent) == 2, sent  # the nodes (with the facts and the changed holders), the backlog
    assert next(r for r in cached.running if r.id == "r1").preempted_by == frozenset({"p3"})  # p9's is out of the window
    with database.session() as s, s.begin():
        fresh = scheduling.load_snapshot(s, preemptive, now + timedelta(seconds=1))
    assert canonical(cached) == canonical(fresh)
    off = scheduling.SnapshotCache()
    with database.session() as s, s.begin():
        assert next(r for r in scheduling.load_snapshot(s, settings.with_overrides(preemption_enabled=False), now, cache=off).running
                    if r.id == "r1").preempted_by == frozenset()


def holder_changes_pass(database: Database, settings: Settings, cache: scheduling.SnapshotCache, clock: list[datetime],
                        statement: str) -> None:
    with database.engine.begin() as conn:
        conn.execute(text(statement))
    clock[0] += timedelta(seconds=1)
    with database.session() as s, s.begin():
        fresh = scheduling.load_snapshot(s, settings, clock[0])
        cached = scheduling.load_snapshot(s, settings, clock[0], cache=cache)
    assert canonical(cached) == canonical(fresh), statement


def test_holders_changing_while_the_nodes_do_not_recompute_only_their_nodes_and_give_the_full_snapshot(
        database: Database, settings: Settings) -> None:
    """The incremental deduction (only the nodes whose holders changed are recomputed) against a full read after each
    kind of holder change, including two holders naming the same GPU (a release must not free what the other holds)."""
    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)
    cache = scheduling.SnapshotCache()
    clock = [now]
    holder_changes_pass(database, settings, cache, clock, "SELECT 1")
    assert cache.recomputed_nodes == 8  # the first pass: every node
    holder = ("INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus,"
              " timeout_seconds, created_at, updated_at, pending_since, queued_at, started_at, heartbeat_at, cluster, node, placement,"
              " holds_resources, dispatch_token) VALUES ('{id}', 'erin', 't', 50, 'high-priority', 'running', 'r', '[\"true\"]', 250, 1024,"
              " 1, 600, now(), now(), now(), now(), now() - interval '10 s', now(), '{cluster}', '{node}', '{placement}', true, 't')")
    changes = [
        # a new holder naming GPU 0 of local/n1, which r1 holds too; then r1 releases it: n1's GPU 0 stays held
        holder.format(id="d1", cluster="local", node="n1", placement='[{"node": "n1", "members": 1, "gpu_indices": [0]}]'),
        "UPDATE jobs SET holds_resources = false, status = 'succeeded' WHERE id = 'r1'",
        # a holder moves to another node; one leaves the holding state; one row is deleted; a Kubernetes gang member moves
        "UPDATE jobs SET node = 'n3', placement = '[{\"node\": \"n3\", \"members\": 1, \"gpu_indices\": [1, 2]}]' WHERE id = 'r2'",
        "UPDATE jobs SET holds_resources = false WHERE id = 'c1'",
        "DELETE FROM jobs WHERE id = 'd1'",
        "UPDATE jobs SET placement = '[{\"node\": \"n3\", \"members\": 2, \"gpu_indices\": []}, {\"node\": \"n4\", \"members\": 1,"
        " \"gpu_indices\": []}]' WHERE id = 'g1'",
        # a holder on a node that is not live (nothing to deduct), and one on no node at all
        holder.format(id="d2", cluster="elsewhere", node="x1", placement='[{"node": "x1", "members": 1, "gpu_indices": [5]}]'),
        holder.format(id="d3", cluster="local", node="n2", placement='[]'),
        "UPDATE jobs SET status = 'pending' WHERE id = 'q1'",  # preempted: stopping, decoded again every pass
        "SELECT 1",
        # and after a node changed (a full recomputation), holder changes are incremental again
        "UPDATE nodes SET cpu_millis = 16000 WHERE name = 'n4' AND cluster = 'local'",
        "UPDATE jobs SET cpu_millis = 3000, started_at = now() WHERE id = 'r2'",
    ]
    for statement in changes:
        holder_changes_pass(database, settings, cache, clock, statement)
        if statement.startswith("UPDATE nodes"):
            assert cache.recomputed_nodes == 8
        else:
            # only the nodes the change touched, and those of the holders decoded every pass (queued, stopping)
            assert cache.recomputed_nodes < 8, statement


def test_a_connection_dropped_mid_pass_leaves_a_cache_that_later_passes_read_as_a_fresh_pass_does(
        database: Database, settings: Settings, monkeypatch: Any) -> None:
    """Each part of the cache (nodes, holders, backlog) is replaced by a complete read of it or not at all: a pass whose
    connection drops after the nodes and holders were read (who preempted a changed holder is read with it) and before
    the backlog leaves nothing half-decoded."""
    from sqlalchemy.exc import OperationalError

    preemptive = settings.with_overrides(preemption_enabled=True)
    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)
    cache = scheduling.SnapshotCache()
    clock = [now]
    holder_changes_pass(database, preemptive, cache, clock, "SELECT 1")
    real = scheduling._load_backlog

    def dropped(session: Any, *args: Any, **kwargs: Any) -> Any:
        # The server ends the session after the holders were read and before the pass ends (a restart, a failover).
        session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return real(session, *args, **kwargs)

    with database.engine.begin() as conn:  # a holder changes: its row is decoded, and who preempted it read with it
        conn.execute(text("UPDATE jobs SET placement = '[{\"node\": \"n4\", \"members\": 1, \"gpu_indices\": [2]}]', node = 'n4' "
                          "WHERE id = 'r1'"))
        conn.execute(text("UPDATE jobs SET priority = 11 WHERE id = 'p4'"))  # and a backlog row the failed pass never read
    monkeypatch.setattr(scheduling, "_load_backlog", dropped)
    with pytest.raises(OperationalError):
        with database.session() as s, s.begin():
            scheduling.load_snapshot(s, preemptive, clock[0] + timedelta(seconds=1), cache=cache)
    monkeypatch.setattr(scheduling, "_load_backlog", real)
    database.engine.dispose()  # the pool's other connections went with the server's restart in real life
    for statement in ("SELECT 1", "UPDATE jobs SET holds_resources = false, status = 'succeeded' WHERE id = 'r2'"):
        holder_changes_pass(database, preemptive, cache, clock, statement)


def test_the_pass_reads_usage_quotas_weights_and_the_preemption_budget_as_their_own_readers_do(
        database: Database, settings: Settings) -> None:
    """The snapshot's small reads travel as JSON in one statement: the values must be exactly those of the readers
    the API uses (floats to the last bit, microseconds, NULL limits)."""
    from app.domain import fairshare, quotas, weights

    preemptive = settings.with_overrides(preemption_enabled=True)
    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO fair_share_usage (owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at) VALUES "
            "('research', 0.1 + 0.2, 1e-300, 123456789.123456789, :at1), ('bob', 1.0 / 3, 2.0 / 3, 7e22, :at2), "
            "('nobody', 5, 5, 5, :at2)"),
            {"at1": now - timedelta(seconds=12.345678), "at2": now - timedelta(microseconds=1)})
        conn.execute(text(
            "INSERT INTO quotas (tenant, cluster, gpus, cpu_millis, memory_bytes, borrow_gpus, borrow_cpu_millis, borrow_memory_bytes, "
            "updated_at, updated_by) VALUES ('research', '*', 4, NULL, 9007199254740993, 1, 0, 0, now(), 'a'), ('research', 'kube', NULL, 1000,"
            " NULL, 0, 5, 0, now(), 'a'), ('bob', 'local', 0, 0, 0, 0, 0, 0, now(), 'a')"))
        conn.execute(text("INSERT INTO fair_share_weights (tenant, weight, updated_at, updated_by) VALUES "
                          "('research', 0.1, now(), 'a'), ('bob', 333.333333333333, now(), 'a')"))
        conn.execute(text("INSERT INTO job_events (job_id, from_status, to_status, reason, actor, at, cluster, details) VALUES "
                          "('r1', 'running', 'pending', 'preempted', 'scheduler', :at, 'local', '{\"preempted_by\": \"p1\"}'), "
                          "('r2', 'running', 'pending', 'preempted', 'scheduler', :at, 'local', '{\"preempted_by\": \"p2\"}'), "
                          "('r3', 'running', 'pending', 'preempted', 'scheduler', :at, 'local', '{\"preempted_by\": \"p1\"}')"),
                     {"at": now - timedelta(seconds=5)})  # three victims of one cluster, by two preemptors
    with database.session() as s, s.begin():
        snapshot = scheduling.load_snapshot(s, preemptive, now)
        owners = {job.owner for job in snapshot.backlog} | {attempt.owner for attempt in snapshot.running}
        assert snapshot.usage == fairshare.usage_of(s, owners, now, preemptive.fair_share_half_life_seconds)
        assert set(snapshot.usage) == {"research", "bob"}  # `nobody` has no job: not read
        assert snapshot.quotas == quotas.load_all(s)
        assert snapshot.weights == weights.stored(s) == {"research": 0.1, "bob": 333.333333333333}
        assert snapshot.preemption_budget == scheduling.preemption_budget(s, preemptive, now)
        assert snapshot.queue_room is not None


def test_fair_share_accrual_in_one_statement_accrues_decays_stamps_and_purges_as_before(database: Database) -> None:
    """The accrual's four statements became one: the first call only records the time; within ACCRUE_EVERY_SECONDS
    nothing changes; then what each owner holds times the seconds elapsed is added to its decayed usage, and rows
    decayed past 20 half-lives are deleted, except an owner's that was just accrued."""
    from app.domain import fairshare

    now = utcnow()
    insert_nodes(database, now)
    insert_jobs(database, now)  # holders: research 1 GPU + 1 GPU (r1, q1), bob 2 + 0 + 1 (r2, r3, c1), carol 2 x 3 members (g1)
    half_life = 100.0

    def accrue(at: datetime) -> dict[str, tuple[float, float, float, datetime]]:
        with database.session() as s, s.begin():
            fairshare.accrue(s, at, half_life)
        with database.engine.connect() as conn:
            return {r[0]: tuple(r[1:]) for r in conn.execute(text(
                "SELECT owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at FROM fair_share_usage"))}

    with database.engine.begin() as conn:  # stale rows: one of an owner holding nothing, one of an owner holding GPUs
        conn.execute(text("INSERT INTO fair_share_usage (owner, gpu_seconds, cpu_seconds, memory_gib_seconds, updated_at) VALUES "
                          "('gone', 1, 1, 1, :old), ('bob', 8, 0, 0, :old)"), {"old": now - timedelta(seconds=30 * half_life)})
    assert set(accrue(now)) == {"gone", "bob"}  # the first call: the state row only
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT usage_accrued_at FROM scheduler_state")).scalar() == now
    assert set(accrue(now + timedelta(seconds=0.5))) == {"gone", "bob"}  # too soon: nothing
    later = now + timedelta(seconds=10)
    usage = accrue(later)
    assert set(usage) == {"research", "bob", "carol"}  # `gone` purged; bob's stale row accrued, not purged
    assert usage["research"][0] == pytest.approx(2 * 10) and usage["carol"][0] == pytest.approx(6 * 10)
    assert usage["carol"][1] == pytest.approx(3 * 2.0 * 10) and usage["carol"][2] == pytest.approx(3 * 2 * 10)
    assert usage["bob"][0] == pytest.approx(8 * 0.5 ** 30 + 3 * 10) and usage["bob"][3] == later
    again = accrue(later + timedelta(seconds=100))  # one half-life later: halved, plus 100 s more
    assert again["research"][0] == pytest.approx(20 * 0.5 + 2 * 100)
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT usage_accrued_at FROM scheduler_state")).scalar() == later + timedelta(seconds=100)


def test_the_garbage_collector_is_paused_only_while_the_policy_decides() -> None:
    import gc

    from app.domain.scheduling import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # off already (another pause, or the process turned it off): left off
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
    try:
        with collector_paused():
            raise RuntimeError("the policy failed")
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_an_idle_pass_admitting_a_fresh_submit_sends_two_round_trips_and_defers_no_accrual(
        database: Database, settings: Settings) -> None:
    """Issue 14, idle dispatch: a pass is mostly round trips when the fleet is idle. A pass that admits a job never run
    before sends two, each executing a statement prepared once per database session: the lock (with the published
    outbox rows' delete) and then the nodes with the pass's facts, the holders and the (short) backlog, and the
    admission (with its own savepoint); no accrual while none is due (the process remembers when it accrued), no read of the
    preemptions of a job that never ran, no SAVEPOINT or RELEASE of their own. Accrual is only deferred: the next one
    that is due adds every second since the last (that pass sends the lock alone first, as its accrual must follow the
    lock and precede the nodes read's facts)."""
    from app.domain import fairshare

    now = utcnow()
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "VALUES ('local', 'n1', '[0,1,2,3]', 'H100', 32000, 68719476736, 8, true, :at, :at)"), {"at": now + timedelta(hours=1)})

    def submit(job_id: str, at: datetime) -> None:
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, "
                "gpus, created_at, updated_at, pending_since) VALUES (:id, 'alice', 't', 10, 'default', 'pending', 'submitted', "
                "'[\"true\"]', 1000, 1073741824, 1, :at, :at, :at)"), {"id": job_id, "at": at})

    preemptive = settings.with_overrides(preemption_enabled=True)
    cache = scheduling.SnapshotCache()

    def admit(job_id: str, at: datetime) -> list[str]:
        submit(job_id, at)
        with statements_sent(database) as sent, database.session() as s:
            result = scheduling.admit(s, preemptive, at, cache=cache)
        assert result.admitted == [job_id]
        return sent

    admit("first", now)  # accrues (the state row), decodes the node
    statements = admit("second", now + timedelta(seconds=0.5))  # the first job holds a GPU, the second one is new
    assert len(statements) == 2, "\n".join(statements)
    # Each executed by name: prepared once per database session (by an earlier pass: the session is pooled).
    assert statements[0].startswith("EXECUTE jobservice_lock_pass")  # the lock, then the nodes and backlog read, in one round trip
    assert statements[0].split("; ")[-1].startswith("EXECUTE jobservice_nodes_backlog"), statements[0]
    assert all(s.startswith(("EXECUTE jobservice_", f"SAVEPOINT place_all; {GENERIC_PLAN}; EXECUTE jobservice_place_all"))
               for s in statements), statements
    assert not any(s.startswith(("SAVEPOINT sa_", "RELEASE")) for s in statements), statements
    assert not any("preempted_by'" in s and "job_id = ANY" in s for s in statements), statements
    assert not any("usage_accrued_at" in s for s in statements), statements

    # The accrual that comes due adds every second since the last one (`now`, the first pass's): the pass that sent
    # none lost nothing. (An accrual counts what is held when it runs: `first` and `second`, a GPU each.)
    assert fairshare.ACCRUE_EVERY_SECONDS == 1.0
    statements = admit("third", now + timedelta(seconds=1.5))
    assert sum("usage_accrued_at" in s for s in statements) == 1
    assert statements[0] == "EXECUTE jobservice_lock_pass (%(published)s, %(lock_key)s)"  # alone: the accrual follows it
    assert statements[2].startswith("EXECUTE jobservice_nodes_backlog")
    with database.engine.connect() as conn:
        gpu_seconds = conn.execute(text("SELECT gpu_seconds FROM fair_share_usage WHERE owner = 'alice'")).scalar()
    assert gpu_seconds == pytest.approx(2 * 1.5)


def test_the_backlog_is_read_by_a_prepared_statement_with_a_plan_that_fits_the_pass(
        database: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: planning the backlog statement cost more than running it. A pass with no full queue and no preemptor
    waiting for its room (most passes) reads it with a statement that names neither list, prepared whatever the
    backlog's size: its generic plan walks the pools' indexes as a custom plan does. With either list, a generic plan
    (blind to the arrays) sorted a whole pool's backlog, so that statement is prepared only while the last pass saw at
    most PREPARED_BACKLOG_MAX_HEADS heads, and sent as text after one that saw more. All give the same backlog."""
    monkeypatch.setattr(scheduling, "PREPARED_BACKLOG_MAX_HEADS", 2)
    now = utcnow()
    with database.engine.begin() as conn:  # no node: nothing is admitted, the backlog stays
        conn.execute(text(
            "INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, "
            "gpus, created_at, updated_at, pending_since) SELECT 'heads-' || g, 'alice', 't', 10, 'default', 'pending', "
            "'submitted', '[\"true\"]', 1000, 1073741824, 0, :at, :at, :at FROM generate_series(1, 3) g"), {"at": now})
    cache = scheduling.SnapshotCache()

    def backlog_read(at: datetime, waiting: list[str] | None = None) -> tuple[str, list[str]]:
        with statements_sent(database) as sent, database.session() as s:
            if waiting is None:
                backlog = scheduling.load_snapshot(s, settings, at, cache=cache).backlog
            else:  # a preemptor waiting for its room (an id that is no job here changes no head)
                backlog = scheduling._load_backlog(s, cache, at, [], None, False, waiting)
        reads = [s for s in sent if "jobservice_backlog" in s or "WITH RECURSIVE owners" in s]
        assert len(reads) == 1, sent
        return (reads[0].split(" (")[0].removeprefix("EXECUTE ") if reads[0].startswith("EXECUTE") else "text"), sorted(j.id for j in backlog)

    three = ["heads-1", "heads-2", "heads-3"]
    assert backlog_read(now) == ("jobservice_backlog_plain", three)  # nothing seen yet
    assert backlog_read(now) == ("jobservice_backlog_plain", three)  # the last pass saw 3 heads: still prepared
    assert backlog_read(now, waiting=["job-elsewhere"]) == ("text", three)
    with database.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id IN ('heads-1', 'heads-2')"))
    assert backlog_read(now, waiting=["job-elsewhere"]) == ("text", ["heads-3"])
    assert backlog_read(now, waiting=["job-elsewhere"]) == ("jobservice_backlog", ["heads-3"])
    assert backlog_read(now) == ("jobservice_backlog_plain", ["heads-3"])


def test_an_admission_pass_reads_a_short_backlog_and_the_whole_heads_only_when_its_walk_needs_them(
        database: Database, settings: Settings) -> None:
    """Issue 14, pass time: a pass on a busy fleet admits the few jobs at the head of the walk and stops, every worker slot
    taken; it reads at most ADMISSION_HEADS jobs per owner and pool (not 100 and 300) while its walks stop within them.
    A walk that does not (a job further back fits where the heads do not) reads the whole heads and admits what a pass
    without the short read admits; the next pass then reads the whole heads at once."""
    now = utcnow()
    heads = scheduling.ADMISSION_HEADS
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO nodes (cluster, name, gpu_indices, gpu_type, cpu_millis, memory_bytes, slots, ready, heartbeat_at, started_at) "
            "VALUES ('local', 'n1', '[0,1,2,3]', 'H100', 64000, 68719476736, 4, true, :at, :at)"), {"at": now + timedelta(hours=1)})
        # Two slots and two GPUs held for an hour.
        conn.execute(text(
            "INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, gpus, "
            "timeout_seconds, created_at, updated_at, pending_since, queued_at, started_at, heartbeat_at, cluster, node, placement, "
            "holds_resources, dispatch_token) SELECT 'held-' || g, 'bob', 't', 50, 'default', 'running', 'r', '[\"true\"]', 1000, "
            "1073741824, 1, 3600, :at, :at, :at, :at, :at, :at, 'local', 'n1', "
            "json_build_array(json_build_object('node', 'n1', 'members', 1, 'gpu_indices', json_build_array(g - 1)))::jsonb, true, 't' "
            "FROM generate_series(1, 2) g"), {"at": now})

    def pending(prefix: str, count: int, gpus: int, timeout: int, first_second: int) -> None:
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, "
                "gpus, timeout_seconds, created_at, updated_at, pending_since) SELECT :prefix || lpad(g::text, 3, '0'), 'alice', 't', "
                "50, 'default', 'pending', 'submitted', '[\"true\"]', 1000, 1073741824, :gpus, :timeout, "
                ":at + (:first + g) * interval '1 ms', :at, :at FROM generate_series(1, :count) g"),
                {"prefix": prefix, "count": count, "gpus": gpus, "timeout": timeout, "first": first_second, "at": now - timedelta(minutes=5)})

    cache = scheduling.SnapshotCache()

    def admit(at: datetime) -> tuple[list[str], list[str]]:
        with statements_sent(database) as sent, database.session() as s:
            result = scheduling.admit(s, settings, at, cache=cache)
        return result.admitted, [s for s in sent if not s.startswith("PREPARE") and ("backlog" in s or "WITH RECURSIVE owners" in s)]

    # Blocked: heads + 3 jobs of 4 GPUs (the first reserves the node), then a 1-GPU job short enough to backfill: it is
    # further back in alice's order than the short backlog reaches, so only the whole heads show it.
    pending("big-", heads + 3, 4, 600, 0)
    pending("small-", 1, 1, 60, 1000)
    admitted, reads = admit(now)
    assert admitted == ["small-001"] and len(reads) == 2  # the short read, then the whole heads
    assert cache.short_backlog is False
    with database.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id LIKE 'big-%' OR id = 'small-001'"))

    # Busy: two slots left and 100 CPU jobs: the two oldest are admitted, the walk stops, and from the next pass on
    # only the short backlog is read (the first pass still reads the whole heads: the last one needed them).
    pending("cpu-", 100, 0, 600, 2000)
    admitted, reads = admit(now + timedelta(seconds=1))
    assert admitted == ["cpu-001", "cpu-002"] and len(reads) == 1 and cache.short_backlog is True
    assert len(cache.backlog) == 100  # the whole heads: alice's first 100
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'succeeded', holds_resources = false WHERE id = 'cpu-001'"))
    admitted, reads = admit(now + timedelta(seconds=2))
    assert admitted == ["cpu-003"] and len(reads) == 1
    assert len(cache.backlog) == heads  # alice's first `heads` jobs, which are also the CPU pool's


def test_the_backlog_read_with_the_nodes_is_read_only_by_a_pass_holding_the_lock(database: Database) -> None:
    """A pass locked out (another scheduler's pass holds the admission lock) reads nothing beyond the lock: the short
    backlog that travels in the nodes read (scheduling._NODES_AND_BACKLOG) is not read then, as the next wake-up is not."""
    now = utcnow()
    with database.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (id, owner, job_type, priority, queue, status, status_reason, command, cpu_millis, memory_bytes, "
            "gpus, created_at, updated_at, pending_since) VALUES ('eligible', 'alice', 't', 10, 'default', 'pending', "
            "'submitted', '[\"true\"]', 1000, 1073741824, 0, :at, :at, :at)"), {"at": now})
    params = {"alive_since": now - timedelta(minutes=1), "known": "", "preemption": False, "since": now, "holders_known": "{}",
              "now": now, "preempted_by_since": now, "per_owner": 32, "per_pool": 32, "classes": 50, "per_class": 32,
              "backlog_known": "{}"}

    def backlog(locked: str) -> Any:
        with database.session() as s, s.begin():
            s.execute(text("SELECT set_config('jobservice.pass_locked', :locked, true)"), {"locked": locked})
            return scheduling._NODES_AND_BACKLOG.execute(s, params).one().backlog

    try:
        assert backlog("false") is None
        rows = backlog("true")
        assert [row[0] for row in rows] == ["eligible"] and rows[0][1] is not None  # id, version, then its columns
        assert scheduling._BacklogRow.of(rows[0]).created_at == now
    finally:
        with database.engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id = 'eligible'"))
