"""The scheduling policy as a pure function: reservations, backfill, pools, fair share."""
from __future__ import annotations

import random

import pytest

from app.domain.capacity import NodeCapacity
from app.domain.policy import (
    BACKFILL_WINDOW, CAPACITY, NEVER_FITS_LIVE, Admit, Fail, Pending, PolicyConfig, Reserve, Running, Snapshot, Usage, Wait, decide,
)

GIB = 1 << 30
NOW = 1_000_000.0


def node(name: str, gpus: int = 8, cpu: int = 64_000, slots: int = 16, cluster: str = "local") -> NodeCapacity:
    return NodeCapacity(cluster, name, list(range(gpus)), "H100", cpu, 512 * GIB, slots)


def job(id: str, gpus: int = 0, priority: int = 50, owner: str = "alice", timeout: float | None = 600, at: float = 0.0, **kw) -> Pending:
    return Pending(id, owner, priority, "q", NOW - 1000 + at, 1000, GIB, gpus, timeout_seconds=timeout, **kw)


def running(id: str, node_: NodeCapacity, gpus: int, ends_in: float, owner: str = "bob") -> Running:
    node_.used_gpus.update(node_.free_gpus[:gpus])
    node_.used_cpu_millis += 1000
    node_.used_memory_bytes += GIB
    node_.used_slots += 1
    return Running(id, owner, node_.cluster, ((node_.name, 1),), 1000, GIB, gpus, NOW + ends_in)


def test_a_big_job_is_reserved_and_short_small_jobs_backfill_but_not_long_ones() -> None:
    a = node("a")
    busy = [running("r1", a, 4, ends_in=1000), running("r2", a, 2, ends_in=300)]
    big = job("big", gpus=8, priority=90, timeout=3600)
    short = job("short", gpus=1, priority=10, timeout=500)  # ends before the reservation at +1000
    long = job("long", gpus=1, priority=10, timeout=5000, at=1)  # would still hold its GPU at +1000
    plan = decide(Snapshot(NOW, [a], busy, [big, short, long]))
    reserved = plan.decisions["big"]
    assert isinstance(reserved, Reserve) and reserved.start_at == NOW + 1000 and reserved.nodes == ("a",)
    assert isinstance(plan.decisions["short"], Admit) and plan.decisions["short"].backfilled
    assert isinstance(plan.decisions["long"], Wait) and plan.decisions["long"].reason == BACKFILL_WINDOW
    assert plan.decisions["long"].blocked_by == "big"
    assert not a.used_gpus - {0, 1, 2, 3, 4, 5}  # the snapshot itself is never changed


def test_capacity_the_reservation_does_not_need_is_used_at_once() -> None:
    a, b = node("a"), node("b", gpus=0)
    busy = [running("r1", a, 8, ends_in=1000)]
    plan = decide(Snapshot(NOW, [a, b], busy, [job("big", gpus=8, priority=90), job("cpu", priority=1, timeout=None)]))
    assert isinstance(plan.decisions["big"], Reserve)
    cpu = plan.decisions["cpu"]
    assert isinstance(cpu, Admit) and cpu.placement.node == "b"  # no timeout, but it needs nothing reserved


def test_a_job_no_live_node_can_hold_blocks_nobody() -> None:
    plan = decide(Snapshot(NOW, [node("cpu-only", gpus=0)], [], [job("gpu", gpus=1, priority=99), job("cpu", priority=1)]))
    assert plan.decisions["gpu"].reason == NEVER_FITS_LIVE
    assert isinstance(plan.decisions["cpu"], Admit)


def test_reservations_are_kept_for_the_first_few_blocked_jobs_of_a_pool() -> None:
    a = node("a")
    busy = [running("r1", a, 8, ends_in=1000)]
    backlog = [job(f"big{i}", gpus=8, priority=90, at=i) for i in range(4)]
    plan = decide(Snapshot(NOW, [a], busy, backlog), PolicyConfig(reservation_depth=2))
    assert [type(plan.decisions[f"big{i}"]) for i in range(4)] == [Reserve, Reserve, Wait, Wait]
    assert plan.decisions["big0"].start_at == NOW + 1000 and plan.decisions["big1"].start_at == NOW + 1600
    assert plan.decisions["big2"].reason == CAPACITY


