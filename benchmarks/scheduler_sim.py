"""Scheduler simulator: the real policy function (app.domain.policy.decide) over a simulated clock.

No database: a seeded trace of jobs arrives at a simulated fleet, a pass runs when something arrives
or ends (at most once per --interval simulated seconds: the scheduler's NOTIFY wake-ups, coalesced to keep the
simulation short; but at once when a preempted job's kill grace ends, so its room goes to its preemptor
without waiting out the interval, as the worker's NOTIFY 'resources-released' wakes the scheduler), jobs run
for their true run time (at most their timeout) and free their capacity. The same trace is run under
the old strict policy (priority then age, the first misfit stops the pass) and the new one
(reservations, backfill, pools, fair share), and the figures are printed side by side.

    python benchmarks/scheduler_sim.py                      # the default: 6 simulated hours, 1,000 GPUs
    python benchmarks/scheduler_sim.py --hours 12 --seed 7 --gpu-nodes 250

A third run adds quotas (each tenant's weight-entitled share of the GPUs, plus a borrowing limit) and
preemption (issue 11) to the new policy, on the same trace: high-priority submit-to-start, GPU-seconds
lost to preemption, quota violations and preemption loops (both must be 0).
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import math
import random
import statistics
import sys
import time
from collections import defaultdict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.domain.capacity import NodeCapacity, Placement, place  # noqa: E402
from app.domain.policy import (  # noqa: E402
    Admit, Pending, Plan, PolicyConfig, Reserve, Running, Snapshot, Usage, Wait, decide,
)
from app.domain import policy as policy_module  # noqa: E402
from app.domain import quotas as quota_rules  # noqa: E402
from app.domain.policy import _holding as policy_holding  # noqa: E402
from app.domain.quotas import Quota  # noqa: E402
from app.domain.scheduling import BACKLOG_PER_OWNER, BACKLOG_PER_POOL, waiting_for_room  # noqa: E402
from config import Settings  # noqa: E402

GIB = 1 << 30
CLUSTER = "gpu-cluster"
BANDS = ((0, 24), (25, 49), (50, 74), (75, 100))
PER_OWNER, PER_POOL = BACKLOG_PER_OWNER, BACKLOG_PER_POOL  # the scheduler's own pruning (scheduling.load_snapshot)
BURST_AT: list = [math.inf, ""]  # when the burst comes and whose it is (set by make_trace)
PREEMPT_TIME = [0.0]  # seconds the policy's preemption phase took in the current pass


def _timed_preempt(preempt):  # type: ignore[no-untyped-def]
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return preempt(*args, **kwargs)
        finally:
            PREEMPT_TIME[0] += time.perf_counter() - started
    return wrapper


policy_module._preempt = _timed_preempt(policy_module._preempt)  # decide() looks it up by name: the phase is timed apart


@dataclass
class SimJob:
    pending: Pending
    kind: str
    runtime: float
    started: float | None = None
    ended: float | None = None
    placement: Placement | None = None
    promise: tuple[float, float] | None = None  # (made at, start promised) by its latest reservation
    attempt: int = 0  # bumped by a preemption: its old end event is stale
    first_started: float | None = None
    why: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # high priority: passes it waited, by reason
    log: list[tuple[float, str]] = field(default_factory=list)  # high priority: (pass, why it waited), for diagnosis


# --- the trace -------------------------------------------------------------------------------------


def make_trace(seed: int, hours: float, gpus: int, tenants: dict[str, float], load: float) -> list[SimJob]:
    """1-GPU inference (seconds to minutes), 8-GPU training and 2-4 node gangs (hours), CPU-only jobs;
    priorities 0-100; true run time at most the timeout, often much less; one tenant bursts."""
    rng = random.Random(seed)
    horizon = hours * 3600
    names = list(tenants)
    # Share of the GPU demand per kind and its mean GPU-seconds per job, to size the arrival rates.
    kinds = {
        "inference": (0.15, 1 * 150.0),
        "train-8": (0.45, 8 * 2700.0),
        "gang": (0.40, 24 * 3000.0),
    }
    jobs: list[SimJob] = []
    counter = 0

    def level(weights: tuple[float, float, float]) -> int:
        """Priorities as teams set them: a few levels (urgent, normal, low), jittered by a point or two."""
        base = rng.choices((80, 50, 20), weights)[0]
        return base + rng.choice((0, 0, 0, 1, -1))

    def add(kind: str, at: float, tenant: str) -> None:
        nonlocal counter
        counter += 1
        if kind == "inference":
            runtime = min(600.0, max(5.0, rng.lognormvariate(math.log(90), 0.9)))
            timeout, gpus_, members, cpu, mem, priority = runtime * rng.uniform(1.2, 3.0), 1, 1, 4000, 32 * GIB, level((0.3, 0.6, 0.1))
        elif kind == "train-8":
            runtime = rng.uniform(900, 4500)
            timeout, gpus_, members, cpu, mem, priority = runtime * rng.uniform(1.1, 2.0), 8, 1, 64000, 512 * GIB, level((0.1, 0.7, 0.2))
        elif kind == "gang":
            runtime = rng.uniform(1200, 4800)
            timeout, gpus_, members, cpu, mem, priority = runtime * rng.uniform(1.1, 2.0), 8, rng.randint(2, 4), 64000, 512 * GIB, level((0.1, 0.7, 0.2))
        else:  # cpu
            runtime = rng.uniform(30, 1200)
            timeout, gpus_, members, cpu, mem, priority = runtime * rng.uniform(1.2, 3.0), 0, 1, rng.choice((2000, 4000, 8000, 16000)), 16 * GIB, level((0.0, 0.6, 0.4))
        if rng.random() < 0.3:
            runtime = runtime * rng.uniform(0.1, 0.6)  # many jobs end well before their limit
        job = Pending(f"j{counter}", tenant, priority, "default", at, cpu, mem, gpus_, members, False, math.ceil(timeout))
        jobs.append(SimJob(job, kind, runtime))

    for kind, (share, gpu_seconds) in kinds.items():
        rate = load * gpus * share / gpu_seconds  # jobs per second
        at = 0.0
        while True:
            at += rng.expovariate(rate)
            if at >= horizon:
                break
            add(kind, at, rng.choice(names[:-1]))  # the last tenant only bursts (below)
    cpu_rate = 0.05
    at = 0.0
    while (at := at + rng.expovariate(cpu_rate)) < horizon:
        add("cpu", at, rng.choice(names))
    # The burst: the last tenant submits a mass of inference and training jobs at once, after 1 hour.
    burst_at = min(3600.0, horizon / 4)
    BURST_AT[:] = [burst_at, names[-1]]
    for i in range(int(gpus * 4)):
        add("inference" if i % 10 else "train-8", burst_at + i * 0.01, names[-1])
    jobs.sort(key=lambda j: j.pending.submitted_at)
    return jobs


def make_fleet(gpu_nodes: int, cpu_nodes: int) -> list[NodeCapacity]:
    nodes = [NodeCapacity(CLUSTER, f"gpu-{i:04d}", list(range(8)), "H100", 128_000, 2048 * GIB, 16) for i in range(gpu_nodes)]
    nodes += [NodeCapacity(CLUSTER, f"cpu-{i:04d}", [], None, 64_000, 256 * GIB, 32) for i in range(cpu_nodes)]
    return nodes


# --- the backlog as the scheduler's loader prunes it ------------------------------------------------


class Backlog:
    """Pending jobs indexed as PostgreSQL's partial indexes are: per owner and per pool, by priority then age."""

    def __init__(self) -> None:
        self.by_owner: dict[str, dict[int, deque[SimJob]]] = defaultdict(lambda: defaultdict(deque))
        self.by_pool: dict[str, dict[int, deque[SimJob]]] = defaultdict(lambda: defaultdict(deque))
        self.count = 0
        self.gpu_demand = 0

    def add(self, job: SimJob) -> None:
        """In its place by submit time, as the indexes order it: a preempted job goes back ahead of those submitted after it."""
        p = job.pending
        for queue in (self.by_owner[p.owner][p.priority], self.by_pool["gpu" if p.gpus else "cpu"][p.priority]):
            if not queue or queue[-1].pending.submitted_at <= p.submitted_at:
                queue.append(job)  # an arrival: the newest
            else:
                queue.insert(bisect.bisect_right(queue, p.submitted_at, key=lambda j: j.pending.submitted_at), job)
        self.count += 1
        self.gpu_demand += p.gpus * p.members

    def started(self, job: SimJob) -> None:
        self.count -= 1
        self.gpu_demand -= job.pending.gpus * job.pending.members

    @staticmethod
    def _head(levels: dict[int, deque[SimJob]], limit: int, uncounted: Collection[str] = ()) -> list[SimJob]:
        out: list[SimJob] = []
        # A preempted job's first entry may still be queued (removed lazily) beside its new one; `uncounted` are left
        # out of the head (read besides it).
        listed: set[str] = set(uncounted)
        for priority in sorted(levels, reverse=True):
            queue = levels[priority]
            while queue and queue[0].started is not None:
                queue.popleft()
            for job in queue:
                if job.started is None and job.pending.id not in listed:
                    listed.add(job.pending.id)
                    out.append(job)
                    if len(out) >= limit:
                        return out
        return out

    def pruned(self, waiting: Collection[SimJob] = ()) -> list[Pending]:
        """The heads, as scheduling._HEADS reads them: `waiting` (the preemptors waiting for their room, pending) are
        not counted in the pools' heads, and are read besides them."""
        seen: dict[str, Pending] = {}
        for levels in self.by_owner.values():
            for job in self._head(levels, PER_OWNER):
                seen[job.pending.id] = job.pending
        uncounted = {job.pending.id for job in waiting}
        for levels in self.by_pool.values():
            for job in self._head(levels, PER_POOL, uncounted):
                seen[job.pending.id] = job.pending
        for job in waiting:
            seen[job.pending.id] = job.pending
        return list(seen.values())

    def tenants_waiting_for_gpus(self) -> set[str]:
        return {owner for owner, levels in self.by_owner.items()
                if any(j.started is None and j.pending.gpus for q in levels.values() for j in q)}


