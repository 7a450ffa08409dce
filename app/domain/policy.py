"""The scheduling policy: a pure function from a snapshot to decisions (no database, no clock, no I/O).

`decide(snapshot, config)` is called by the scheduler (app.domain.scheduling.admit), by `explain`
(app.domain.explain) and by the simulator (benchmarks/scheduler_sim.py), so the reason a job is
given is the scheduler's own, and what the simulator measures is what production runs.

The rules, in order:
- **Order.** Priority first. Among equal priorities (by default exactly equal; with a `priority_band` of 5,
  49, 50 and 51 are one level), fair share: the owner with the smallest dominant share
  (decayed usage plus what it holds now, over the fleet, divided by its weight) goes next, and each
  admission in the pass raises its owner's share; then the owner's own jobs by priority, then age.
- **Reservations (conservative backfill, as Slurm's).** A job that does not fit now gets a
  reservation, the earliest time and nodes at which it fits, computed from what holds capacity and
  when that ends (`started_at + timeout`; no timeout: never), for the first `reservation_depth`
  blocked jobs of each pool. A later job starts now only if it fits in free capacity and delaying
  no reservation: it ends (by its own timeout) before the reservation starts, or it uses capacity
  the reservation does not need. As true run times never exceed timeouts, a reserved job never
  starts later than it would have without backfill.
- **Pools.** A pool is the kind of capacity a job competes for (GPU or CPU-only; command or image,
  which decides the clusters it may run on). Depth and examination limits are per pool, and a job
  blocked in one pool holds back only what would delay its reservation, never other capacity.
- A job that no live node could hold even empty waits with its own reason and holds nothing back.

Times are float seconds (epoch); `math.inf` means "no end known".
"""
from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from app.domain import capacity, quotas
from app.domain.capacity import LOCAL_CLUSTER, NodeCapacity, Placement

INF = math.inf
GIB = float(1 << 30)

# Wait reasons (explain maps them to its codes and diagnoses the capacity ones in detail).
QUEUE_FULL = "QUEUE_CONCURRENCY_LIMIT"
NO_NODES = "NO_NODES"
CAPACITY = "CAPACITY"  # does not fit the free capacity now; the pool's reservations are taken
NEVER_FITS_LIVE = "NEVER_FITS_LIVE"  # no live node could hold it even empty: blocks nobody
BACKFILL_WINDOW = "BACKFILL_WINDOW"  # fits now, but would run into a reservation
NO_RESERVATION = "NO_RESERVATION"  # what holds the capacity has no timeout: no start can be promised
NOT_EXAMINED = "NOT_EXAMINED"  # beyond the pass's examination limit for its pool
BLOCKED = "HIGHER_PRIORITY_AHEAD"  # strict mode only: a job ahead does not fit
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # its tenant's quota (plus borrowing) would be exceeded: holds nothing back


