"""Containment of a local job's processes: every process an attempt starts can be found and killed.

A process group or session is not enough: a job can `setsid`, double-fork or daemonize out of it. Three
mechanisms overlap, so that losing one still leaves the others:

- **A cgroup v2 per attempt** (where the host has a writable cgroup v2 hierarchy): each member runs in
  `<jobs>/<job>.<attempt>.<owner>/m<rank>` from before its `exec`, so nothing it starts can leave it
  (short of writing to cgroupfs itself). `cgroup.kill` kills the whole tree at once; `cgroup.events` says
  when it is empty. Where the `memory` / `cpu` controllers are delegated, the member's requests become its
  `memory.max` / `cpu.max`.
- **A child subreaper** (PR_SET_CHILD_SUBREAPER) on the process that launches jobs: descendants whose
  parent exits are re-parented to it instead of init, so a walk of /proc from the worker finds them.
- **A marker** in every job process's environment (`JOBSERVICE_ATTEMPT=<job>:<attempt>:<owner>`), which
  survives `setsid` and double forks. The owner is the launching process (pid and start time), so after a
  worker dies (SIGKILL, OOM) the next sweep on the host finds what it left behind and kills it.

This module imports neither `app` nor Celery.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("jobservice.worker")

MARKER = "JOBSERVICE_ATTEMPT"
_MARKER_BYTES = MARKER.encode() + b"="
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
JOBS_CGROUP = "jobservice-jobs"
WORKER_LEAF = "jobservice-worker"
CPU_PERIOD_US = 100_000
_CPU_MIN_QUOTA_US = 1_000  # the kernel refuses a smaller quota
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_-]")


# --- processes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks after boot: with the pid, identifies a process across pid reuse


def read_process(pid: int) -> ProcessInfo | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return ProcessInfo(pid, int(fields[1]), fields[0].decode(), int(fields[19]))


def list_processes() -> dict[int, ProcessInfo]:
    processes: dict[int, ProcessInfo] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # not Linux: process groups and PDEATHSIG-less members are all there is
        return processes
    for entry in entries:
        if entry.isdigit():
            info = read_process(int(entry))
            if info is not None:
                processes[info.pid] = info
    return processes


def read_marker(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            raw = environ.read()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(_MARKER_BYTES):
            return item[len(_MARKER_BYTES) :].decode(errors="replace")
    return None


def owner_token(pid: int | None = None) -> str:
    """This process as an owner: pid and start time, so that a reused pid is not taken for it."""
    if pid is None:
        return _own_token()
    info = read_process(pid)
    return f"{info.pid}-{info.start}" if info else f"{pid}-0"


_own_tokens: dict[int, str] = {}


def _own_token() -> str:
    # Read once per process (a forked pool process has a pid of its own), not from /proc at every attempt.
    pid = os.getpid()
    token = _own_tokens.get(pid)
    if token is None:
        info = read_process(pid)
        token = _own_tokens[pid] = f"{info.pid}-{info.start}" if info else f"{pid}-0"
    return token


def owner_alive(token: str) -> bool:
    pid, _, start = token.partition("-")
    if not pid.isdigit():
        return False
    info = read_process(int(pid))
    return info is not None and info.state != "Z" and str(info.start) == start


def _ticks_now() -> int:
    # /proc/PID/stat's start time counts clock ticks of CLOCK_BOOTTIME.
    clock = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
    return int(time.clock_gettime(clock) * os.sysconf("SC_CLK_TCK"))


def kill_pids(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def descendants(roots: Iterable[int], processes: dict[int, ProcessInfo]) -> set[int]:
    children: dict[int, list[int]] = {}
    for info in processes.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    stack = [p for p in roots if p in processes]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


_libc: ctypes.CDLL | None = None


def _prctl(option: int, value: int) -> bool:
    global _libc
    try:
        _libc = _libc or ctypes.CDLL("libc.so.6", use_errno=True)
        return _libc.prctl(option, value, 0, 0, 0) == 0
    except OSError:  # not Linux
        return False


_subreaper_of: int | None = None  # the pid that became a subreaper (a forked child is none)


def become_subreaper() -> bool:
    """Orphaned descendants of this process come back to it (not to init): it can find and reap them."""
    global _subreaper_of
    if _subreaper_of != os.getpid() and _prctl(_PR_SET_CHILD_SUBREAPER, 1):
        _subreaper_of = os.getpid()
    return _subreaper_of == os.getpid()


# Members of the executions running in this process: orphans are told apart from them, and never reaped
# here (their Popen object waits for them).
_registry_lock = threading.Lock()
_live_members: set[int] = set()
_live_executions = 0


def register_execution() -> None:
    global _live_executions
    with _registry_lock:
        _live_executions += 1


def unregister_execution(pids: Iterable[int]) -> None:
    global _live_executions
    with _registry_lock:
        _live_executions -= 1
        _live_members.difference_update(pids)


def register_member(pid: int) -> None:
    with _registry_lock:
        _live_members.add(pid)


def reap_orphans() -> None:
    """Collect exited orphans re-parented to this subreaper (they would stay zombies otherwise).

    `waitid(WNOWAIT)` peeks at an exited child without collecting it: a member's exit status belongs to its
    Popen object, so collection stops at the first one of those.
    """
    while True:
        try:
            exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if exited is None:
            return
        with _registry_lock:
            if exited.si_pid in _live_members:
                return
        try:
            os.waitpid(exited.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


# --- cgroup v2 ---------------------------------------------------------------------------------------

def _cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return Path(left.split()[4])
    except OSError:
        pass
    return None


def _own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup") as cgroups:
            for line in cgroups:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _read(path: Path) -> str:
    """A cgroup file's text (a few bytes), read without Path.read_text's text-file machinery: read at every attempt."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def find_jobs_cgroup(setting: str) -> Path | None:
    """Where the attempts' cgroups go: `off`, an absolute folder, or beside the worker's own cgroup: named
    `jobservice-jobs` (`auto`) or the name given (several workers' suites on one host keep apart that way)."""
    if setting == "off":
        return None
    if setting.startswith("/"):
        return Path(setting)
    name = JOBS_CGROUP if setting == "auto" else setting
    mount, own = _cgroup2_mount(), _own_cgroup()
    if mount is None or own is None:
        return None
    base = mount / own.lstrip("/")
    if base.name == WORKER_LEAF:  # this worker was moved into its leaf already (see prepare_jobs_cgroup)
        base = base.parent
    return base / name