def test_fair_share_orders_equal_priorities_but_never_overrides_priority() -> None:
    a = node("a", gpus=2, slots=2)
    burst = [job(f"heavy{i}", gpus=1, owner="heavy", at=i) for i in range(5)]
    light = job("light", gpus=1, owner="light", at=100)
    urgent = job("urgent", gpus=1, owner="heavy", priority=60, at=200)
    usage = {"heavy": Usage(gpu_seconds=3600.0)}
    plan = decide(Snapshot(NOW, [a], [], burst + [light, urgent], usage=usage))
    admitted = [d.job.id for d in plan.admitted]
    assert admitted == ["urgent", "light"]
    assert plan.shares["light"].rank == 1 and plan.shares["heavy"].rank == 2


def test_fair_share_decides_among_priorities_a_point_or_two_apart_but_not_beyond_the_band() -> None:
    a = node("a", gpus=1, slots=1)
    usage = {"heavy": Usage(gpu_seconds=3600.0)}
    nudged = job("nudged", gpus=1, owner="heavy", priority=51)  # the heavy user bumps its job by a point
    light = job("light", gpus=1, owner="light", priority=50, at=100)
    banded = PolicyConfig(priority_band=5)
    # With FAIR_SHARE_PRIORITY_BAND=5, 48-52 are one level around 50: the light user's lower share wins.
    plan = decide(Snapshot(NOW, [a], [], [nudged, light], usage=usage), banded)
    assert [d.job.id for d in plan.admitted] == ["light"] and plan.order == ["light", "nudged"]
    # The default (a band of 1) is strict priority, as the contract says: the nudge wins.
    plan = decide(Snapshot(NOW, [a], [], [nudged, light], usage=usage))
    assert [d.job.id for d in plan.admitted] == ["nudged"]
    # Beyond the band priority dominates whatever the shares: 53 is the next level up from 50.
    above = job("above", gpus=1, owner="heavy", priority=53)
    plan = decide(Snapshot(NOW, [a], [], [above, light], usage=usage), banded)
    assert [d.job.id for d in plan.admitted] == ["above"]
    # An owner's own jobs keep their priority order inside the band.
    mine = [job("mine-49", gpus=1, owner="light", priority=49), job("mine-52", gpus=1, owner="light", priority=52, at=50)]
    assert decide(Snapshot(NOW, [a], [], mine), banded).order == ["mine-52", "mine-49"]


def test_weights_scale_shares() -> None:
    config = PolicyConfig(weights={"big-team": 4.0})
    usage = {"big-team": Usage(gpu_seconds=3000.0), "small": Usage(gpu_seconds=1000.0)}
    plan = decide(Snapshot(NOW, [node("a", gpus=1, slots=1)], [], [job("s", gpus=1, owner="small"), job("b", gpus=1, owner="big-team", at=1)], usage=usage), config)
    assert [d.job.id for d in plan.admitted] == ["b"]


def test_a_malformed_row_fails_alone() -> None:
    bad = Pending("bad", "x", 99, "q", NOW, -1, GIB, 0)
    plan = decide(Snapshot(NOW, [node("a")], [], [bad, job("ok")]))
    assert isinstance(plan.decisions["bad"], Fail) and isinstance(plan.decisions["ok"], Admit)


def test_strict_mode_stops_at_the_first_misfit() -> None:
    a = node("a")
    busy = [running("r1", a, 8, ends_in=1000)]
    plan = decide(Snapshot(NOW, [a, node("b", gpus=0)], busy, [job("big", gpus=8, priority=90), job("cpu", priority=1)]),
                  PolicyConfig(backfill=False, fair_share=False))
    assert not plan.admitted


def test_kubernetes_gangs_reserve_across_nodes() -> None:
    nodes = [node(f"k{i}", cluster="kube") for i in range(3)]
    busy = [running(f"r{i}", nodes[i], 6, ends_in=100 * (i + 1)) for i in range(3)]
    gang = Pending("gang", "a", 90, "q", NOW, 1000, GIB, 4, members=3, has_command=False, timeout_seconds=100)
    plan = decide(Snapshot(NOW, nodes, busy, [gang]))
    reserved = plan.decisions["gang"]
    assert isinstance(reserved, Reserve) and reserved.start_at == NOW + 200 and sorted(reserved.nodes) == ["k0", "k1"]


def _holding(nodes: list[NodeCapacity], cluster: str, parts, cpu: int, memory: int, gpus: int) -> None:  # type: ignore[no-untyped-def]
    by_name = {n.name: n for n in nodes}
    for index, (name, members) in enumerate(parts):
        node = by_name[name]
        node.used_anonymous_gpus += gpus * members
        node.used_cpu_millis += cpu * members
        node.used_memory_bytes += memory * members
        node.used_slots += 1 if index == 0 else 0