# --- the simulation ------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    busy_while_waiting: float = 0.0
    available_while_waiting: float = 0.0
    ideal_while_waiting: float = 0.0
    waits: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    delayed_reservations: int = 0
    reserved_jobs: int = 0
    partial_gangs: int = 0
    decisions: int = 0
    policy_seconds: float = 0.0
    passes: int = 0
    fair_hours: int = 0
    tenant_gpu_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    started: int = 0
    unstarted: int = 0
    preemptions: int = 0
    searches: int = 0  # victim searches run (policy.PreemptionSearch), all passes
    searches_skipped: int = 0  # blocked jobs not searched: the same shape failed at an equal or higher priority
    max_searches: int = 0  # in one pass
    passes_cut: int = 0  # passes whose search limits left blocked jobs unexamined
    preempt_seconds: float = 0.0  # time in the policy's preemption phase, all passes
    preempt_max: float = 0.0  # in one pass
    victims_per_minute: int = 0  # most victims in any 60 simulated seconds (what the rate limit would have to allow)
    victim_gpus_per_minute: int = 0  # their GPUs
    gpu_seconds_lost: float = 0.0
    preemption_loops: int = 0
    repeated_preemptions: int = 0
    quota_violations: int = 0
    quota_waits: int = 0
    high: list[SimJob] = field(default_factory=list)  # high-priority jobs, with why they waited
    target: float = 0.0