def _enable_controllers(cgroup: Path, wanted: set[str]) -> set[str]:
    try:
        available = set(_read(cgroup / "cgroup.controllers").split())
        enabled = set(_read(cgroup / "cgroup.subtree_control").split()) if wanted & available else set()
    except OSError:
        return set()
    todo = (wanted & available) - enabled
    if todo:
        _write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(todo)))
    return (wanted & available)


def prepare_jobs_cgroup(setting: str, delegate: bool = False) -> Path | None:
    """The jobs' cgroup folder (created if missing), or None where cgroup v2 is not usable.

    With `delegate` (the worker's main process, before its pool starts) the `memory` and `cpu` controllers
    are handed down to it where the host allows. A non-root cgroup hands controllers to its children only
    while it holds no process itself: the worker first moves into a leaf of its own cgroup for that.
    """
    jobs = find_jobs_cgroup(setting)
    if jobs is None:
        return None
    try:
        jobs.mkdir(exist_ok=True)
        if not (jobs / "cgroup.procs").exists():
            raise OSError(errno.ENOTDIR, "not a cgroup v2 folder", str(jobs))
    except OSError as exc:
        log.warning("no cgroup for jobs (%s): containment by process tree and marker only", exc)
        return None
    if not delegate:
        return jobs
    wanted = {"memory", "cpu"}
    base = jobs.parent
    try:
        try:
            _enable_controllers(base, wanted)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            leaf = base / WORKER_LEAF
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", "0")
            _enable_controllers(base, wanted)
        _enable_controllers(jobs, wanted)
    except OSError as exc:
        log.warning("cgroup %s cannot delegate memory/cpu (%s): job limits are not enforced", base, exc)
    return jobs