def test_backfill_never_delays_the_first_reservation_on_random_fleets() -> None:
    """Whatever is admitted now, the first reserved job still fits at its reserved start, even if every
    running and admitted job runs to its timeout (and the margin after it)."""

    from app.domain.capacity import place

    checked = 0
    for seed in range(150):
        rng = random.Random(seed)
        names = [f"n{i}" for i in range(rng.randint(1, 5))]
        fresh = lambda: [NodeCapacity("local", n, list(range(8)), "H100", 32_000, 256 * GIB, 8) for n in names]  # noqa: E731
        nodes = fresh()
        running = []
        for r in range(rng.randint(0, 12)):
            gpus = rng.choice((1, 2, 4, 8))
            placement = place(nodes, 2000, 8 * GIB, gpus, 1)
            if placement is not None:
                running.append(Running(f"r{r}", "x", "local", ((placement.node, 1),), 2000, 8 * GIB, gpus, NOW + rng.randint(10, 5000)))
        backlog = [
            Pending(f"p{j}", rng.choice("abc"), rng.choice((10, 50, 90)), "q", NOW - rng.randint(0, 900), rng.choice((1000, 4000)),
                    rng.choice((GIB, 16 * GIB)), rng.choice((0, 1, 2, 4, 8)), timeout_seconds=rng.choice((60, 600, 3600, None)))
            for j in range(rng.randint(1, 25))
        ]
        margin = 5.0
        plan = decide(Snapshot(NOW, nodes, running, backlog), PolicyConfig(end_margin_seconds=margin))
        first = next((plan.decisions[j] for j in plan.order if isinstance(plan.decisions[j], Reserve)), None)
        if first is None:
            continue
        later = fresh()
        for attempt in running:
            if attempt.ends_at > first.start_at:
                _holding(later, "local", attempt.parts, attempt.cpu_millis, attempt.memory_bytes, attempt.gpus)
        for admitted in plan.admitted:
            if NOW + admitted.job.duration + margin > first.start_at:
                parts = tuple((name, members) for name, members, _ in admitted.placement.parts)
                _holding(later, "local", parts, admitted.job.cpu_millis, admitted.job.memory_bytes, admitted.job.gpus)
        job = first.job
        assert place(later, job.cpu_millis, job.memory_bytes, job.gpus, job.members) is not None, (seed, first)
        checked += 1
    assert checked > 20