def hold(nodes: dict[str, NodeCapacity], placement: Placement, job: Pending, sign: int) -> None:
    for index, (name, members, _) in enumerate(placement.parts):
        node = nodes[name]
        node.used_anonymous_gpus += sign * job.gpus * members
        node.used_cpu_millis += sign * job.cpu_millis * members
        node.used_memory_bytes += sign * job.memory_bytes * members
        node.used_slots += sign * (1 if index == 0 else 0)


def simulate(name: str, trace: list[SimJob], fleet: list[NodeCapacity], config: PolicyConfig, hours: float, interval: float,
             tenants: dict[str, float], quotas: dict[str, list[Quota]] | None = None, kill_grace: float = 10.0,
             max_per_minute: int | None = None, trace_repeats: bool = False) -> Result:
    """`max_per_minute`: PREEMPTION_MAX_PER_MINUTE, given to the policy as the scheduler does (preemption_budget:
    per cluster, the limit less the victims of the last 60 s); None: unlimited."""
    result = Result(name, target=kill_grace + interval)
    recent_victims: deque[tuple[float, str]] = deque()  # (when, cluster) of every victim, for the rate limit
    recent_preemptors: deque[tuple[float, str]] = deque()  # (when, preemptor) of every preemption (scheduling.waiting_for_room)
    minute: deque[tuple[float, int]] = deque()  # (when, GPUs) of the victims of the last 60 s, for the peak rate
    quotas = quotas or {}
    preempted_by: set[tuple[str, str]] = set()  # (preemptor, victim)
    jobs = [SimJob(j.pending, j.kind, j.runtime) for j in trace]
    nodes = {n.name: NodeCapacity(n.cluster, n.name, list(n.gpu_indices), n.gpu_type, n.cpu_millis, n.memory_bytes, n.slots) for n in fleet}
    total_gpus = sum(len(n.gpu_indices) for n in fleet)
    horizon = hours * 3600
    backlog = Backlog()
    running: dict[str, tuple[SimJob, Running]] = {}
    ends: list[tuple[float, str]] = []
    releases: list[float] = []  # when preempted attempts end (their kill grace): each wakes a pass
    usage: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    holding: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # GPUs, CPUs, GiB held now

    def held(job: Pending, sign: int) -> None:
        vec = holding[job.owner]
        vec[0] += sign * job.gpus * job.members
        vec[1] += sign * job.cpu_millis / 1000 * job.members
        vec[2] += sign * job.memory_bytes / GIB * job.members
    arrivals = deque(jobs)
    by_id = {j.pending.id: j for j in jobs}
    clock = 0.0
    last_pass = -interval
    busy = 0
    hour_backlogged: dict[int, bool] = {}
    hour_gpu: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def advance(to: float) -> None:
        """Integrate figures from `clock` to `to` (nothing changes in between)."""
        nonlocal clock
        dt = to - clock
        if dt <= 0:
            return
        waiting = backlog.gpu_demand > 0
        if waiting:
            result.busy_while_waiting += busy * dt
            result.available_while_waiting += total_gpus * dt
            result.ideal_while_waiting += min(total_gpus, busy + backlog.gpu_demand) * dt
        factor = 0.5 ** (dt / config.half_life_seconds)
        for owner, held in holding.items():
            used = usage[owner]
            usage[owner] = [u * factor + h * dt for u, h in zip(used, held)]
            if held[0]:
                start = clock  # GPU-seconds attributed to the hours they fall in
                while start < to:
                    hour = int(start // 3600)
                    stop = min(to, (hour + 1) * 3600)
                    hour_gpu[hour][owner] += held[0] * (stop - start)
                    start = stop
        clock = to

    while clock < horizon:
        next_event = min(arrivals[0].pending.submitted_at if arrivals else math.inf, ends[0][0] if ends else math.inf)
        if next_event == math.inf:
            break
        at = max(next_event, last_pass + interval)
        # A preempted attempt's end wakes a pass at once, however recent the last one: its worker's report of the
        # processes gone commits with a NOTIFY (execution.end, 'resources-released') and the scheduler passes on
        # every NOTIFY. That pass starts the jobs the room was freed for; waiting out the coalescing interval instead
        # would add up to a whole interval to every preemptor's start.
        while releases and releases[0] <= last_pass:
            heapq.heappop(releases)
        if releases and releases[0] < at:
            at = releases[0]
        if at >= horizon:
            break
        # Everything that happened up to the pass, in time order.
        while True:
            t_arrival = arrivals[0].pending.submitted_at if arrivals and arrivals[0].pending.submitted_at <= at else math.inf
            t_end = ends[0][0] if ends and ends[0][0] <= at else math.inf
            if t_arrival == t_end == math.inf:
                break
            if t_arrival <= t_end:
                advance(t_arrival)
                backlog.add(arrivals.popleft())
            else:
                advance(t_end)
                _, job_id, attempt_no = heapq.heappop(ends)
                entry = running.get(job_id)
                if entry is None or attempt_no != entry[0].attempt:
                    continue  # the end of an attempt that was preempted
                job, attempt = entry
                running.pop(job_id)
                hold(nodes, job.placement, job.pending, -1)
                held(job.pending, -1)
                busy -= job.pending.gpus * job.pending.members
                if attempt.stopping:  # preempted: back to the backlog, keeping its submit time
                    job.started, job.placement, job.promise = None, None, None
                    job.attempt += 1
                    backlog.add(job)
                else:
                    job.ended = t_end
        advance(at)
        last_pass = at
        # The pass.
        attempts = [attempt for _, attempt in running.values()]
        owner_usage = {o: Usage(*u) for o, u in usage.items()}
        started = time.perf_counter()
        budget = None
        if config.preemption and max_per_minute is not None:
            while recent_victims and recent_victims[0][0] <= at - 60:
                recent_victims.popleft()
            used_budget: dict[str, int] = defaultdict(int)
            for _, cluster in recent_victims:
                used_budget[cluster] += 1
            budget = {c: max(0, max_per_minute - used_budget[c]) for c in {n.cluster for n in nodes.values()}}
        # The preemptors waiting for their room (scheduling.waiting_for_room: those of stopping victims, and of the last
        # minute's preemptions, as _PASS_FACTS reads them) that are pending (not started).
        while recent_preemptors and recent_preemptors[0][0] <= at - 60:
            recent_preemptors.popleft()
        waiting = [by_id[job_id] for job_id in waiting_for_room(attempts, (job_id for _, job_id in recent_preemptors))
                   if by_id[job_id].started is None]
        snapshot = Snapshot(at, list(nodes.values()), attempts, backlog.pruned(waiting), owner_usage, quotas=quotas,
                            preemption_budget=budget)
        plan = decide(snapshot, config)
        result.policy_seconds += time.perf_counter() - started
        result.passes += 1
        result.decisions += len(plan.decisions)
        search = plan.preemption_search
        result.searches += search.searched
        result.searches_skipped += search.skipped
        result.max_searches = max(result.max_searches, search.searched)
        result.passes_cut += 1 if search.unexamined else 0
        result.preempt_seconds += PREEMPT_TIME[0]
        result.preempt_max = max(result.preempt_max, PREEMPT_TIME[0])
        PREEMPT_TIME[0] = 0.0
        hour = int(at // 3600)
        waiting_tenants = backlog.tenants_waiting_for_gpus()
        hour_backlogged[hour] = hour_backlogged.get(hour, True) and waiting_tenants >= set(tenants)
        order_index = {job_id: i for i, job_id in enumerate(plan.order)}
        if config.backfill:
            _diagnose(plan, snapshot, config, by_id, budget)
            pruned = {job.id for job in snapshot.backlog}  # a high-priority job left out of it waits this pass unseen
            for levels in backlog.by_pool.values():
                for priority, queue in levels.items():
                    if priority >= 75:
                        for job in queue:
                            if job.started is None and job.pending.id not in pruned:
                                pruned.add(job.pending.id)  # a preempted job may be queued twice (see Backlog._head)
                                job.why[HIDDEN] += 1
                                job.log.append((at, HIDDEN))
        for decision in plan.decisions.values():
            job_id = decision.job.id
            if isinstance(decision, Admit):
                job = by_id[job_id]
                placed = sum(members for _, members, _ in decision.placement.parts)
                if placed != decision.job.members:
                    result.partial_gangs += 1
                if job.promise is not None and at > job.promise[1] + interval:
                    if not _displaced(plan, order_index, job, job.promise[0]):
                        result.delayed_reservations += 1
                job.started = at
                job.placement = decision.placement
                backlog.started(job)
                hold(nodes, decision.placement, decision.job, +1)
                held(decision.job, +1)
                busy += decision.job.gpus * decision.job.members
                end = at + min(job.runtime, decision.job.duration)
                running[job_id] = (job, Running(job_id, decision.job.owner, CLUSTER,
                                                tuple((n, m) for n, m, _ in decision.placement.parts),
                                                decision.job.cpu_millis, decision.job.memory_bytes, decision.job.gpus,
                                                at + decision.job.duration, priority=decision.job.priority, preemptible=True,
                                                started_at=at, preempted_by=job.pending.preempted_by))
                heapq.heappush(ends, (end, job_id, job.attempt))
                if job.first_started is None:
                    job.first_started = at
                    result.started += 1
                    result.waits[decision.job.priority].append(at - decision.job.submitted_at)
            elif getattr(decision, "reason", None) == "QUOTA_EXCEEDED":
                result.quota_waits += 1
            elif isinstance(decision, Reserve):
                job = by_id[job_id]
                if job.promise is None:
                    result.reserved_jobs += 1
                job.promise = (at, decision.start_at)
        for preemption in plan.preemptions:
            for victim in preemption.victims:
                job, attempt = running[victim.id]
                members = sum(m for _, m in attempt.parts)
                result.preemptions += 1
                recent_victims.append((at, victim.cluster))
                recent_preemptors.append((at, preemption.job.id))
                minute.append((at, attempt.gpus * members))
                while minute[0][0] <= at - 60:
                    minute.popleft()
                result.victims_per_minute = max(result.victims_per_minute, len(minute))
                result.victim_gpus_per_minute = max(result.victim_gpus_per_minute, sum(g for _, g in minute))
                result.gpu_seconds_lost += attempt.gpus * members * (at - (job.started or at))
                if (victim.id, preemption.job.id) in preempted_by:
                    result.preemption_loops += 1  # a cycle: the victim once preempted its preemptor
                if (preemption.job.id, victim.id) in preempted_by:
                    result.repeated_preemptions += 1  # the same job preempted again for the same preemptor
                    if trace_repeats:
                        print(f"  repeat at {at:.0f}: {preemption.job.id} (p{preemption.job.priority}, {preemption.job.owner}) preempts "
                              f"{victim.id} (p{victim.priority}, {victim.owner}) again; "
                              f"{preemption.job.id} was {by_id[preemption.job.id].started} started", file=sys.stderr)
                preempted_by.add((preemption.job.id, victim.id))
                job.pending = dataclasses.replace(job.pending, preempted_by=job.pending.preempted_by | {preemption.job.id})
                # It holds its capacity through the kill grace, then goes back to the backlog.
                # Its attempt names its preemptor, as the scheduler's holder rows do (the preemption events of the
                # window): the policy keeps the room being freed for it (policy._withheld).
                running[victim.id] = (job, dataclasses.replace(attempt, stopping=True, preemptible=False, ends_at=at + kill_grace,
                                                               preempted_by=job.pending.preempted_by))
                heapq.heappush(ends, (at + kill_grace, victim.id, job.attempt))
                heapq.heappush(releases, at + kill_grace)
        if quotas:
            used: dict[str, float] = defaultdict(float)
            for job, attempt in running.values():
                used[attempt.owner] += attempt.gpus * sum(m for _, m in attempt.parts)
            for owner, rows in quotas.items():
                limit = rows[0].limit(0)
                if limit is not None and used[owner] > limit:
                    result.quota_violations += 1
    advance(horizon)
    result.unstarted = backlog.count
    for job in jobs:  # still waiting at the end: their wait so far (a lower bound) counts too
        if job.started is None and job.pending.submitted_at < horizon:
            result.waits[job.pending.priority].append(horizon - job.pending.submitted_at)
    result.high = [j for j in jobs if j.pending.priority >= 75 and j.pending.submitted_at < horizon]
    for hour, backlogged in hour_backlogged.items():
        if backlogged and hour < int(horizon // 3600):
            result.fair_hours += 1
            for owner, seconds in hour_gpu[hour].items():
                result.tenant_gpu_seconds[owner] += seconds
    return result


# Why a high-priority job waited, pass by pass. "Does not fit" reasons exclude it from the target (a high-priority
# job that fits the fleet starts within the kill grace plus one pass): the fleet is held by work of its own priority
# or higher, its tenant is at its quota, or no node could ever hold it.
HIDDEN = "not in the backlog's head (the per-owner and per-pool limits) in a pass"
NOT_FITTING = ("held by equal or higher priority", "over its tenant's quota", "no node could hold it",
               "beyond its tenant's nominal quota (borrows idle capacity only)")


def _diagnose(plan: Plan, snapshot: Snapshot, config: PolicyConfig, by_id: dict[str, SimJob], budget: dict[str, int] | None) -> None:
    """Why each blocked high-priority job waits this pass: what the policy's preemption phase did for it
    (plan.preemption_search.outcomes), and, for the rest, counterfactuals on the capacity the pass left
    (plan.free, with what stopping victims hold counted free, as the policy counts it)."""
    blocked = [plan.decisions[j] for j in plan.order if plan.decisions[j].job.priority >= 75 and not isinstance(plan.decisions[j], Admit)]
    if not blocked:
        return
    search = plan.preemption_search
    unexamined: set[str] = set()  # left for the next pass by the search limits
    if search.first_unexamined is not None:
        after = plan.order[plan.order.index(search.first_unexamined):]
        unexamined = {j for j in after if isinstance(plan.decisions[j], Reserve)
                      or getattr(plan.decisions[j], "reason", None) in ("CAPACITY", "NO_RESERVATION")}
    # Counterfactuals, per priority level: the capacity the pass left with every strictly lower-priority attempt gone
    # (all of them, and the lower-priority jobs this pass admitted; or only the attempts past the minimum run time),
    # the blocked jobs of that level or higher placed in the pass's order. Does not fit even with all lower-priority
    # work gone: the capacity is held by work of its priority or higher (running, admitted, or ahead of it).
    fits_all: dict[str, bool] = {}
    fits_old: dict[str, bool] = {}
    for level in sorted({d.job.priority for d in blocked}):
        for store, old_only in ((fits_all, False), (fits_old, True)):
            nodes = [n.copy() for n in plan.free]
            by_key = {(n.cluster, n.name): n for n in nodes}
            for r in snapshot.running:
                if r.stopping or (r.priority < level and (not old_only or snapshot.now - r.started_at >= config.preemption_min_run_seconds)):
                    policy_module._release(by_key, r)
            if not old_only:
                for admitted in plan.admitted:
                    if admitted.job.priority < level:
                        policy_module._unplace(by_key, admitted.placement, admitted.job)
            for d in blocked:
                if d.job.priority >= level and not (isinstance(d, Wait) and d.reason in ("QUOTA_EXCEEDED", "NEVER_FITS_LIVE")):
                    placed = place(nodes, d.job.cpu_millis, d.job.memory_bytes, d.job.gpus, d.job.members, has_command=d.job.has_command)
                    if d.job.priority == level:
                        store[d.job.id] = placed is not None
    exhausted = budget is not None and all(v <= 0 for v in budget.values())
    ledger = quota_rules.Ledger(snapshot.quotas, policy_holding(snapshot.running))
    for admitted in plan.admitted:
        j = admitted.job
        ledger.charge(j.owner, admitted.placement.cluster, (j.gpus * j.members, j.cpu_millis * j.members, j.memory_bytes * j.members))
    for d in blocked:
        job = by_id[d.job.id]
        reason = getattr(d, "reason", "RESERVED")
        outcome = search.outcomes.get(d.job.id)
        if reason == "QUOTA_EXCEEDED":
            why = NOT_FITTING[1]
        elif reason == "NEVER_FITS_LIVE":
            why = NOT_FITTING[2]
        elif outcome == search.PREEMPTED:
            why = "preempted for it: victims stopping (kill grace)"
        elif outcome == search.ROOM_ON_ITS_WAY:
            why = "room being freed for it (victims stopping, kill grace)"
        elif not fits_all.get(d.job.id, False):
            why = NOT_FITTING[0]
        elif ledger.active and d.job.owner in ledger.quotas and not ledger.within_nominal(
                d.job.owner, (d.job.gpus * d.job.members, d.job.cpu_millis * d.job.members, d.job.memory_bytes * d.job.members)):
            why = NOT_FITTING[3]
        elif reason == "BACKFILL_WINDOW":
            why = "fits now but would run into a reservation"
        elif not config.preemption:
            why = "no preemption"
        elif exhausted or outcome == search.RATE_LIMIT:
            why = "rate limit (PREEMPTION_MAX_PER_MINUTE)"
        elif not fits_old.get(d.job.id, False):
            why = "minimum run time (PREEMPTION_MIN_RUN_SECONDS)"
        elif d.job.id in unexamined:
            why = "search limits (preemption_searches_per_pass, preemption_scan_limit)"
        else:
            why = f"not preempted for: {outcome or 'not examined'}"
        job.why[why] += 1
        job.log.append((snapshot.now, why))


def over_target(result: Result) -> tuple[list[float], dict[str, int], int]:
    """High-priority jobs that fit the fleet: their waits; those over the target by their main reason; how many were
    left out because they did not fit (the main reason they waited was one of NOT_FITTING)."""
    waits: list[float] = []
    over: dict[str, int] = defaultdict(int)
    excluded = 0
    for job in result.high:
        seen = [(why, passes) for why, passes in job.why.items() if why != HIDDEN]
        main = max(seen, key=lambda kv: kv[1])[0] if seen else "never blocked in a pass it was seen in"
        if main in NOT_FITTING:
            excluded += 1
            continue
        wait = (job.first_started if job.first_started is not None else math.inf) - job.pending.submitted_at
        waits.append(wait)
        if wait > result.target:
            # Over the target for the reason it waited most passes: passes it was hidden by the head limits included.
            main = max(job.why.items(), key=lambda kv: kv[1])[0] if job.why else main
            over[main] += 1
            if job.kind != "cpu" and job.pending.submitted_at >= BURST_AT[0] and job.pending.owner == BURST_AT[1]:
                over["(of them submitted in the burst)"] += 1
    return waits, dict(over), excluded


def print_over_target(result: Result) -> None:
    """Each high-priority job that fits the fleet and started after the target: seconds after its submit of each
    pass it waited in, and why (the passes where the head limits hid it included)."""
    for job in result.high:
        seen = [(why, passes) for why, passes in job.why.items() if why != HIDDEN]
        if seen and max(seen, key=lambda kv: kv[1])[0] in NOT_FITTING:
            continue
        wait = (job.first_started if job.first_started is not None else math.inf) - job.pending.submitted_at
        if wait > result.target:
            passes = "; ".join(f"+{at - job.pending.submitted_at:.0f}s {why}" for at, why in job.log)
            print(f"  {result.name}: {job.pending.id} p{job.pending.priority} {job.pending.owner} {job.kind} submitted "
                  f"{job.pending.submitted_at:.1f}, started after {wait:.1f}s: {passes}", file=sys.stderr)


def _displaced(plan: Plan, order_index: dict[str, int], job: SimJob, promised_at: float) -> bool:
    """A reserved job may legitimately start later than promised only if a job ordered before it, and
    submitted after the promise, took the capacity (a higher priority arrived, or fair share moved)."""
    mine = order_index.get(job.pending.id, math.inf)
    for decision in plan.decisions.values():
        if isinstance(decision, (Admit, Reserve)) and order_index.get(decision.job.id, math.inf) < mine:
            if decision.job.submitted_at > promised_at or decision.job.priority > job.pending.priority:
                return True
    return False


# --- figures ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def fairness(result: Result, tenants: dict[str, float]) -> tuple[float, dict[str, tuple[float, float]]]:
    total = sum(result.tenant_gpu_seconds.get(t, 0.0) for t in tenants)
    weights = sum(tenants.values())
    rows = {t: (result.tenant_gpu_seconds.get(t, 0.0) / total if total else 0.0, w / weights) for t, w in tenants.items()}
    deviation = max((abs(actual - entitled) for actual, entitled in rows.values()), default=0.0)
    return deviation, rows


def big_backlog_pass(fleet: list[NodeCapacity], config: PolicyConfig, pending: int, seed: int, tenants: dict[str, float],
                     busy_fraction: float) -> tuple[float, int, int]:
    """One pass with `pending` jobs waiting and `busy_fraction` of the GPU nodes busy: (median seconds, decisions, admitted).
    Timed from the pruning of the backlog (the scheduler's SQL does that part) to the decisions."""
    trace = make_trace(seed, 2.0, sum(len(n.gpu_indices) for n in fleet), tenants, 1.2)
    rng = random.Random(seed)
    backlog = Backlog()
    for i in range(pending):
        template = trace[i % len(trace)]
        p = template.pending
        backlog.add(SimJob(Pending(f"b{i}", p.owner, p.priority, p.queue, rng.uniform(0, 3600), p.cpu_millis, p.memory_bytes,
                                   p.gpus, p.members, p.has_command, p.timeout_seconds), template.kind, template.runtime))
    nodes = [NodeCapacity(n.cluster, n.name, list(n.gpu_indices), n.gpu_type, n.cpu_millis, n.memory_bytes, n.slots) for n in fleet]
    running = []
    gpu_nodes = [n for n in nodes if n.gpu_indices]
    for i, node in enumerate(gpu_nodes[: int(len(gpu_nodes) * busy_fraction)]):
        node.used_anonymous_gpus = len(node.gpu_indices)
        node.used_cpu_millis = node.cpu_millis - 2000  # a saturated node: its job takes (nearly) all of it
        node.used_memory_bytes = node.memory_bytes // 2
        node.used_slots = 1
        running.append(Running(f"r{i}", "research", node.cluster, ((node.name, 1),), node.used_cpu_millis, node.used_memory_bytes,
                               len(node.gpu_indices), 3600.0 + i * 10))
    times = []
    for _ in range(7):  # the median of a few: this machine is shared, single timings are noisy
        started = time.perf_counter()
        snapshot = Snapshot(3600.0, nodes, running, backlog.pruned(), {})
        plan = decide(snapshot, config)  # never changes the snapshot: every run makes the same decisions
        times.append(time.perf_counter() - started)
    return statistics.median(times), len(plan.decisions), len(plan.admitted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--gpu-nodes", type=int, default=125, help="nodes of 8 GPUs (default 125: 1,000 GPUs)")
    parser.add_argument("--cpu-nodes", type=int, default=25)
    parser.add_argument("--load", type=float, default=2.0, help="offered GPU demand / GPUs")
    parser.add_argument("--interval", type=float, default=10.0, help="least simulated seconds between passes")
    parser.add_argument("--depth", type=int, default=4, help="reservation depth per pool")
    parser.add_argument("--half-life", type=float, default=3600.0)
    parser.add_argument("--only", default="", help="run only the configurations whose name contains this")
    parser.add_argument("--trace-repeats", action="store_true", help="print each repeated preemption (stderr)")
    parser.add_argument("--over-target", action="store_true",
                        help="print each high-priority job over the target with why it waited, pass by pass (stderr)")
    parser.add_argument("--pending", type=int, default=100_000, help="backlog size of the pass-time measurement")
    parser.add_argument("--borrow", type=float, default=0.25, help="borrowing limit, as a fraction of the fleet's GPUs")
    defaults = Settings()
    parser.add_argument("--priority-band", type=int, default=defaults.fair_share_priority_band, help="FAIR_SHARE_PRIORITY_BAND")
    parser.add_argument("--min-run", type=float, default=defaults.preemption_min_run_seconds, help="PREEMPTION_MIN_RUN_SECONDS")
    parser.add_argument("--max-per-minute", type=int, default=defaults.preemption_max_per_minute,
                        help="PREEMPTION_MAX_PER_MINUTE (victims per cluster per minute; the simulated fleet is one cluster; -1: unlimited)")
    parser.add_argument("--max-per-node-per-minute", type=float, default=defaults.preemption_max_per_node_per_minute,
                        help="PREEMPTION_MAX_PER_NODE_PER_MINUTE (raises the per-cluster limit to this many victims per node)")
    parser.add_argument("--kill-grace", type=float, default=10.0, help="a preempted job holds its capacity this long")
    args = parser.parse_args()

    tenants = {"research": 2.0, "product": 1.0, "platform": 1.0, "batch": 1.0}
    fleet = make_fleet(args.gpu_nodes, args.cpu_nodes)
    gpus = sum(len(n.gpu_indices) for n in fleet)
    trace = make_trace(args.seed, args.hours, gpus, tenants, args.load)
    print(f"trace: seed {args.seed}, {len(trace):,} jobs over {args.hours:g} h, {gpus:,} GPUs on {args.gpu_nodes} nodes "
          f"+ {args.cpu_nodes} CPU nodes, offered load {args.load:g}x, tenants {tenants}")
    configs = {
        "strict (old)": PolicyConfig(backfill=False, fair_share=False),
        "new": PolicyConfig(reservation_depth=args.depth, half_life_seconds=args.half_life, weights=tenants,
                              priority_band=args.priority_band),
        "new + preemption": PolicyConfig(reservation_depth=args.depth, half_life_seconds=args.half_life, weights=tenants,
                              priority_band=args.priority_band,
                                         preemption=True, preemption_min_run_seconds=args.min_run),
        "new + quotas + preemption": PolicyConfig(reservation_depth=args.depth, half_life_seconds=args.half_life, weights=tenants,
                              priority_band=args.priority_band,
                                                  preemption=True, preemption_min_run_seconds=args.min_run),
    }
    # Quotas: each tenant's weight-entitled share of the GPUs, and it may borrow up to --borrow of the fleet beyond it.
    quotas = {t: [Quota(t, "*", (int(gpus * w / sum(tenants.values())), None, None), (int(gpus * args.borrow), 0, 0))] for t, w in tenants.items()}
    results = {}
    configs = {name: config for name, config in configs.items() if args.only in name}
    # The rate limit as the scheduler computes it (scheduling.preemption_limit): the simulated fleet is one cluster.
    limit = (None if args.max_per_minute < 0 else
             max(args.max_per_minute, math.floor(args.max_per_node_per_minute * (args.gpu_nodes + args.cpu_nodes))))
    print(f"preemption rate limit: {'none' if limit is None else f'{limit} victims per minute'} "
          f"(--max-per-minute {args.max_per_minute}, --max-per-node-per-minute {args.max_per_node_per_minute:g})")
    for name, config in configs.items():
        wall = time.perf_counter()
        results[name] = simulate(name, trace, fleet, config, args.hours, args.interval, tenants,
                                 quotas if "quotas" in name else None, args.kill_grace,
                                 limit,
                                 args.trace_repeats)
        print(f"  simulated {name}: {time.perf_counter() - wall:.1f}s wall", file=sys.stderr)
        if args.over_target:
            print_over_target(results[name])

    rows: list[tuple[str, ...]] = []

    def row(label: str, fn) -> None:  # type: ignore[no-untyped-def]
        rows.append((label, *(fn(r) for r in results.values())))

    row("GPU utilisation while jobs wait", lambda r: f"{r.busy_while_waiting / r.available_while_waiting:.1%}" if r.available_while_waiting else "-")
    row("  ideal bound", lambda r: f"{r.ideal_while_waiting / r.available_while_waiting:.1%}" if r.available_while_waiting else "-")
    row("  utilisation / ideal", lambda r: f"{r.busy_while_waiting / r.ideal_while_waiting:.1%}" if r.ideal_while_waiting else "-")
    for low, high in BANDS:
        waits = lambda r, low=low, high=high: [w for p, ws in r.waits.items() if low <= p <= high for w in ws]  # noqa: E731
        row(f"wait p50 / p99, priority {low}-{high} (s)", lambda r, waits=waits: f"{percentile(waits(r), 50):,.0f} / {percentile(waits(r), 99):,.0f}")
    high = lambda r: [w for p, ws in r.waits.items() if p >= 75 for w in ws]  # noqa: E731
    row("high priority (75+) submit to start p50 / p99 (s)", lambda r: f"{percentile(high(r), 50):,.0f} / {percentile(high(r), 99):,.0f}")
    row(f"  fitting the fleet: p50 / p99 (s), target {args.kill_grace + args.interval:g}",
        lambda r: (lambda w: f"{percentile(w, 50):,.0f} / {percentile(w, 99):,.0f}")(over_target(r)[0]))
    row("  left out: did not fit (higher priority, quota)", lambda r: f"{over_target(r)[2]:,} of {len(r.high):,}")
    row("  over target", lambda r: f"{sum(v for k, v in over_target(r)[1].items() if not k.startswith('(')):,}")
    reasons = sorted({why for r in results.values() for why in over_target(r)[1]})
    for why in reasons:
        row(f"    {why}", lambda r, why=why: f"{over_target(r)[1].get(why, 0):,}")
    row("preemptions; GPU-seconds lost to them", lambda r: f"{r.preemptions:,}; {r.gpu_seconds_lost:,.0f}")
    row("  most victims in 60 s; their GPUs", lambda r: f"{r.victims_per_minute:,}; {r.victim_gpus_per_minute:,}")
    row("victim searches; skipped (same shape failed); most in a pass",
        lambda r: f"{r.searches:,}; {r.searches_skipped:,}; {r.max_searches}")
    row("  passes whose search limits left jobs unexamined", lambda r: f"{r.passes_cut:,}")
    row("  preemption phase per pass: mean / max (ms)",
        lambda r: f"{1000 * r.preempt_seconds / max(r.passes, 1):.1f} / {1000 * r.preempt_max:.1f}")
    row("preemption loops: cycles A->B->A (must be 0)", lambda r: f"{r.preemption_loops}")
    row("the same victim preempted again for the same job (must be 0)", lambda r: f"{r.repeated_preemptions}")
    row("quota violations beyond borrowing (must be 0)", lambda r: f"{r.quota_violations}")
    row("waits for QUOTA_EXCEEDED (decisions)", lambda r: f"{r.quota_waits:,}")
    row("jobs started / still pending at the end", lambda r: f"{r.started:,} / {r.unstarted:,}")
    row("jobs given a reservation", lambda r: f"{r.reserved_jobs:,}")
    row("reserved jobs started later than promised", lambda r: f"{r.delayed_reservations}")
    row("gang members placed partially", lambda r: f"{r.partial_gangs}")
    row("fully backlogged hours (all tenants wait)", lambda r: f"{r.fair_hours}")
    row("fair share: max deviation from entitlement", lambda r: f"{fairness(r, tenants)[0]:.1%}" if r.fair_hours else "-")
    for tenant in tenants:
        row(f"  {tenant} GPU share (entitled {tenants[tenant] / sum(tenants.values()):.0%})",
            lambda r, t=tenant: f"{fairness(r, tenants)[1][t][0]:.1%}" if r.fair_hours else "-")
    row("passes; mean pass (ms)", lambda r: f"{r.passes:,}; {1000 * r.policy_seconds / max(r.passes, 1):.1f}")
    row("decisions per second (trace)", lambda r: f"{r.decisions / r.policy_seconds:,.0f}" if r.policy_seconds else "-")
    for label, busy in (("steady: 2 GPU nodes free", 1 - 2 / args.gpu_nodes), ("burst: half the GPU nodes free", 0.5)):
        big = {name: big_backlog_pass(fleet, config, args.pending, args.seed, tenants, busy) for name, config in configs.items()}
        row(f"one pass, {args.pending:,} pending, {label} (ms)", lambda r, big=big: f"{1000 * big[r.name][0]:.1f}")
        row("  decisions / admitted in it", lambda r, big=big: f"{big[r.name][1]:,} / {big[r.name][2]:,}")
        row("  decisions per second", lambda r, big=big: f"{big[r.name][1] / big[r.name][0]:,.0f}")

    widths = [max(len(r[i]) for r in rows + [("", *results)]) for i in range(len(rows[0]))]
    print()
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(("", *results), widths))))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


if __name__ == "__main__":
    main()