def cpu_max(cpu_millis: int) -> str:
    quota = max(_CPU_MIN_QUOTA_US, cpu_millis * CPU_PERIOD_US // 1000)
    return f"{quota} {CPU_PERIOD_US}"


def _cgroup_pids(cgroup: Path) -> set[int]:
    pids: set[int] = set()
    for procs in cgroup.glob("**/cgroup.procs"):
        try:
            pids.update(int(p) for p in procs.read_text().split())
        except (OSError, ValueError):
            pass
    return pids


def _populated(cgroup: Path) -> bool:
    try:
        return "populated 1" in _read(cgroup / "cgroup.events")
    except OSError:
        return False


def _kill_cgroup(cgroup: Path) -> None:
    try:
        _write(cgroup / "cgroup.kill", "1")
    except FileNotFoundError:  # before Linux 5.14: kill what is there, again until it stays empty
        kill_pids(_cgroup_pids(cgroup), signal.SIGKILL)
    except OSError:
        pass


def _remove_cgroup(cgroup: Path) -> bool:
    """rmdir the tree, leaves first; False while a process is still in it."""
    try:
        # scandir's entry types come with the listing: a cgroup holds some 40 control files, and a stat of
        # each (Path.is_dir) was most of the end of a short job in the worker.
        with os.scandir(cgroup) as entries:
            children = sorted((entry.path for entry in entries if entry.is_dir(follow_symlinks=False)), reverse=True)
        for child in children:
            _remove_cgroup(Path(child))
        cgroup.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# --- one attempt -------------------------------------------------------------------------------------

class Containment:
    """Everything one attempt started: members and whatever they spawned, wherever it went."""

    def __init__(self, job_id: str, attempt: int, jobs_cgroup: Path | None, launcher: str | None = None) -> None:
        self.owner = owner_token()
        self.launcher = launcher  # workers/executors/launcher.py; None: sh and setpriv, or a preexec_fn
        self.marker = f"{job_id}:{attempt}:{self.owner}"
        self.cgroup: Path | None = None
        self.controllers: set[str] = set()  # enabled for the members' leaves: their limits are written where they are
        self.leaves: list[Path] = []
        self.members: list[int] = []
        self.since = _ticks_now()
        if jobs_cgroup is not None:
            cgroup = jobs_cgroup / f"{_SAFE_NAME.sub('_', job_id)}.{attempt}.{self.owner}"
            try:
                cgroup.mkdir(exist_ok=True)
                self.controllers = _enable_controllers(cgroup, {"memory", "cpu"})
                self.cgroup = cgroup
            except OSError as exc:
                log.warning("no cgroup for attempt %d (%s): containment by process tree and marker", attempt, exc, extra={"job_id": job_id})
        register_execution()

    def environment(self) -> dict[str, str]:
        return {MARKER: self.marker}

    def member_setup(self, rank: int, cpu_millis: int, memory_bytes: int) -> MemberStart:
        """How to start member `rank`: a preexec_fn for its child, or (None) an argv prefix, and a cleanup.

        A member started without a preexec_fn is started by Popen with vfork: a preexec_fn forces a real
        fork(), which copies the page tables of this (large) worker process for every member (68 ms for a
        250 MB worker, against 4-5 ms). The prefix joins the member's cgroup leaf (the writer of `0` to
        cgroup.procs moves itself) and sets its death signal before the program runs: nothing of the member
        runs outside its cgroup. Best is the launcher (one exec); else a shell joins the leaf and execs
        `setpriv --pdeathsig`; without setpriv, a preexec_fn does both.
        """
        become_subreaper()  # idempotent; and libc is loaded here, not in the forked child
        procs: Path | None = None
        if self.cgroup is not None:
            leaf = self.cgroup / f"m{rank}"
            leaf.mkdir(exist_ok=True)
            self.leaves.append(leaf)
            # The requests become limits where the controllers were delegated (enabled for the leaves: cpu.max and
            # memory.max exist in them).
            if "memory" in self.controllers and memory_bytes > 0:
                _write(leaf / "memory.max", str(memory_bytes))
                if (leaf / "memory.oom.group").exists():
                    _write(leaf / "memory.oom.group", "1")
            if "cpu" in self.controllers and cpu_millis > 0:
                _write(leaf / "cpu.max", cpu_max(cpu_millis))
            procs = leaf / "cgroup.procs"
        if self.launcher is not None:
            return MemberStart(None, [self.launcher, str(os.getpid()), str(procs) if procs else "-"], _nothing)
        prefix = pdeathsig_prefix()
        if prefix:
            if procs is None:
                return MemberStart(None, prefix, _nothing)
            return MemberStart(None, [_SHELL, "-c", _JOIN_CGROUP, str(procs), *prefix], _nothing)
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC) if procs is not None else -1

        def preexec() -> None:
            # In the child, between fork and exec: only system calls (other threads' locks are not ours).
            if fd >= 0:
                os.write(fd, b"0")
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

        def close() -> None:
            if fd >= 0:
                os.close(fd)

        return MemberStart(preexec, [], close)

    def add_member(self, pid: int) -> None:
        self.members.append(pid)
        register_member(pid)

    def pids(self) -> set[int]:
        """Every live process of the attempt (zombies have exited already)."""
        if self.cgroup is not None:
            return _cgroup_pids(self.cgroup)  # nothing leaves it but by writing to cgroupfs (see README)
        processes = list_processes()
        me = os.getpid()
        found = descendants(self.members, processes)
        with _registry_lock:
            others = _live_members - set(self.members)
            alone = _live_executions <= 1
        for info in processes.values():
            if info.ppid == me and info.pid not in others and info.pid not in self.members:
                # An orphan re-parented to this subreaper: ours if it says so, or (its environment wiped) if
                # it was born during this attempt and nobody else runs here.
                marker = read_marker(info.pid)
                if marker == self.marker or (marker is None and alone and info.start >= self.since):
                    found |= descendants([info.pid], processes)
        if _subreaper_of != me:  # orphans went to init: only their marker tells
            for pid in processes:
                if pid not in found and pid != me and read_marker(pid) == self.marker:
                    found |= descendants([pid], processes)
        found.discard(me)
        return {p for p in found if processes[p].state != "Z"} if found else found

    def signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGKILL and self.cgroup is not None:
            _kill_cgroup(self.cgroup)
        kill_pids(self.pids(), sig)

    def kill_all(self, rounds: int = 20) -> bool:
        """SIGKILL until nothing of the attempt is left; True once it is empty."""
        for attempt in range(rounds):
            if self.cgroup is not None:
                if not _populated(self.cgroup):
                    return True
                _kill_cgroup(self.cgroup)
            else:
                left = self.pids()
                if not left:
                    return True
                kill_pids(left, signal.SIGKILL)
            time.sleep(0.002 * (attempt + 1))
        return False

    def release(self) -> None:
        unregister_execution(self.members)
        reap_orphans()
        if self.cgroup is not None:
            try:
                # The leaves it made, then itself: a listing of the tree (40 control files a cgroup) only when that
                # fails, as when a member made cgroups of its own inside its leaf.
                for leaf in self.leaves:
                    try:
                        os.rmdir(leaf)
                    except FileNotFoundError:
                        pass
                os.rmdir(self.cgroup)
            except FileNotFoundError:
                pass
            except OSError:
                _remove_cgroup(self.cgroup)