def test_a_request_found_unreservable_is_swept_once_and_decisions_are_unchanged(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The timeline remembers requests for which no start exists (capacity held without timeouts) until it
    changes: a backlog of alike jobs costs one sweep per pass, and every decision is what sweeping each gives."""

    from app.domain import policy
    from app.domain.capacity import place

    def scenario(seed: int) -> Snapshot:
        rng = random.Random(seed)
        nodes = [NodeCapacity("local", f"n{i}", list(range(8)), "H100", 32_000, 256 * GIB, rng.choice((2, 4, 8)))
                 for i in range(rng.randint(1, 4))]
        running = []
        for r in range(rng.randint(1, 12)):
            gpus = rng.choice((0, 1, 2, 4, 8))
            placement = place(nodes, 2000, 8 * GIB, gpus, 1)
            if placement is not None:
                ends = rng.choice((policy.INF, policy.INF, NOW + rng.randint(10, 5000)))  # mostly no timeout
                running.append(Running(f"r{r}", "x", "local", ((placement.node, 1),), 2000, 8 * GIB, gpus, ends))
        backlog = [
            Pending(f"p{j}", rng.choice("ab"), rng.choice((10, 50)), "q", NOW - rng.randint(0, 900), rng.choice((1000, 4000)),
                    GIB, rng.choice((0, 1, 8)), timeout_seconds=rng.choice((60, None, None)))
            for j in range(rng.randint(5, 60))
        ]
        return Snapshot(NOW, nodes, running, backlog)

    def summary(plan: policy.Plan) -> list[tuple]:
        return [(j, type(plan.decisions[j]).__name__, getattr(plan.decisions[j], "start_at", None),
                 getattr(plan.decisions[j], "reason", None)) for j in plan.order]

    sweeps = 0
    real_sweep = policy._Timeline._reserve

    def counted(self, job, *, commit):  # type: ignore[no-untyped-def]
        nonlocal sweeps
        sweeps += 1
        return real_sweep(self, job, commit=commit)

    cached, uncached, saved = [], [], 0
    for seed in range(120):
        monkeypatch.setattr(policy._Timeline, "_reserve", counted)
        sweeps = 0
        cached.append(summary(decide(scenario(seed))))
        with_cache = sweeps
        # Without the memory: every request swept afresh.
        monkeypatch.setattr(policy._Timeline, "reserve", lambda self, job, *, commit: counted(self, job, commit=commit))
        sweeps = 0
        uncached.append(summary(decide(scenario(seed))))
        saved += sweeps - with_cache
        monkeypatch.undo()
    assert cached == uncached
    assert saved > 100  # the memory was used, on many requests


def random_fleet(rng: random.Random, slots: list[int]) -> tuple[list[NodeCapacity], list[Running]]:
    """One to four nodes of random sizes, and up to twelve attempts running on them."""
    nodes = [node(f"n{i}", gpus=rng.choice([0, 2, 8]), cpu=rng.choice([2000, 8000, 64_000]), slots=rng.choice(slots))
             for i in range(rng.randint(1, 4))]
    busy = []
    for r in range(rng.randint(0, 12)):
        target = rng.choice(nodes)
        if target.used_slots < target.slots and target.used_cpu_millis + 1000 <= target.cpu_millis:
            gpus = min(rng.choice([0, 1, 2]), len(target.free_gpus))
            busy.append(running(f"r{r}", target, gpus, ends_in=rng.choice([30.0, 600.0, float("inf")]), owner=rng.choice(["bob", "carol"])))
    return nodes, busy


def test_an_admission_pass_that_stops_when_the_fleet_is_full_admits_fails_and_preempts_as_the_whole_walk() -> None:
    """PolicyConfig.admissions_only (the scheduler's pass): over random fleets, backlogs (some malformed) and running
    attempts (some preemptible), the admissions and preemptions are the whole walk's, every job the whole walk fails
    fails, and a job failed beyond it is malformed; and the walk does stop early when every slot is taken."""
    import dataclasses

    from app.domain.capacity import malformed
    from app.domain.quotas import FLEET, Quota

    rng = random.Random(20261128)
    stopped = truncated = stopped_beside_candidates = 0
    for case in range(400):
        nodes, busy = random_fleet(rng, slots=[1, 2, 4, 16])
        busy = [dataclasses.replace(attempt, priority=rng.choice([10, 50]), preemptible=rng.random() < 0.5,
                                    started_at=NOW - rng.choice([5.0, 3600.0]), stopping=rng.random() < 0.05) for attempt in busy]
        levels = rng.choice([[10, 50, 50, 90], [10, 50], [10]])  # some backlogs cannot preempt the fleet's priority-10 or -50 jobs
        backlog = [
            dataclasses.replace(job(f"j{j:03d}", gpus=rng.choice([0, 0, 1, 2, 8]), priority=rng.choice(levels),
                                    owner=rng.choice(["alice", "bob", "carol"]), timeout=rng.choice([None, 60, 600]), at=float(j),
                                    members=rng.choice([1, 1, 1, 1, 1, 1, 1, 1, 1, 0])),
                                queue=rng.choice(["q", "r"]))
            for j in range(rng.randint(1, 120))
        ]
        room = {"q": rng.randint(0, 5), "r": rng.randint(0, 50)} if rng.random() < 0.3 else None
        quota = {"alice": [Quota("alice", FLEET, (rng.choice([1, 4]), None, None))]} if rng.random() < 0.2 else {}
        snapshot = Snapshot(NOW, nodes, busy, backlog, queue_room=room, quotas=quota)
        config = PolicyConfig(reservation_depth=rng.choice([0, 1, 4]), scan_limit=rng.choice([5, 2000]),
                              preemption=rng.random() < 0.5, preemption_min_run_seconds=60.0)
        whole = decide(snapshot, config)
        fast = decide(snapshot, dataclasses.replace(config, admissions_only=True))
        assert fast.admitted == whole.admitted, case
        assert fast.preemptions == whole.preemptions, case
        failed = {d.job.id: d for d in fast.decisions.values() if isinstance(d, Fail)}
        for decision in whole.decisions.values():
            if isinstance(decision, Fail):
                assert failed.pop(decision.job.id) == decision, case
        assert all(malformed(d.job.cpu_millis, d.job.memory_bytes, d.job.gpus, d.job.members) for d in failed.values()), case
        stopped += len(fast.decisions) < len(whole.decisions)
        candidates = any(r.preemptible and not r.stopping and NOW - r.started_at >= 60.0 for r in busy)
        stopped_beside_candidates += config.preemption and candidates and len(fast.decisions) < len(whole.decisions)
        if fast.stopped_after is not None:
            # Plan.stopped_after's promise (the scheduler's short backlog): each owner's first stopped_after + 1 jobs, in
            # its own order, admit what the whole backlog admits.
            keep = fast.stopped_after + 1
            mine: dict[str, list[Pending]] = {}
            for pending in sorted(backlog, key=lambda j: (-j.priority, j.submitted_at, j.id)):
                mine.setdefault(pending.owner, []).append(pending)
            heads = [pending for jobs in mine.values() for pending in jobs[:keep]]
            short = decide(dataclasses.replace(snapshot, backlog=heads), dataclasses.replace(config, admissions_only=True))
            assert short.admitted == whole.admitted, case
            truncated += len(heads) < len(backlog)
    assert stopped > 50  # the walk did stop early, in many cases
    assert truncated > 20  # and the short backlogs left jobs out
    assert stopped_beside_candidates > 5  # also with preemption on and victims running, when nobody waiting outranks them

    # A full node behind a big backlog: the walk admits the one free slot's job and stops; a malformed job far back
    # still fails; with a focus (an explanation) it walks everything.
    full = node("full", gpus=0, cpu=64_000, slots=4)
    busy = [running(f"r{i}", full, 0, ends_in=600.0) for i in range(3)]
    backlog = [job(f"k{i:03d}", at=float(i)) for i in range(300)] + [job("bad", at=400.0, members=0)]
    plan = decide(Snapshot(NOW, [full], busy, backlog), PolicyConfig(admissions_only=True))
    assert [d.job.id for d in plan.admitted] == ["k000"]
    assert isinstance(plan.decisions["bad"], Fail) and len(plan.decisions) == 2  # k000 and bad: nothing else walked
    focused = decide(Snapshot(NOW, [full], busy, backlog, focus="k200"), PolicyConfig(admissions_only=True))
    assert len(focused.decisions) == 301 and focused.decisions["k200"].reason == CAPACITY


def test_repeated_decisions_are_exactly_what_the_whole_walk_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job whose shape's earlier job waited for capacity or for an unpromisable start gets the same decision without
    the walk (policy._REPEAT_DECISIONS): over random fleets and backlogs, the plans are identical either way."""
    import dataclasses

    from app.domain import policy as policy_module
    from app.domain.quotas import FLEET, Quota

    rng = random.Random(20261128)
    for case in range(300):
        nodes, busy = random_fleet(rng, slots=[1, 4, 16])
        backlog = [
            dataclasses.replace(job(f"j{j:03d}", gpus=rng.choice([0, 0, 1, 2, 8]), priority=rng.choice([10, 50, 50, 90]),
                                    owner=rng.choice(["alice", "bob", "carol"]), timeout=rng.choice([None, 60, 600]), at=float(j)),
                                queue=rng.choice(["q", "r"]))
            for j in range(rng.randint(1, 120))
        ]
        room = {"q": rng.randint(0, 5), "r": rng.randint(0, 50)} if rng.random() < 0.3 else None
        quota = {"alice": [Quota("alice", FLEET, (rng.choice([1, 4]), None, None))]} if rng.random() < 0.2 else {}
        focus = rng.choice(backlog).id if rng.random() < 0.3 else None
        snapshot = Snapshot(NOW, nodes, busy, backlog, queue_room=room, focus=focus, quotas=quota)
        config = PolicyConfig(reservation_depth=rng.choice([0, 1, 4]), scan_limit=rng.choice([5, 2000]))
        monkeypatch.setattr(policy_module, "_REPEAT_DECISIONS", True)
        fast = decide(snapshot, config)
        monkeypatch.setattr(policy_module, "_REPEAT_DECISIONS", False)
        walked = decide(snapshot, config)
        assert fast.order == walked.order, case
        assert fast.decisions == walked.decisions, case
        assert fast.preemptions == walked.preemptions, case
    # The shortcut is taken at all: a backlog of alike jobs behind a full node is decided mostly by it (only the jobs
    # walked to their decision look for room among the misfits).
    walks = 0
    real_covers = policy_module._Misfits.covers

    def counting(self: object, pending: Pending) -> bool:
        nonlocal walks
        walks += 1
        return real_covers(self, pending)  # type: ignore[arg-type]

    monkeypatch.setattr(policy_module, "_REPEAT_DECISIONS", True)
    monkeypatch.setattr(policy_module._Misfits, "covers", counting)
    for ends_in, reasons, walked in ((float("inf"), {"NO_RESERVATION"}, 1), (600.0, {"CAPACITY"}, 5)):
        full = node("full", gpus=0, cpu=4000, slots=4)
        busy = [running(f"r{i}", full, 0, ends_in=ends_in) for i in range(4)]
        walks = 0
        plan = decide(Snapshot(NOW, [full], busy, [job(f"k{i}", timeout=None, at=float(i)) for i in range(50)]))
        assert {d.reason for d in plan.decisions.values() if isinstance(d, Wait)} == reasons
        assert walks == walked