@dataclass(frozen=True, slots=True)
class Pending:
    """A backlog entry: what it asks for and how long it may run."""

    id: str
    owner: str
    priority: int
    queue: str
    submitted_at: float
    cpu_millis: int
    memory_bytes: int
    gpus: int
    members: int = 1
    has_command: bool = True
    timeout_seconds: float | None = None
    gpu_types: tuple[str, ...] = ()  # acceptable GPU models, preferred first; empty: any
    node_pool: str | None = None  # the worker pool that must run it; None: any
    preempted_by: frozenset[str] = frozenset()  # jobs that preempted it: it never preempts them back (no cycles)
    # Jobs bound to other GPU types or worker pools compete for other nodes: they are other pools.
    pool: tuple[str, bool, tuple[str, ...], str | None] = field(init=False, repr=False, compare=False)
    shape: tuple[int, int, int, int, bool, tuple[str, ...], str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Made once per entry (the scheduler keeps its entries from pass to pass), not at each of the pass's many looks.
        object.__setattr__(self, "pool", ("gpu" if self.gpus > 0 else "cpu", self.has_command, self.gpu_types, self.node_pool))
        object.__setattr__(self, "shape", (self.cpu_millis, self.memory_bytes, self.gpus, self.members, self.has_command,
                                           self.gpu_types, self.node_pool))

    def serves(self, node: NodeCapacity) -> bool:
        return node.serves(self.gpu_types, self.node_pool)

    @property
    def duration(self) -> float:
        return float(self.timeout_seconds) if self.timeout_seconds else INF


@dataclass(frozen=True, slots=True)
class Running:
    """An admitted attempt holding capacity until `ends_at` at the latest (inf: no timeout)."""

    id: str
    owner: str
    cluster: str
    parts: tuple[tuple[str, int], ...]  # (node, members); the first part holds the job's worker slot
    cpu_millis: int
    memory_bytes: int
    gpus: int
    ends_at: float
    # Preemption: only a preemptible attempt running for at least the minimum run time, of strictly lower
    # priority than the waiting job, is a candidate. `stopping`: already preempted, its processes are ending.
    priority: int = 0
    preemptible: bool = False
    started_at: float = INF
    stopping: bool = False
    gpu_indices: tuple[tuple[str, tuple[int, ...]], ...] = ()  # per node of `parts`
    queue: str = ""
    preempted_by: frozenset[str] = frozenset()  # jobs that preempted it before: none of them preempts it again

    @property
    def amounts(self) -> quotas.Amounts:
        members = sum(m for _, m in self.parts) or 1
        return (self.gpus * members, self.cpu_millis * members, self.memory_bytes * members)


@dataclass(frozen=True, slots=True)
class Usage:
    """An owner's decayed resource-seconds, as of the snapshot's `now`."""

    gpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    memory_gib_seconds: float = 0.0


@dataclass(frozen=True)
class PolicyConfig:
    reservation_depth: int = 4
    half_life_seconds: float = 3600.0
    weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = 1.0
    scan_limit: int = 2000  # jobs examined per pool in one pass; the rest wait for the next
    backfill: bool = True  # False: the old strict policy (priority then age; the first misfit stops all)
    end_margin_seconds: float = 0.0  # after its timeout a job may still hold its capacity this long (the kill grace)
    fair_share: bool = True
    priority_band: int = 1  # FAIR_SHARE_PRIORITY_BAND: priorities this close (see priority_band) are ordered by fair share
    preemption: bool = False
    preemption_min_run_seconds: float = 60.0
    # Bounds on one pass's victim search, far above what a pass needs (every blocked job is searched for; a failed
    # search is not repeated for the same shape), there only so that no backlog can make a pass unbounded.
    preemption_searches_per_pass: int = 256
    preemption_scan_limit: int = 5000  # blocked jobs examined
    # The scheduler's own pass uses only what a plan admits, fails and preempts; with this set, the walk stops where no
    # job could be admitted any more (see _backfill_pass). Explanations need every job's decision: they leave it off.
    admissions_only: bool = False

    def weight(self, owner: str, admin_set: Mapping[str, float] | None = None) -> float:
        """What an admin set (`admin_set`, the snapshot's), else the configured weight, else the default."""
        weight = admin_set.get(owner) if admin_set else None
        if weight is None:
            weight = self.weights.get(owner, self.default_weight)
        return weight if weight > 0 else self.default_weight


@dataclass(frozen=True)
class Snapshot:
    now: float
    nodes: Sequence[NodeCapacity]  # live, ready nodes, with what admitted jobs hold deducted
    running: Sequence[Running]
    backlog: Sequence[Pending]  # eligible now (not in backoff); any order
    usage: Mapping[str, Usage] = field(default_factory=dict)
    queue_room: Mapping[str, int] | None = None  # admissions each queue may still take; None: unlimited
    focus: str | None = None  # explain: estimate this job's start even beyond the reservation depth
    quotas: Mapping[str, Sequence[quotas.Quota]] = field(default_factory=dict)  # per tenant (Pending.owner); none: unlimited
    preemption_budget: Mapping[str, int] | None = None  # victims each cluster may still lose now (rate limit); None: unlimited
    weights: Mapping[str, float] = field(default_factory=dict)  # set by admins (fair_share_weights): win over config.weights


@dataclass(frozen=True, slots=True)
class Admit:
    job: Pending
    placement: Placement
    backfilled: bool  # started while a job ahead of it holds a reservation


@dataclass(frozen=True, slots=True)
class Reserve:
    job: Pending
    start_at: float
    cluster: str
    nodes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Wait:
    job: Pending
    reason: str
    message: str
    blocked_by: str | None = None  # the reserved (or, strict, blocked) job it defers to
    estimated_start_at: float | None = None
    quota: quotas.Exceeded | None = None  # QUOTA_EXCEEDED: which quota, and the tenant's usage


@dataclass(frozen=True, slots=True)
class Fail:
    job: Pending
    reason: str


@dataclass(frozen=True, slots=True)
class Preemption:
    """`victims` stop so that `job` (which cannot start otherwise) fits: fewest, lowest priority, youngest first."""

    job: Pending
    victims: tuple[Running, ...]
    cluster: str


@dataclass
class PreemptionSearch:
    """What the pass's victim search did (the simulator and the logs read it)."""

    examined: int = 0  # blocked jobs looked at
    searched: int = 0  # victim searches run
    skipped: int = 0  # jobs not searched: a search for the same shape at an equal or higher priority failed this pass
    room_on_its_way: int = 0  # jobs for which capacity already being freed makes room
    unexamined: int = 0  # blocked jobs left for the next pass by the limits (preemption_searches_per_pass, _scan_limit)
    first_unexamined: str | None = None  # the first of them (the rest follow it in the pass's order)
    # What became of each examined job: PREEMPTED, ROOM_ON_ITS_WAY, NO_LOWER (nobody it may preempt), SKIPPED,
    # NO_VICTIMS (no victim set frees a placement it can use), RECLAIM_RULE, RATE_LIMIT.
    outcomes: dict[str, str] = field(default_factory=dict)

    PREEMPTED = "preempted"
    ROOM_ON_ITS_WAY = "room on its way"
    NO_LOWER = "no lower-priority candidate"
    SKIPPED = "same shape failed"
    NO_VICTIMS = "no victim set frees a placement"
    RECLAIM_RULE = "reclaim would take more than is borrowed"
    RATE_LIMIT = "rate limit"
    UNPLACED = "placement failed"



Decision = Admit | Reserve | Wait | Fail


@dataclass(frozen=True)
class OwnerShare:
    owner: str
    weight: float
    usage_share: float  # decayed usage over the fleet, as a steady-state fraction of it
    held_share: float  # dominant fraction of the fleet it holds now
    share: float  # (usage_share + held_share) / weight: lower goes first among equal priorities
    rank: int  # 1 = next served among owners with a backlog


@dataclass
class Plan:
    decisions: dict[str, Decision]
    order: list[str]  # the jobs in the order the pass considered them
    free: list[NodeCapacity]  # capacity left after the admissions (explain diagnoses against it)
    shares: dict[str, OwnerShare]
    preemptions: list[Preemption] = field(default_factory=list)
    preemption_search: PreemptionSearch = field(default_factory=PreemptionSearch)
    # With PolicyConfig.admissions_only: how many jobs the walk took in order before every worker slot was taken and it
    # stopped (None: it did not stop early). Any backlog holding each owner's first that many jobs or more (in its own
    # order) has the same admissions: the scheduler reads a short backlog first (scheduling.ADMISSION_HEADS).
    stopped_after: int | None = None

    @property
    def admitted(self) -> list[Admit]:
        return [d for d in self.decisions.values() if isinstance(d, Admit)]

    @property
    def reserved(self) -> list[Reserve]:
        return [d for d in self.decisions.values() if isinstance(d, Reserve)]


Vec = list[int]  # [gpus, cpu millis, memory bytes, worker slots]


def decide(snapshot: Snapshot, config: PolicyConfig = PolicyConfig()) -> Plan:
    """Decisions for one pass over `snapshot`; `snapshot` is never modified."""
    nodes = [n.copy() for n in snapshot.nodes]
    totals = _totals(nodes)
    shares = _Shares(snapshot, config, totals)
    plan = Plan({}, [], nodes, shares.report())
    if not nodes:
        for job in snapshot.backlog:
            plan.decisions[job.id] = Wait(job, NO_NODES, "No live node to run it")
            plan.order.append(job.id)
        return plan
    if config.backfill:
        _backfill_pass(snapshot, config, nodes, shares, plan)
        if config.preemption:
            _preempt(snapshot, config, plan)
    else:
        _strict_pass(snapshot, nodes, plan)
    return plan


def owner_shares(snapshot: Snapshot, config: PolicyConfig, waiting: Iterable[str] = ()) -> dict[str, OwnerShare]:
    """Every owner's fair share as the policy sees it; `waiting`: owners with a backlog (ranked)."""
    return _Shares(snapshot, config, _totals(snapshot.nodes), waiting).report()


# --- the passes ------------------------------------------------------------------------------------


def _backfill_pass(snapshot: Snapshot, config: PolicyConfig, nodes: list[NodeCapacity], shares: "_Shares", plan: Plan) -> None:
    now = snapshot.now
    timeline = _Timeline(nodes, snapshot.running, now, config.end_margin_seconds)
    room = dict(snapshot.queue_room) if snapshot.queue_room is not None else None
    examined: dict[tuple, int] = defaultdict(int)
    reserved: dict[tuple, list[Reserve]] = defaultdict(list)
    misfits = _Misfits()  # shapes that do not fit the free capacity now (it only shrinks during a pass)
    first_blocked: dict[tuple, str] = {}  # per pool, the first job that did not fit now
    free = _FreeIndex(nodes, _withheld(snapshot))
    kept_requests: dict[tuple, tuple[str, int]] = {}  # (shape, priority) -> the preemptor whose room alone holds it
    never: dict[tuple, bool] = {}
    messages: dict[tuple, str] = {}  # per pool, once its reservations are all taken (they never shrink in a pass)
    malformed: dict[tuple, str | None] = {}  # per shape: what makes it impossible to reason about, if anything
    ledger = quotas.Ledger(snapshot.quotas, _holding(snapshot.running))
    # The clusters a job may run on depend only on the fleet's clusters and whether it has a command: listed once, not
    # per job (with quotas set, listing them from 1,000 nodes for each of 2,000 jobs was 200 ms of a pass).
    clusters_for = {command: _eligible_clusters(nodes, command) for command in (True, False)}
    # shape -> (reason, message, the pool's first blocked job, duration): how the last job of that shape waited, when it
    # waited for capacity (its pool's reservations taken) or for a start no one can promise (the timeline cannot reserve
    # its request). A big backlog is mostly such jobs, and what decided them only stays so during a pass (a misfit keeps
    # not fitting, reservations are only added, an unreservable request stays so until the timeline changes, which
    # `timeline.unreservable` tells): a later job of the same shape gets the same decision without the walk to it.
    repeat: dict[tuple, tuple[str, str, str, float]] = {}

    def _one(job: Pending) -> Decision:
        pool = job.pool
        examined[pool] += 1
        if examined[pool] > config.scan_limit and job.id != snapshot.focus:
            return Wait(job, NOT_EXAMINED, f"More than {config.scan_limit} jobs of its kind are ahead of it this pass")
        shape = job.shape
        known = repeat.get(shape) if _REPEAT_DECISIONS else None
        if known is not None and job.id != snapshot.focus and (room is None or room.get(job.queue, 0) > 0):
            reason, message, blocker, duration = known
            if reason == CAPACITY:
                return Wait(job, CAPACITY, message, blocked_by=blocker)
            if job.duration == duration and len(reserved[pool]) < config.reservation_depth and timeline.unreservable(job):
                return Wait(job, NO_RESERVATION, message, blocked_by=blocker)
        problem = _malformed(job, malformed)
        if problem:
            return Fail(job, f"the scheduler could not admit this job: {problem}")
        if room is not None and room.get(job.queue, 0) <= 0:
            return Wait(job, QUEUE_FULL, f"Queue {job.queue} is at its max_concurrency")
        ask = (job.gpus * job.members, job.cpu_millis * job.members, job.memory_bytes * job.members)
        if ledger.active:
            # Over its quota a job neither starts nor reserves: it waits for its own tenant's jobs to end.
            over = ledger.check_any(job.owner, clusters_for[job.has_command], ask)
            if over is not None:
                return Wait(job, QUOTA_EXCEEDED, over.message, quota=over)
        if not misfits.covers(job):
            end = now + job.duration + config.end_margin_seconds
            # A request kept off a preemptor's room stays so for the rest of the pass (free capacity only shrinks):
            # the trial placement is not repeated for each of a burst's identical jobs.
            kept_key = (shape, job.priority) if job.id not in free.preemptors else None
            kept_for = kept_requests.get(kept_key) if kept_key is not None else None
            placement = free.place(job) if kept_for is None else None
            if placement is None:
                if kept_for is None:
                    kept_for = free.withheld_from(job)
                if kept_for is not None:
                    if kept_key is not None:
                        kept_requests[kept_key] = kept_for
                    preemptor, its_priority = kept_for
                    return Wait(
                        job, BACKFILL_WINDOW,
                        f"It fits now, but only on room being freed for job {preemptor} (priority {its_priority}), "
                        f"which preempted for it; it may start there once that job has",
                        blocked_by=preemptor, estimated_start_at=None,
                    )
                misfits.add(job)
            else:
                over = ledger.check(job.owner, placement.cluster, ask) if ledger.active else None
                conflict = timeline.conflict(placement, job, end) if over is None else None
                if over is not None:
                    _unplace(free.by_name, placement, job)
                    free.refresh(placement)
                    return Wait(job, QUOTA_EXCEEDED, over.message, quota=over)
                if conflict is None:
                    timeline.hold(placement, job, end)
                    ledger.charge(job.owner, placement.cluster, ask)
                    if room is not None:
                        room[job.queue] = room.get(job.queue, 0) - 1
                    return Admit(job, placement, backfilled=timeline.has_reservations)
                _unplace(free.by_name, placement, job)
                free.refresh(placement)
                slack = max(0.0, conflict.start - now)
                return Wait(
                    job, BACKFILL_WINDOW,
                    f"It fits now but would still run when job {conflict.job_id} is reserved to start, in {slack:.0f}s; "
                    f"a timeout of at most {max(0, math.floor(slack - config.end_margin_seconds))}s would let it start now",
                    blocked_by=conflict.job_id, estimated_start_at=None,
                )
        never_fits = never.get(shape)
        if never_fits is None:
            never_fits = never[shape] = _never_fits(nodes, job)
        if never_fits:
            return Wait(job, NEVER_FITS_LIVE, "No live node could hold it even empty; it waits for such a node and holds nothing back")
        blocker = first_blocked.setdefault(pool, job.id)
        blocked_by = blocker if blocker != job.id else None
        ahead = reserved[pool]
        if len(ahead) < config.reservation_depth or job.id == snapshot.focus:
            found = timeline.reserve(job, commit=len(ahead) < config.reservation_depth)
            if found is None:
                message = "What holds the capacity it needs has no timeout: no start time can be promised"
                if not ledger.active:
                    repeat[shape] = (NO_RESERVATION, message, blocker, job.duration)
                return Wait(job, NO_RESERVATION, message, blocked_by=blocked_by)
            if len(ahead) < config.reservation_depth:
                decision = Reserve(job, found.start, found.cluster, found.nodes)
                ahead.append(decision)
                return decision
            return Wait(job, CAPACITY, _capacity_message(ahead), blocked_by=blocked_by, estimated_start_at=found.start)
        # The common case with a big backlog (its kind's reservations are taken): the same message for all of them.
        message = messages.get(pool)
        if message is None:
            message = messages[pool] = _capacity_message(ahead)
        if not ledger.active:
            repeat[shape] = (CAPACITY, message, blocker, job.duration)
        return Wait(job, CAPACITY, message, blocked_by=blocked_by)

    def consider(job: Pending) -> Decision:
        plan.order.append(job.id)
        decision = _isolated(job, _one)
        plan.decisions[job.id] = decision
        if isinstance(decision, Admit):
            shares.charge(job)
        return decision

    # Borrowing comes last: a job that would take its tenant beyond its nominal quota is considered after every
    # job within its tenant's quota, whatever their priorities, so capacity reclaimed from a borrower goes to
    # the tenant that reclaimed it, never back to the borrower.
    deferred: list[Pending] = []
    # Every admission takes one worker slot (its first member's) and free capacity only shrinks during the walk: once
    # no slot is left, nothing more can be admitted, and a pass that uses only admissions, failures and preemptions
    # need not walk on (the rest would all wait; most of a busy fleet's passes admit one or two jobs at the head of
    # a backlog of hundreds). Not when a preemption search may follow, which looks at every job that waits.
    stop_when_full = config.admissions_only and snapshot.focus is None and not (config.preemption and _may_preempt(snapshot, config))
    slots_left: float = sum(max(0, n.slots - n.used_slots) for n in nodes) if stop_when_full else math.inf
    walk = shares.order(snapshot.backlog) if config.fair_share else sorted(snapshot.backlog, key=_strict_key)
    for taken, job in enumerate(walk):
        if slots_left <= 0:
            plan.stopped_after = taken
            break
        if ledger.active and job.owner in ledger.quotas and not ledger.within_nominal(
                job.owner, (job.gpus * job.members, job.cpu_millis * job.members, job.memory_bytes * job.members)):
            deferred.append(job)
            continue
        slots_left -= isinstance(consider(job), Admit)
    for job in deferred:
        if slots_left <= 0:
            break
        slots_left -= isinstance(consider(job), Admit)
    if slots_left <= 0:
        _fail_malformed(snapshot.backlog, plan, malformed)


def _may_preempt(snapshot: Snapshot, config: PolicyConfig) -> bool:
    """Whether _preempt could do anything this pass: some attempt stopping (its room is kept for its preemptor), or one
    it may take as a victim: of a priority below some waiting job's, or any, with quotas (a reclaim takes borrowers'
    attempts whatever their priority). A fleet whose jobs share one priority never preempts without quotas."""
    lowest = None
    for r in snapshot.running:
        if r.stopping:
            return True
        if _candidate(r, snapshot.now, config):
            lowest = r.priority if lowest is None else min(lowest, r.priority)
    if lowest is None:
        return False
    if snapshot.quotas:
        return True
    # Each owner's first jobs are its highest: a short backlog (scheduling.ADMISSION_HEADS) holds the highest of all.
    return any(job.priority > lowest for job in snapshot.backlog)


def _malformed(job: Pending, known: dict[tuple, str | None]) -> str | None:
    """capacity.malformed for the job's request, worked out once per shape in a pass (`known`)."""
    if job.shape not in known:
        known[job.shape] = capacity.malformed(job.cpu_millis, job.memory_bytes, job.gpus, job.members)
    return known[job.shape]


def _candidate(attempt: Running, now: float, config: PolicyConfig) -> bool:
    """Whether a running attempt may be preempted: preemptible, not stopping already, running long enough."""
    return attempt.preemptible and not attempt.stopping and now - attempt.started_at >= config.preemption_min_run_seconds


def _fail_malformed(backlog: Sequence[Pending], plan: Plan, malformed: dict[tuple, str | None]) -> None:
    """The failures a walk stopped early (the fleet full) did not reach: a job nobody can reason about fails now,
    wherever it stands, as the whole walk would fail it once it reached it."""
    for job in backlog:
        if job.id in plan.decisions:
            continue
        problem = _malformed(job, malformed)
        if problem:
            plan.order.append(job.id)
            plan.decisions[job.id] = Fail(job, f"the scheduler could not admit this job: {problem}")


def _holding(running: Sequence[Running]) -> Iterator[tuple[str, str, quotas.Amounts]]:
    for attempt in running:
        members = sum(m for _, m in attempt.parts) or 1
        yield attempt.owner, attempt.cluster, (attempt.gpus * members, attempt.cpu_millis * members, attempt.memory_bytes * members)


# --- preemption ------------------------------------------------------------------------------------


def _release(by_key: Mapping[tuple[str, str], NodeCapacity], *attempts: Running) -> None:
    """Give back on node copies what `attempts` hold (their GPU indices, CPU, memory, worker slots)."""
    for attempt in attempts:
        _release_one(by_key, attempt)


def _release_one(by_key: Mapping[tuple[str, str], NodeCapacity], attempt: Running) -> None:
    indices = dict(attempt.gpu_indices)
    for index, (name, members) in enumerate(attempt.parts):
        node = by_key.get((attempt.cluster, name))
        if node is None:
            continue
        if indices.get(name):
            node.used_gpus.difference_update(indices[name])
        else:
            node.used_anonymous_gpus = max(0, node.used_anonymous_gpus - attempt.gpus * members)
        node.used_cpu_millis -= attempt.cpu_millis * members
        node.used_memory_bytes -= attempt.memory_bytes * members
        node.used_slots -= 1 if index == 0 else 0


def _copy(nodes: Sequence[NodeCapacity]) -> list[NodeCapacity]:
    return [n.copy() for n in nodes]


NodeKey = tuple[str, str]  # (cluster, node)
Room = list[int]  # [worker slots, GPUs, CPU millis, memory bytes] free (or given back) on one node


def _room(node: NodeCapacity) -> Room:
    return [node.slots - node.used_slots, node.gpus_free_count, node.cpu_millis - node.used_cpu_millis,
            node.memory_bytes - node.used_memory_bytes]


class _Victims:
    """The pass's preemption candidates, indexed once for every search of the pass.

    Per node, the candidates holding capacity on it in preference order (borrowers first, then the lowest
    priority, then the most recently started); per candidate, what it gives back on each node; per node of the
    working capacity, what is free; all as plain integers. A search then adds and compares numbers along a
    node's list instead of copying nodes and placing for every candidate victim (which took milliseconds per
    search, so the pass could afford only a few dozen searches and a burst of urgent jobs waited for passes).
    Only the option finally chosen is checked by a real placement on copies of the nodes it touches.
    """

    def __init__(self, work: list[NodeCapacity], candidates: Sequence[Running], borrowers: set[str],
                 owned: set[int] | None = None) -> None:
        # Replaced node by node as preemptors take their room (the caller's list). Copy on write: a node is shared with
        # the plan's free capacity until something is placed on it here (`owned`: the positions already copied; None:
        # `work` is the caller's own copy), so a pass copies the few nodes it changes, not the fleet.
        self.work = work
        self.owned = owned if owned is not None else set(range(len(work)))
        self.position = {(n.cluster, n.name): i for i, n in enumerate(work)}
        self.free: dict[NodeKey, Room] = {key: _room(work[i]) for key, i in self.position.items()}
        self.elsewhere = any(n.cluster != LOCAL_CLUSTER for n in work)
        self._serving: dict[tuple, list[NodeKey]] = {}
        self._served_sets: dict[tuple, set[NodeKey]] = {}
        # The nodes with a free slot, by their free GPUs, each bucket sorted by (name, position): the best fit for
        # a single job (fewest GPUs left free, then the name, then the node listed first) is the first node that
        # holds it in the first bucket with enough GPUs. After every preemption each blocked job looks for room
        # being freed: scanning the whole fleet for it (a CPU job fits almost anywhere) was most of a burst's pass.
        self._with_slot: dict[int, list[tuple[str, int, NodeKey]]] = defaultdict(list)
        for key, i in self.position.items():
            if self.free[key][0] >= 1:
                self._with_slot[self.free[key][1]].append((key[1], i, key))
        for bucket in self._with_slot.values():
            bucket.sort()
        # The best fit found per request (GPUs, CPU, memory, the nodes serving it): (its rank, the node), or None when
        # no node holds it. Kept up to date node by node in refresh(): a node whose room changed is the only one that
        # can enter, leave or move in any request's ranking, so most room_now calls need no scan (a burst's blocked
        # jobs, a few shapes over and over, each scanned the fleet's slotted nodes).
        self._best: dict[tuple, tuple[tuple[int, str, int], NodeKey] | None] = {}
        self._best_needs: dict[tuple, tuple[int, int, int, set[NodeKey]]] = {}
        # The candidates' index (what each gives back where, per node in preference order) is built on the first
        # search: a pass whose blocked jobs all find room being freed, or have nobody below them, needs none of it.
        self._candidates, self._borrowers = tuple(candidates), borrowers
        self._indexed = False
        self.gives: dict[str, dict[NodeKey, Room]] = {}
        self.per_node: dict[NodeKey, list[tuple[Running, bool]]] = defaultdict(list)  # (attempt, its owner borrows)
        self.per_cluster: dict[str, list[tuple[Running, bool]]] = defaultdict(list)
        self.by_bound: list[NodeKey] = []
        self.bound: dict[NodeKey, tuple[int, int, float]] = {}
        # How many candidates hold something on a live node (as many as `gives` will have): the pass stops once all are taken.
        self.count = sum(1 for r in candidates if any((r.cluster, name) in self.position for name, _ in r.parts))

    def _index(self) -> None:
        if self._indexed:
            return
        self._indexed = True
        candidates, borrowers = self._candidates, self._borrowers
        for r in sorted(candidates, key=lambda r: (r.owner not in borrowers, r.priority, -r.started_at, r.id)):
            gives: dict[NodeKey, Room] = {}
            for index, (name, members) in enumerate(r.parts):
                key = (r.cluster, name)
                if key not in self.position:
                    continue  # not a live node: what it holds there frees nothing the pass can use
                room = gives.setdefault(key, [0, 0, 0, 0])
                room[0] += 1 if index == 0 else 0
                room[1] += r.gpus * members
                room[2] += r.cpu_millis * members
                room[3] += r.memory_bytes * members
            if not gives:
                continue
            self.gives[r.id] = gives
            entry = (r, r.owner in borrowers)
            for key in gives:
                self.per_node[key].append(entry)
            self.per_cluster[r.cluster].append(entry)
        # Nodes in the order of the best option they could offer (one victim, their lowest priority, their youngest
        # start), then as listed: a search stops at the first node whose bound the best option found already beats,
        # instead of trying all of them (at 1,000 nodes with a candidate each, trying all was most of a pass).
        bound = {key: (1, min(r.priority for r, _ in ordered), -max(r.started_at for r, _ in ordered))
                 for key, ordered in self.per_node.items()}
        self.by_bound = sorted(bound, key=lambda key: (bound[key], self.position[key]))
        self.bound = bound

    def _own(self, i: int) -> NodeCapacity:
        """The working node at position i, copied first if it is still the plan's."""
        if i not in self.owned:
            self.work[i] = self.work[i].copy()
            self.owned.add(i)
        return self.work[i]

    def serving(self, job: Pending) -> list[NodeKey]:
        """The nodes whose capacity `job` could use (its GPU types, its pool, a cluster that can run it)."""
        kind = (job.has_command, job.gpu_types, job.node_pool)
        keys = self._serving.get(kind)
        if keys is None:
            clusters = set(_eligible_clusters(self.work, job))
            keys = self._serving[kind] = [key for key, i in self.position.items() if key[0] in clusters and job.serves(self.work[i])]
        return keys

    def _served(self, job: Pending, serving: list[NodeKey]) -> set[NodeKey]:
        kind = (job.has_command, job.gpu_types, job.node_pool)
        served = self._served_sets.get(kind)
        if served is None:
            served = self._served_sets[kind] = set(serving)
        return served

    def refresh(self, keys: Iterable[NodeKey]) -> None:
        for key in keys:
            entry = (key[1], self.position[key], key)
            old = self.free[key]
            if old[0] >= 1:
                bucket = self._with_slot[old[1]]
                del bucket[bisect.bisect_left(bucket, entry)]
            room = self.free[key] = _room(self.work[self.position[key]])
            if room[0] >= 1:
                bisect.insort(self._with_slot[room[1]], entry)
            if self._best:
                self._rerank(key, room)

    def _rerank(self, key: NodeKey, room: Room) -> None:
        """Bring every remembered best fit up to date with `key`'s new room (the other nodes are as they were)."""
        rank = (room[1], key[1], self.position[key])
        stale = []
        for request, best in self._best.items():
            gpus, cpu_millis, memory_bytes, served = self._best_needs[request]
            fits = room[0] >= 1 and room[1] >= gpus and room[2] >= cpu_millis and room[3] >= memory_bytes and key in served
            if best is not None and best[1] == key:
                if fits and rank <= best[0]:
                    self._best[request] = (rank, key)  # it only moved up: still ahead of every other
                else:
                    stale.append(request)  # it left or moved down: another may be best now (scanned when asked)
            elif fits and (best is None or rank < best[0]):
                self._best[request] = (rank, key)
        for request in stale:
            del self._best[request]

    def _best_fit(self, served: set[NodeKey], gpus: int, cpu_millis: int, memory_bytes: int, kind: tuple) -> NodeKey | None:
        """The node with a free slot and room for one member that leaves the fewest GPUs free (then by name, then
        listed first), or None; remembered per request until a node's room changes it (refresh)."""
        request = (gpus, cpu_millis, memory_bytes, kind)
        if request in self._best:
            best = self._best[request]
            return best[1] if best is not None else None
        found: tuple[tuple[int, str, int], NodeKey] | None = None
        for gpus_free in sorted(g for g in self._with_slot if g >= gpus):
            for name, position, key in self._with_slot[gpus_free]:
                f = self.free[key]
                if f[2] >= cpu_millis and f[3] >= memory_bytes and key in served:
                    found = ((gpus_free, name, position), key)
                    break
            if found is not None:
                break
        self._best[request] = found
        self._best_needs[request] = (gpus, cpu_millis, memory_bytes, served)
        return found[1] if found is not None else None

    def room_now(self, job: Pending) -> Placement | None:
        """Place `job` on what is free in the working capacity now (capacity being freed included), or None. A
        single job is looked for in the integer index (this runs for every blocked job after a preemption: placing
        over the whole fleet each time took most of a burst's pass); a gang is placed as capacity.place does."""
        if job.members > 1:
            for i in range(len(self.work)):
                self._own(i)
            placement = _place(self.work, job)
        else:
            served = self._served(job, self.serving(job))
            best = self._best_fit(served, job.gpus, job.cpu_millis, job.memory_bytes, (job.has_command, job.gpu_types, job.node_pool))
            if best is None:
                return None
            # The best fit has a free slot and room for it, and serves it (as capacity.place would check again).
            placement = capacity.place_member(self._own(self.position[best]), job.cpu_millis, job.memory_bytes, job.gpus)
        if placement is not None:
            self.refresh((placement.cluster, name) for name, _, _ in placement.parts)
        return placement

    def search(self, job: Pending, eligible: Callable[[Running, bool], bool], lower_only: bool) -> tuple[list[Running], list[NodeKey]] | None:
        """The fewest eligible victims (then the lowest priorities, then the youngest) that let `job` fit: on one
        node whole, or (a gang on a cluster that spreads members over nodes, Kubernetes) across that cluster's
        nodes. `lower_only`: only attempts of lower priority than the job are eligible (no reclaim), so a node's
        list can be left at the first attempt of its priority that is not a borrower's. Returns the victims and
        the nodes to place the job on, or None."""
        self._index()
        need = (1, job.gpus * job.members, job.cpu_millis * job.members, job.memory_bytes * job.members)
        best: tuple[list[Running], list[NodeKey]] | None = None
        best_rank: tuple[int, int, float] | None = None
        best_at = -1  # the position of the best option's node: ties go to the node listed first
        serving = self.serving(job)
        served = self._served(job, serving)
        for key in self.by_bound:
            if key not in served:
                continue
            if best_rank is not None and (best_rank, best_at) < (self.bound[key], self.position[key]):
                break  # no node left could offer better (nor as good and listed earlier)
            ordered = self.per_node[key]
            node = self.work[self.position[key]]
            if len(node.gpu_indices) < need[1] or node.cpu_millis < need[2] or node.memory_bytes < need[3] or node.slots < 1:
                continue  # even empty it could not hold the job
            chosen = self._on_node(key, ordered, need, job.priority, eligible, lower_only)
            if chosen:
                rank = _option_rank(chosen)
                if best_rank is None or (rank, self.position[key]) < (best_rank, best_at):
                    best, best_rank, best_at = (chosen, [key]), rank, self.position[key]
        if job.members > 1:
            for keys in self._groups(job, serving):
                chosen = self._across(keys, job, eligible, lower_only)
                if chosen:
                    rank = _option_rank(chosen)
                    if best_rank is None or rank < best_rank:
                        best, best_rank = (chosen, keys), rank
        return best

    def _on_node(self, key: NodeKey, ordered: list[tuple[Running, bool]], need: tuple[int, int, int, int], priority: int,
                 eligible: Callable[[Running, bool], bool], lower_only: bool) -> list[Running] | None:
        free = self.free[key]
        acc = list(free)
        chosen: list[Running] = []
        for victim, borrower in ordered:
            if lower_only and not borrower and victim.priority >= priority:
                break  # the rest of the list is of its priority or higher
            if not eligible(victim, borrower):
                continue
            chosen.append(victim)
            gives = self.gives[victim.id][key]
            acc[0] += gives[0]
            acc[1] += gives[1]
            acc[2] += gives[2]
            acc[3] += gives[3]
            if acc[0] >= need[0] and acc[1] >= need[1] and acc[2] >= need[2] and acc[3] >= need[3]:
                break
        else:
            return None
        if not chosen or not (acc[0] >= need[0] and acc[1] >= need[1] and acc[2] >= need[2] and acc[3] >= need[3]):
            return None
        # Fewest: drop any whose release turns out not to be needed (the highest priorities first).
        for victim in sorted(chosen[:-1], key=lambda r: (-r.priority, r.started_at)):
            gives = self.gives[victim.id][key]
            if all(acc[i] - gives[i] >= need[i] for i in range(4)):
                chosen.remove(victim)
                for i in range(4):
                    acc[i] -= gives[i]
        return chosen

    def _groups(self, job: Pending, serving: list[NodeKey]) -> Iterator[list[NodeKey]]:
        """The node sets a gang's members may spread over (as capacity.place: one cluster other than local, one
        GPU type of those it accepts)."""
        per_cluster: dict[str, list[NodeKey]] = defaultdict(list)
        for key in serving:
            if key[0] != LOCAL_CLUSTER:
                per_cluster[key[0]].append(key)
        for keys in per_cluster.values():
            if not job.gpu_types:
                yield keys
                continue
            for gpu_type in job.gpu_types:
                of_type = [k for k in keys if self.work[self.position[k]].serves((gpu_type,))]
                if of_type:
                    yield of_type

    def _across(self, keys: list[NodeKey], job: Pending, eligible: Callable[[Running, bool], bool], lower_only: bool) -> list[Running] | None:
        """As capacity._spread counts it: the gang fits when its members' room over `keys` adds up to its size and
        one node with a free worker slot has room for a member."""
        per = (job.gpus, job.cpu_millis, job.memory_bytes)
        members = job.members
        keyset = set(keys)
        acc = {key: list(self.free[key]) for key in keys}

        def room(r: Room) -> int:
            limits = [r[i + 1] // per[i] for i in range(3) if per[i]]
            return max(0, min(limits)) if limits else members

        rooms = {key: room(acc[key]) for key in keys}
        total = sum(rooms.values())
        slotted = sum(1 for key in keys if acc[key][0] >= 1 and rooms[key] >= 1)

        def apply(victim: Running, sign: int) -> None:
            nonlocal total, slotted
            for key, gives in self.gives[victim.id].items():
                if key not in keyset:
                    continue
                r = acc[key]
                before = r[0] >= 1 and rooms[key] >= 1
                for i in range(4):
                    r[i] += sign * gives[i]
                total -= rooms[key]
                rooms[key] = room(r)
                total += rooms[key]
                slotted += (r[0] >= 1 and rooms[key] >= 1) - before

        chosen: list[Running] = []
        cluster = keys[0][0]
        for victim, borrower in self.per_cluster.get(cluster, ()):
            if lower_only and not borrower and victim.priority >= job.priority:
                break
            if not eligible(victim, borrower) or not keyset.intersection(self.gives[victim.id]):
                continue
            chosen.append(victim)
            apply(victim, +1)
            if total >= members and slotted:
                break
        else:
            return None
        if not (total >= members and slotted):
            return None
        for victim in sorted(chosen[:-1], key=lambda r: (-r.priority, r.started_at)):
            apply(victim, -1)
            if total >= members and slotted:
                chosen.remove(victim)
            else:
                apply(victim, +1)
        return chosen

    def take(self, victims: Sequence[Running], job: Pending, onto: Sequence[NodeKey]) -> Placement | None:
        """Stop `victims` and place `job` on `onto` in the working capacity (copies of the nodes touched), so its
        room is its own for the rest of the pass; None (nothing changed) if it does not fit after all."""
        self._index()
        touched = set(onto) | {key for r in victims for key in self.gives[r.id]}
        copies = {key: self.work[self.position[key]].copy() for key in touched}
        for victim in victims:
            _release(copies, victim)
        placement = capacity.place([copies[key] for key in onto], job.cpu_millis, job.memory_bytes, job.gpus, job.members,
                                   has_command=job.has_command, elsewhere=self.elsewhere, gpu_types=job.gpu_types, pool=job.node_pool)
        if placement is None:
            return None
        for key, node in copies.items():
            self.work[self.position[key]] = node
            self.owned.add(self.position[key])
        self.refresh(touched)
        return placement


def _option_rank(chosen: Sequence[Running]) -> tuple[int, int, float]:
    """Fewest victims, then the lowest priorities, then the youngest."""
    return (len(chosen), max(r.priority for r in chosen), -min(r.started_at for r in chosen))


def _preempt(snapshot: Snapshot, config: PolicyConfig, plan: Plan) -> None:
    """Waiting jobs that cannot start now may stop running jobs of strictly lower priority.

    Victims are whole attempts (a gang with all its members). On each node holding candidates, they are
    taken lowest priority first, then the most recently started (it loses the least work), until the
    waiting job fits there whole (its GPU indices on that node), then pruned; the node needing the fewest
    (then the lowest priorities) wins. Capacity already being freed (attempts stopping after an earlier
    preemption) is counted first, so a pass never preempts again for a job whose room is on its way.
    Strictly lower priority means a victim can never preempt its preemptor back: no cycles.

    Reclaim: a job whose tenant stays within its nominal quota with it may also stop the jobs of tenants that
    borrow (use more than their nominal quota), whatever their priority, borrowers first, but only attempts that
    stand wholly on borrowed capacity (the borrower stays at or above its nominal quota without them: taking more
    would let it reclaim the same capacity right back). The reclaimer's tenant is within nominal and the
    victims' is not, and a job that would borrow never preempts another tenant within its nominal quota: no
    cycle through reclaim either.

    No repeats: an attempt is never preempted again for a job that already preempted it (if that job lost the
    room to jobs ahead of it and the victim started again meanwhile, it looks elsewhere or waits).

    Every blocked job is searched for, in the pass's order (as Kueue and Volcano do for every pending workload),
    cheaply: the candidates are indexed once (_Victims), and once a search for a shape fails at priority p, the
    jobs of the same shape at priority p or below are not searched again until a preemption could have changed
    the answer (their candidates are a subset of the failed job's, and the free capacity only shrinks meanwhile).
    """
    now = snapshot.now
    stats = plan.preemption_search
    ledger = quotas.Ledger(snapshot.quotas, _holding(snapshot.running))
    if ledger.active:
        for admitted in plan.admitted:
            j = admitted.job
            ledger.charge(j.owner, admitted.placement.cluster, (j.gpus * j.members, j.cpu_millis * j.members, j.memory_bytes * j.members))
    stopping = [r for r in snapshot.running if r.stopping]
    if ledger.active:
        for r in stopping:  # already preempted: what they hold is on its way back, borrowed or not
            ledger.charge(r.owner, r.cluster, (-r.amounts[0], -r.amounts[1], -r.amounts[2]))
    borrowers = {r.owner for r in snapshot.running if ledger.active and ledger.borrowing(r.owner)}
    candidates = [r for r in snapshot.running if _candidate(r, now, config)]
    if not candidates and not stopping:
        return
    # The plan's free capacity is left as it is: the nodes changed here are copied first (copy on write).
    work = list(plan.free)
    index_of = {(n.cluster, n.name): i for i, n in enumerate(work)}
    owned = {index_of[key] for r in stopping for name, _ in r.parts if (key := (r.cluster, name)) in index_of}
    for i in owned:
        work[i] = work[i].copy()
    _release({(work[i].cluster, work[i].name): work[i] for i in owned}, *stopping)
    victims = _Victims(work, candidates, borrowers, owned)
    remembered = {job_id for r in candidates for job_id in r.preempted_by}  # jobs some candidate must be spared for
    changed = bool(stopping)  # `work` may hold room plan.free did not
    budget = dict(snapshot.preemption_budget) if snapshot.preemption_budget is not None else None
    taken: set[str] = set()
    lowest = min((r.priority for r in candidates), default=None)
    unfit: set[tuple] = set()
    # Searches that failed: (shape, reclaim context) -> spans [floor, priority]: the same shape fails at any priority
    # in (floor, priority]. A preemption frees what its victims held beyond the preemptor's need, which a job that
    # could not take those victims (priority at or below theirs) could use: the floor rises to their priority.
    failed: dict[tuple, list[list[int]]] = defaultdict(list)
    blocked = [plan.decisions[job_id] for job_id in plan.order]
    blocked = [d for d in blocked if isinstance(d, Reserve) or (isinstance(d, Wait) and d.reason in (CAPACITY, NO_RESERVATION))]
    clusters_for = {command: _eligible_clusters(work, command) for command in (True, False)}  # not per job: 1,000 nodes
    for position, decision in enumerate(blocked):
        if (budget is not None and all(v <= 0 for v in budget.values())) or len(taken) >= victims.count:
            break  # nothing is left to preempt this pass (the rate limit is spent, or every candidate is taken)
        if stats.searched >= config.preemption_searches_per_pass or stats.examined >= config.preemption_scan_limit:
            stats.unexamined, stats.first_unexamined = len(blocked) - position, decision.job.id
            break
        job = decision.job
        stats.examined += 1
        # Every blocked job, in the pass's order, may preempt (not only the first of its pool: a burst of urgent
        # jobs would otherwise start one per pass). What is freed for one is kept for it in `work`, and the next
        # pass considers it in the same order, before anything its victims' room could go to instead.
        if changed and job.shape not in unfit:
            if victims.room_now(job) is not None:
                stats.room_on_its_way += 1
                stats.outcomes[job.id] = stats.ROOM_ON_ITS_WAY
                continue  # what is being freed already makes room for it: it keeps that room, nobody preempts more
            unfit.add(job.shape)  # `work` only shrinks until the next preemption: the same shape does not fit either
        ask = (job.gpus * job.members, job.cpu_millis * job.members, job.memory_bytes * job.members)
        within = ledger.within_nominal(job.owner, ask)
        reclaims = bool(borrowers) and within
        if lowest is None or (lowest >= job.priority and not reclaims):
            stats.outcomes[job.id] = stats.NO_LOWER
            continue  # nobody it may preempt
        # A job that would borrow never takes capacity from another tenant within its nominal quota (that
        # tenant would reclaim it right back): only from its own tenant's jobs and from borrowers.
        borrows = job.owner in ledger.quotas and not within
        context = (job.shape, reclaims, borrows, job.owner if reclaims or borrows else None)
        if any(floor < job.priority <= ceiling for floor, ceiling in failed.get(context, ())):
            stats.skipped += 1
            stats.outcomes[job.id] = stats.SKIPPED
            continue

        if budget is not None and all(budget.get(c, 0) <= 0 for c in clusters_for[job.has_command]):
            stats.outcomes[job.id] = stats.RATE_LIMIT
            continue

        def eligible(r: Running, borrower: bool, job: Pending = job, reclaims: bool = reclaims, borrows: bool = borrows) -> bool:
            return ((r.priority < job.priority
                     or (reclaims and borrower and r.owner != job.owner and ledger.reclaimable(r.owner, r.cluster, r.amounts)))
                    and r.id not in taken and r.id not in job.preempted_by and job.id not in r.preempted_by
                    and not (borrows and r.owner != job.owner and r.owner in ledger.quotas and not borrower)
                    and (budget is None or budget.get(r.cluster, 0) > 0))

        stats.searched += 1
        found = victims.search(job, eligible, lower_only=not reclaims)
        # A failure holds for the same shape at lower priorities unless this job had candidates withheld from it alone.
        alone = bool(job.preempted_by) or job.id in remembered
        if found is None:
            if not alone:
                failed[context].append([-1, job.priority])
            stats.outcomes[job.id] = stats.NO_VICTIMS
            continue
        chosen, onto = found
        if ledger.active and not _reclaims_only_borrowed(ledger, job, chosen):
            stats.outcomes[job.id] = stats.RECLAIM_RULE
            continue
        if budget is not None:
            per_cluster: dict[str, int] = defaultdict(int)
            for r in chosen:
                per_cluster[r.cluster] += 1
            if any(budget.get(c, 0) < n for c, n in per_cluster.items()):
                stats.outcomes[job.id] = stats.RATE_LIMIT
                continue
        placement = victims.take(chosen, job, onto)
        if placement is None:  # pragma: no cover - the search counted room the real placement did not find
            stats.outcomes[job.id] = stats.UNPLACED
            continue
        if budget is not None:
            for c, n in per_cluster.items():
                budget[c] -= n
        taken.update(r.id for r in chosen)
        if ledger.active:
            # What the victims give back no longer counts as borrowed for the next reclaimer; the job will hold its room.
            for r in chosen:
                ledger.charge(r.owner, r.cluster, (-r.amounts[0], -r.amounts[1], -r.amounts[2]))
            ledger.charge(job.owner, placement.cluster, ask)
        plan.preemptions.append(Preemption(job, tuple(chosen), placement.cluster))
        stats.outcomes[job.id] = stats.PREEMPTED
        changed = True  # its room is its own from now on
        unfit.clear()
        top = max(r.priority for r in chosen)
        for context_, spans in list(failed.items()):
            # Reclaim and borrowing depend on the quota ledger, which this preemption changed: searched afresh.
            spans[:] = [] if ledger.active and (context_[1] or context_[2]) else [[max(f, top), c] for f, c in spans if max(f, top) < c]
            if not spans:
                del failed[context_]


def _reclaims_only_borrowed(ledger: quotas.Ledger, job: Pending, chosen: Sequence[Running]) -> bool:
    """The victims taken by reclaim (not of lower priority), together per tenant, stand on borrowed capacity only."""
    per_tenant: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for r in chosen:
        if r.priority >= job.priority:
            total = per_tenant[(r.owner, r.cluster)]
            for i, amount in enumerate(r.amounts):
                total[i] += amount
    return all(ledger.reclaimable(owner, cluster, (a[0], a[1], a[2])) for (owner, cluster), a in per_tenant.items())


def _capacity_message(ahead: list[Reserve]) -> str:
    if not ahead:
        return "It does not fit the free capacity now"
    return f"It does not fit the free capacity now; {len(ahead)} job(s) of its kind ahead of it hold reservations (first: {ahead[0].job.id})"


def _strict_pass(snapshot: Snapshot, nodes: list[NodeCapacity], plan: Plan) -> None:
    """Yesterday's policy, kept as the simulator's baseline: strict order, the first misfit stops the pass."""
    room = dict(snapshot.queue_room) if snapshot.queue_room is not None else None
    blocker: Pending | None = None
    for job in sorted(snapshot.backlog, key=_strict_key):
        plan.order.append(job.id)
        if room is not None and room.get(job.queue, 0) <= 0:
            plan.decisions[job.id] = Wait(job, QUEUE_FULL, f"Queue {job.queue} is at its max_concurrency")
            continue
        if blocker is not None:
            plan.decisions[job.id] = Wait(job, BLOCKED, f"Job {blocker.id} is ahead of it and does not fit", blocked_by=blocker.id)
            continue
        placement = _place(nodes, job)
        if placement is None:
            blocker = job
            plan.decisions[job.id] = Wait(job, CAPACITY, "It does not fit the free capacity now")
            continue
        if room is not None:
            room[job.queue] = room.get(job.queue, 0) - 1
        plan.decisions[job.id] = Admit(job, placement, backfilled=False)


def _strict_key(job: Pending) -> tuple[int, float, str]:
    return (-job.priority, job.submitted_at, job.id)


# Off only in tests: a plan made with the repeated decisions (_backfill_pass) must equal one made without them.
_REPEAT_DECISIONS = True


def _isolated(job: Pending, decide_one: Callable[[Pending], Decision]) -> Decision:
    """One job's decision; if working it out raises, that job fails and the pass goes on."""
    try:
        return decide_one(job)
    except Exception as exc:  # noqa: BLE001 - one job must never stop the pass
        return Fail(job, f"the scheduler could not admit this job: {type(exc).__name__}: {exc}"[:1000])


class _Misfits:
    """Requests known not to fit now; a request at least as large in every way does not fit either."""

    def __init__(self) -> None:
        self.shapes: dict[tuple, list[tuple[int, int, int]]] = defaultdict(list)
        self.covered: set[tuple] = set()  # exact requests found covered: misfits only grow in a pass, so they stay covered

    def covers(self, job: Pending) -> bool:
        key = (job.has_command, job.members, job.gpu_types, job.node_pool)
        exact = (key, job.gpus, job.cpu_millis, job.memory_bytes)
        if exact in self.covered:
            return True
        if any(job.gpus >= g and job.cpu_millis >= c and job.memory_bytes >= m for g, c, m in self.shapes.get(key, ())):
            self.covered.add(exact)
            return True
        return False

    def add(self, job: Pending) -> None:
        self.shapes[(job.has_command, job.members, job.gpu_types, job.node_pool)].append((job.gpus, job.cpu_millis, job.memory_bytes))


def _withheld(snapshot: Snapshot) -> dict[tuple[str, str], dict[str, int]]:
    """Nodes where attempts are stopping for waiting preemptors: (cluster, node) -> {preemptor: its priority}.

    Their victims hold their capacity through the kill grace, but what is free beside them is part of the room the
    preemptors were promised: another job of no higher priority placed there would race them for it (and be
    preempted again at the grace's end)."""
    priorities = {job.id: job.priority for job in snapshot.backlog}
    withheld: dict[tuple[str, str], dict[str, int]] = {}
    for attempt in snapshot.running:
        if not attempt.stopping:
            continue
        for preemptor in attempt.preempted_by:
            priority = priorities.get(preemptor)
            if priority is None:
                continue  # it started (or left the backlog): nothing is kept for it
            for name, _ in attempt.parts:
                withheld.setdefault((attempt.cluster, name), {})[preemptor] = priority
    return withheld


class _FreeIndex:
    """Nodes by free GPU count, so that placing a GPU job looks only at nodes with enough free GPUs.

    `withheld`: nodes kept for preemptors (_withheld); only they, and jobs of higher priority, are placed there."""

    def __init__(self, nodes: list[NodeCapacity], withheld: Mapping[tuple[str, str], dict[str, int]] | None = None) -> None:
        self.nodes = nodes
        self.withheld = dict(withheld or {})
        self.preemptors = {job_id for kept_for in self.withheld.values() for job_id in kept_for}
        self.by_name = {(n.cluster, n.name): n for n in nodes}
        self.elsewhere = any(n.cluster != LOCAL_CLUSTER for n in nodes)
        self.buckets: dict[int, dict[tuple[str, str], NodeCapacity]] = defaultdict(dict)
        self.count: dict[tuple[str, str], int] = {}
        for n in nodes:
            self._file(n)

    def _file(self, node: NodeCapacity) -> None:
        key = (node.cluster, node.name)
        old = self.count.get(key)
        if old is not None:
            self.buckets[old].pop(key, None)
        count = node.gpus_free_count
        self.count[key] = count
        self.buckets[count][key] = node

    def refresh(self, placement: Placement) -> None:
        for name, _, _ in placement.parts:
            self._file(self.by_name[(placement.cluster, name)])

    def place(self, job: Pending, *, withholding: bool = True) -> Placement | None:
        if job.gpus > 0:
            candidates = [n for count, bucket in self.buckets.items() if count >= job.gpus for n in bucket.values()]
        else:
            candidates = [n for n in self.nodes if n.cpu_millis - n.used_cpu_millis >= job.cpu_millis
                          and n.memory_bytes - n.used_memory_bytes >= job.memory_bytes]
        if withholding and self.withheld:
            candidates = [n for n in candidates if not self._kept_from(job, (n.cluster, n.name))]
        placement = capacity.place(candidates, job.cpu_millis, job.memory_bytes, job.gpus, job.members,
                                   has_command=job.has_command, elsewhere=self.elsewhere, gpu_types=job.gpu_types, pool=job.node_pool)
        if placement is not None:
            self.refresh(placement)
        return placement

    def _kept_from(self, job: Pending, key: tuple[str, str]) -> bool:
        kept_for = self.withheld.get(key)
        return bool(kept_for) and job.id not in kept_for and max(kept_for.values()) >= job.priority

    def withheld_from(self, job: Pending) -> tuple[str, int] | None:
        """The preemptor (and its priority) whose room alone would hold `job` now (a trial placement, undone), or None."""
        if not any(self._kept_from(job, key) for key in self.withheld):
            return None
        trial = self.place(job, withholding=False)
        if trial is None:
            return None
        _unplace(self.by_name, trial, job)
        self.refresh(trial)
        kept = [(priority, preemptor) for name, _, _ in trial.parts if self._kept_from(job, key := (trial.cluster, name))
                for preemptor, priority in self.withheld[key].items()]
        if not kept:
            return None
        priority, preemptor = max(kept)
        return preemptor, priority


def _never_fits(nodes: Sequence[NodeCapacity], job: Pending) -> bool:
    """Whether no live node could hold the job even with nothing running (as capacity.place, on empty nodes)."""
    need = (job.gpus, job.cpu_millis, job.memory_bytes)
    for cluster in _eligible_clusters(nodes, job):
        members = [n for n in nodes if n.cluster == cluster and n.slots >= 1 and job.serves(n)]
        if cluster == LOCAL_CLUSTER:
            if any(len(n.gpu_indices) >= need[0] * job.members and n.cpu_millis >= need[1] * job.members
                   and n.memory_bytes >= need[2] * job.members for n in members):
                return False
        else:
            room = 0
            for n in members:
                limits = [total // amount for total, amount in zip((len(n.gpu_indices), n.cpu_millis, n.memory_bytes), need) if amount]
                room += min(limits) if limits else job.members
                if room >= job.members:
                    return False
    return True


def _place(nodes: list[NodeCapacity], job: Pending) -> Placement | None:
    return capacity.place(nodes, job.cpu_millis, job.memory_bytes, job.gpus, job.members, has_command=job.has_command,
                          gpu_types=job.gpu_types, pool=job.node_pool)


def _unplace(by_key: Mapping[tuple[str, str], NodeCapacity], placement: Placement, job: Pending) -> None:
    """Undo a trial placement (a backfill candidate that would delay a reservation)."""
    for index, (name, members, gpu_indices) in enumerate(placement.parts):
        node = by_key[(placement.cluster, name)]
        if gpu_indices:
            node.used_gpus.difference_update(gpu_indices)
        else:
            node.used_anonymous_gpus -= job.gpus * members
        node.used_cpu_millis -= job.cpu_millis * members
        node.used_memory_bytes -= job.memory_bytes * members
        node.used_slots -= 1 if index == 0 else 0


# --- fair share ------------------------------------------------------------------------------------


def _totals(nodes: Sequence[NodeCapacity]) -> tuple[float, float, float]:
    return (
        float(sum(len(n.gpu_indices) for n in nodes)),
        float(sum(n.cpu_millis for n in nodes)),
        float(sum(n.memory_bytes for n in nodes)),
    )


def priority_band(width: int) -> Callable[[int], int]:
    """Priorities within one band count as equal for fair share: bands of `width` points centred on its multiples
    (5: 48-52, 53-57, ...; 1: every priority its own band). Priorities set as a few levels, nudged by a point or two
    (49, 50, 51), then share their level: fair share, not the nudge, decides among them, and a job never goes
    before one more than `width` - 1 points above it."""
    width = max(1, int(width))
    half = width // 2
    return lambda priority: (priority + half) // width


def dominant_fraction(gpus: float, cpu_millis: float, memory_bytes: float, totals: tuple[float, float, float]) -> float:
    """The largest fraction of the fleet this amount is, over GPUs, CPU and memory (DRF)."""
    return max((amount / total for amount, total in zip((gpus, cpu_millis, memory_bytes), totals) if total > 0), default=0.0)


class _Shares:
    """Owners' dominant shares: decayed usage (as a steady-state fraction of the fleet) plus what they hold."""

    def __init__(self, snapshot: Snapshot, config: PolicyConfig, totals: tuple[float, float, float], waiting: Iterable[str] = ()) -> None:
        self.config = config
        self.admin_weights = snapshot.weights
        self.totals = totals
        mean_life = max(config.half_life_seconds, 1e-9) / math.log(2)  # steady state of decayed usage = rate * mean life
        self.used: dict[str, list[float]] = {}
        for owner, usage in snapshot.usage.items():
            self.used[owner] = [usage.gpu_seconds / mean_life, usage.cpu_seconds * 1000 / mean_life, usage.memory_gib_seconds * GIB / mean_life]
        self.held: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        for attempt in snapshot.running:
            members = sum(m for _, m in attempt.parts)
            held = self.held[attempt.owner]
            held[0] += attempt.gpus * members
            held[1] += attempt.cpu_millis * members
            held[2] += attempt.memory_bytes * members
        self.owners_waiting = sorted({job.owner for job in snapshot.backlog} | set(waiting))
        self._cached: dict[str, float] = {}

    def share(self, owner: str) -> float:
        # Asked once per job the pass orders, but it changes only when the owner is charged: cached until then.
        share = self._cached.get(owner)
        if share is None:
            used = self.used.get(owner, (0.0, 0.0, 0.0))
            held = self.held.get(owner, (0.0, 0.0, 0.0))
            total = [u + h for u, h in zip(used, held)]
            share = self._cached[owner] = dominant_fraction(*total, self.totals) / self.config.weight(owner, self.admin_weights)
        return share

    def charge(self, job: Pending) -> None:
        held = self.held[job.owner]
        held[0] += job.gpus * job.members
        held[1] += job.cpu_millis * job.members
        held[2] += job.memory_bytes * job.members
        self._cached.pop(job.owner, None)

    def order(self, backlog: Sequence[Pending]) -> Iterator[Pending]:
        """Priority first; within a priority band the owner with the lowest share next (updated as the pass admits),
        and each owner's own jobs by priority, then age."""
        band = priority_band(self.config.priority_band)
        by_priority: dict[int, dict[str, list[Pending]]] = defaultdict(lambda: defaultdict(list))
        for job in backlog:
            by_priority[band(job.priority)][job.owner].append(job)
        for tier in sorted(by_priority, reverse=True):
            queues = by_priority[tier]
            heap: list[tuple[float, str]] = []
            positions: dict[str, int] = {}
            for owner, jobs in queues.items():
                jobs.sort(key=lambda j: (-j.priority, j.submitted_at, j.id))
                positions[owner] = 0
                heap.append((self.share(owner), owner))
            if len(queues) == 1:
                yield from next(iter(queues.values()))  # one owner in the band: nobody to take turns with
                continue
            heapq.heapify(heap)
            _, owner = heapq.heappop(heap)
            while True:
                jobs = queues[owner]
                position = positions[owner]
                yield jobs[position]
                positions[owner] = position + 1
                if position + 1 < len(jobs):
                    # Pushed back and the lowest share popped in one: while it stays this owner, the heap is not touched.
                    _, owner = heapq.heappushpop(heap, (self.share(owner), owner))
                elif heap:
                    _, owner = heapq.heappop(heap)
                else:
                    break

    def report(self) -> dict[str, OwnerShare]:
        owners = set(self.used) | set(self.held) | set(self.owners_waiting)
        rows = []
        for owner in owners:
            used = self.used.get(owner, (0.0, 0.0, 0.0))
            held = self.held.get(owner, (0.0, 0.0, 0.0))
            rows.append((self.share(owner), owner, dominant_fraction(*used, self.totals), dominant_fraction(*held, self.totals)))
        rows.sort()
        waiting = set(self.owners_waiting)
        ranks = {owner: rank for rank, owner in enumerate((o for _, o, _, _ in rows if o in waiting), start=1)}
        return {
            owner: OwnerShare(owner, self.config.weight(owner, self.admin_weights), usage, held, share, ranks.get(owner, 0))
            for share, owner, usage, held in rows
        }


# --- time: what ends when, and the reservations ------------------------------------------------------


@dataclass
class _Reservation:
    job_id: str
    start: float
    end: float
    demand: dict[int, Vec]  # node index -> what it takes there
    cluster: str
    nodes: tuple[str, ...]


class _Timeline:
    """Capacity over time per node: free now, plus what running (and just admitted) attempts release at
    their ends, minus what reservations take from their start to their end."""

    def __init__(self, nodes: list[NodeCapacity], running: Sequence[Running], now: float, margin: float = 0.0) -> None:
        self.nodes = nodes
        self.now = now
        self.margin = margin
        self.index = {(n.cluster, n.name): i for i, n in enumerate(nodes)}
        self.releases: list[list[tuple[float, Vec]]] = [[] for _ in nodes]
        for attempt in running:
            for part, (name, members) in enumerate(attempt.parts):
                i = self.index.get((attempt.cluster, name))
                if i is not None:
                    vec = [attempt.gpus * members, attempt.cpu_millis * members, attempt.memory_bytes * members, 1 if part == 0 else 0]
                    # An attempt past its end is ending (being killed): it frees its capacity any moment now.
                    self.releases[i].append((max(attempt.ends_at, now + 1e-3), vec))
        for events in self.releases:
            events.sort(key=lambda e: e[0])
        self.reservations: list[_Reservation] = []
        self.by_node: dict[int, list[_Reservation]] = defaultdict(list)
        self._cumulative: dict[int, tuple[list[float], list[Vec]]] = {}
        # (shape, duration) of requests for which `reserve` found no start, valid until the timeline changes
        # (a hold or a committed reservation): a backlog of many alike jobs behind capacity held without
        # timeouts then costs one sweep per pass, not one per job.
        self._unreservable: set[tuple] = set()
        self._eligible: dict[tuple, tuple[list[str], dict[str, list[int]], set[int], dict[int, str]]] = {}
        # Per kind of job: each time something ends on its eligible nodes, with those nodes, in time order. Kept up to
        # date by `hold` (an admission adds one release), not listed afresh: at 1,000 nodes that was most of a reserve.
        self._release_steps: dict[tuple, list[tuple[float, set[int]]]] = {}

    @property
    def has_reservations(self) -> bool:
        return bool(self.reservations)

    def free(self, i: int) -> Vec:
        n = self.nodes[i]
        return [n.gpus_free_count, n.cpu_millis - n.used_cpu_millis, n.memory_bytes - n.used_memory_bytes, n.slots - n.used_slots]

    def available(self, i: int, t: float) -> Vec:
        """Free on node i at time t: now's free, plus releases by t, minus reservations active at t."""
        vec = self.free(i)
        cumulative = self._cumulative.get(i)
        if cumulative is None:
            times, sums, total = [], [], [0, 0, 0, 0]
            for at, released in self.releases[i]:
                total = [a + b for a, b in zip(total, released)]
                times.append(at)
                sums.append(total)
            cumulative = self._cumulative[i] = (times, sums)
        k = bisect.bisect_right(cumulative[0], t)
        if k:
            vec = [a + b for a, b in zip(vec, cumulative[1][k - 1])]
        for r in self.by_node.get(i, ()):
            if r.start <= t < r.end:
                vec = [a - b for a, b in zip(vec, r.demand[i])]
        return vec

    def _nodes_of(self, placement: Placement) -> list[int]:
        return [self.index[(placement.cluster, name)] for name, _, _ in placement.parts]

    def conflict(self, placement: Placement, job: Pending, end: float) -> _Reservation | None:
        """The first reservation a job just placed now (and held until `end`) would delay, if any."""
        for i in self._nodes_of(placement):
            for r in self.by_node.get(i, ()):
                if r.start < end and min(self.available(i, r.start)) < 0:
                    return r
        return None

    def hold(self, placement: Placement, job: Pending, end: float) -> None:
        """An admission: its capacity comes back at its end (its timeout)."""
        for part, (name, members, _) in enumerate(placement.parts):
            i = self.index[(placement.cluster, name)]
            vec = [job.gpus * members, job.cpu_millis * members, job.memory_bytes * members, 1 if part == 0 else 0]
            bisect.insort(self.releases[i], (end, vec), key=lambda e: e[0])
            self._cumulative.pop(i, None)
            if self.now < end < INF:
                for key, steps in self._release_steps.items():
                    if i in self._eligible[key][2]:
                        k = bisect.bisect_left(steps, end, key=lambda e: e[0])
                        if k < len(steps) and steps[k][0] == end:
                            steps[k][1].add(i)
                        else:
                            steps.insert(k, (end, {i}))
        self._unreservable.clear()

    def unreservable(self, job: Pending) -> bool:
        """`reserve` would find no start for `job` (known from an earlier request like it, the timeline unchanged since)."""
        return (job.shape, job.duration) in self._unreservable

    def reserve(self, job: Pending, *, commit: bool) -> _Reservation | None:
        """The earliest start (and nodes) at which `job` fits without delaying an existing reservation.

        A sweep over time: every eligible node is checked at `now`; after that only the nodes where
        something ends can have become able to hold it (capacity only grows between reservation starts,
        and those are accounted for by `_window`), so each later step rechecks those nodes alone.
        """
        key = (job.shape, job.duration)
        if key in self._unreservable:
            return None
        found = self._reserve(job, commit=commit)
        if found is None:
            self._unreservable.add(key)
        return found

    def _reserve(self, job: Pending, *, commit: bool) -> _Reservation | None:
        clusters, by_cluster, eligible, cluster_of = self._eligibility(job)
        need = [job.gpus, job.cpu_millis, job.memory_bytes]
        whole = [x * job.members for x in need] + [1]
        # Per Kubernetes cluster: how many members each node could take over the window, and their sum.
        spread: dict[str, dict[int, tuple[int, Vec]]] = {c: {} for c in clusters if c != LOCAL_CLUSTER}
        totals: dict[str, int] = defaultdict(int)
        reserved_in = {c: [i for i in by_cluster.get(c, []) if i in self.by_node] for c in clusters}

        def members_fit(i: int, t: float, end: float) -> tuple[int, Vec]:
            vec = self._window(i, t, end)
            fits = min((vec[r] // need[r] for r in range(3) if need[r] > 0), default=job.members)
            return (max(0, min(fits, job.members)) if min(vec[:3]) >= 0 else 0, vec)

        def refit(cluster: str, nodes: Iterable[int], t: float, end: float) -> None:
            caps = spread[cluster]
            for i in nodes:
                old = caps.get(i, (0, []))[0]
                caps[i] = members_fit(i, t, end)
                totals[cluster] += caps[i][0] - old

        # At `now` only nodes with enough free of what it needs (or holding reservations) can take a member.
        nodes, by_node = self.nodes, self.by_node
        at_now = set()
        for i in eligible:
            n = nodes[i]
            if i in by_node or (n.cpu_millis - n.used_cpu_millis >= need[1] and n.memory_bytes - n.used_memory_bytes >= need[2]
                                and n.gpus_free_count >= need[0]):
                at_now.add(i)
        for t, changed in self._steps(job, eligible, at_now):
            end = t + job.duration + self.margin
            for cluster in clusters:
                # In node order, as the eligible nodes are listed (ties go to the first).
                touched = sorted(i for i in changed if cluster_of[i] == cluster)
                if cluster == LOCAL_CLUSTER:
                    best: tuple[int, int] | None = None
                    for i in touched:
                        vec = self._window(i, t, end)
                        if all(a >= b for a, b in zip(vec, whole)) and (best is None or vec[0] - whole[0] < best[0]):
                            best = (vec[0] - whole[0], i)
                    if best is not None:
                        return self._made(job, t, end, {best[1]: whole}, cluster, commit)
                elif touched:
                    refit(cluster, touched, t, end)
                    if totals[cluster] >= job.members:
                        # Nodes holding reservations may have lost room as the window moved: count them afresh.
                        refit(cluster, reserved_in[cluster], t, end)
                        demand = _spread(spread[cluster], job.members, need) if totals[cluster] >= job.members else None
                        if demand is not None:
                            return self._made(job, t, end, demand, cluster, commit)
        return None

    def _eligibility(self, job: Pending) -> tuple[list[str], dict[str, list[int]], set[int], dict[int, str]]:
        """The clusters and nodes that may hold `job` (the same for every job of its kind: computed once a pass)."""
        key = (job.has_command, job.gpu_types, job.node_pool)
        found = self._eligible.get(key)
        if found is None:
            clusters = _eligible_clusters(self.nodes, job)
            by_cluster: dict[str, list[int]] = defaultdict(list)
            for i, n in enumerate(self.nodes):
                if n.cluster in clusters and job.serves(n):
                    by_cluster[n.cluster].append(i)
            cluster_of = {i: c for c, members in by_cluster.items() for i in members}
            found = self._eligible[key] = (clusters, dict(by_cluster), set(cluster_of), cluster_of)
        return found

    def _steps(self, job: Pending, eligible: set[int], at_now: set[int]) -> Iterator[tuple[float, set[int]]]:
        """`now` with `at_now`, then each later time something ends on an eligible node (an attempt, or a reservation's
        window), with those nodes, in time order. What attempts release is listed once per kind of job (then `hold` adds
        each admission's release to it); reservations' ends, a few, are merged in."""
        key = (job.has_command, job.gpu_types, job.node_pool)
        cached = self._release_steps.get(key)
        if cached is None:
            changes: dict[float, set[int]] = defaultdict(set)
            for i in eligible:
                for at, _ in self.releases[i]:
                    if self.now < at < INF:
                        changes[at].add(i)
            cached = self._release_steps[key] = sorted(changes.items())
        ends: dict[float, set[int]] = defaultdict(set)
        for r in self.reservations:
            if r.end < INF:
                for i in r.demand:
                    if i in eligible:
                        ends[r.end].add(i)
        yield self.now, at_now
        if not ends:
            yield from cached
            return
        merged = heapq.merge(cached, sorted(ends.items()), key=lambda e: e[0])
        pending: tuple[float, set[int]] | None = None
        for t, changed in merged:
            if pending is not None and pending[0] == t:
                pending = (t, pending[1] | changed)
                continue
            if pending is not None:
                yield pending
            pending = (t, changed)
        if pending is not None:
            yield pending

    def _made(self, job: Pending, t: float, end: float, demand: dict[int, Vec], cluster: str, commit: bool) -> _Reservation:
        found = _Reservation(job.id, t, end, demand, cluster, tuple(self.nodes[i].name for i in demand))
        if commit:
            self.reservations.append(found)
            for i in demand:
                self.by_node[i].append(found)
            self._unreservable.clear()
        return found

    def _window(self, i: int, t: float, end: float) -> Vec:
        """The least free on node i over [t, end): at t, and at each reservation start inside."""
        vec = self.available(i, t)
        for r in self.by_node.get(i, ()):
            if t < r.start < end:
                vec = [min(a, b) for a, b in zip(vec, self.available(i, r.start))]
        return vec


def _spread(caps: dict[int, tuple[int, Vec]], members: int, need: list[int]) -> dict[int, Vec] | None:
    """Members over a cluster's nodes (as capacity._spread); the first member's node gives the slot."""
    if sum(c for c, _ in caps.values()) < members:
        return None
    ordered = sorted(((c, i, vec) for i, (c, vec) in caps.items() if c > 0), key=lambda e: (vec_slot(e[2]) < 1, -e[0], e[1]))
    if not ordered or vec_slot(ordered[0][2]) < 1:
        return None
    demand: dict[int, Vec] = {}
    left = members
    for count, i, _ in ordered:
        take = min(count, left)
        demand[i] = [need[0] * take, need[1] * take, need[2] * take, 0 if demand else 1]
        left -= take
        if not left:
            return demand
    return None


def vec_slot(vec: Vec) -> int:
    return vec[3]


def _eligible_clusters(nodes: Sequence[NodeCapacity], job: Pending | bool) -> list[str]:
    """As capacity.place: local first (a job without a command only where no other cluster exists).
    `job`: the job, or whether it has a command (all that matters)."""
    has_command = job if isinstance(job, bool) else job.has_command
    others = sorted({n.cluster for n in nodes} - {LOCAL_CLUSTER})
    local = [LOCAL_CLUSTER] if any(n.cluster == LOCAL_CLUSTER for n in nodes) and (has_command or not others) else []
    return local + others