_pdeathsig_prefix: list[str] | None = None
_SHELL = "/bin/sh"
# $0: the leaf's cgroup.procs; "$@": setpriv and the member's program. Exit 125 (as `env` and `timeout` use for
# their own failures) with a line in the job's log if the join fails: the member never runs outside its cgroup.
_JOIN_CGROUP = 'echo 0 > "$0" || { echo "jobservice: cannot join the attempt\'s cgroup ($0)" >&2; exit 125; }; exec "$@"'


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class MemberStart:
    """How a member is started: `preexec` for its child (forces fork), else `prefix` before its argv (vfork)."""

    preexec: Callable[[], None] | None
    prefix: list[str]
    close: Callable[[], None]  # the parent's cleanup after Popen


def pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig KILL --` (util-linux 2.33+), which sets the death signal and execs the member: a
    member then needs no preexec_fn; [] where it is missing or refuses the option (checked once per process)."""
    global _pdeathsig_prefix
    if _pdeathsig_prefix is None:
        _pdeathsig_prefix = []
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            prefix = [setpriv, "--pdeathsig", "KILL", "--"]
            try:
                if subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10).returncode == 0:
                    _pdeathsig_prefix = prefix
            except (OSError, subprocess.SubprocessError):
                pass
    return _pdeathsig_prefix


# --- after a worker died ------------------------------------------------------------------------------

def sweep(jobs_cgroup: Path | None) -> int:
    """Kill every job process whose launching process is gone (a worker that was SIGKILLed or crashed).

    Called when a worker starts on the host and then periodically; returns how many attempts it cleared.
    """
    cleared: set[str] = set()
    if jobs_cgroup is not None and jobs_cgroup.is_dir():
        for cgroup in jobs_cgroup.iterdir():
            owner = cgroup.name.rsplit(".", 1)[-1]
            if not cgroup.is_dir() or owner_alive(owner):
                continue
            if _populated(cgroup):
                cleared.add(cgroup.name)
                deadline = time.monotonic() + 5
                while _populated(cgroup) and time.monotonic() < deadline:
                    _kill_cgroup(cgroup)
                    time.sleep(0.01)
            _remove_cgroup(cgroup)
    for _ in range(20):
        doomed = set()
        for pid in list_processes():
            marker = read_marker(pid)
            if marker is not None and pid != os.getpid() and not owner_alive(marker.rsplit(":", 1)[-1]):
                doomed.add(pid)
                cleared.add(marker)
        if not doomed:
            break
        kill_pids(doomed, signal.SIGKILL)
        time.sleep(0.01)
    for what in sorted(cleared):
        log.warning("killed the leftover processes of %s (its worker is gone)", what)
    return len(cleared)
