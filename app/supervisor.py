"""Runs the Procfile's processes for `jobservice run` and keeps them running.

- A process that dies is restarted after a backoff (doubling up to a maximum, reset once the process
  has stayed up that long); what is left of its process group (a dead gunicorn master's workers still
  holding the port, a dead Celery worker's pool) is killed first. One process failing never stops others.
- SIGTERM or Ctrl-C stops them all: SIGTERM to each process (not its group: a Celery worker stops its
  own pool after its jobs), then SIGKILL to whatever is left of the groups after the grace.
- Each process runs in a session of its own and gets SIGTERM when the supervisor dies
  (PR_SET_PDEATHSIG). The pids are kept in a state file, so a run after a SIGKILLed one stops what the
  earlier run left (only processes that are still the ones it started) before binding any port.

No Flask and no Celery here: this module only knows commands and processes.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

log = logging.getLogger("jobservice.supervisor")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
POLL_SECONDS = 0.1


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: str
    port: int | None = None  # $PORT, as honcho hands it out: base port + 100 per Procfile line


def read_procfile(path: Path, names: Iterable[str] = (), base_port: int = 5000) -> list[ProcessSpec]:
    """The Procfile's processes (all, or those named), in file order."""
    from honcho.environ import parse_procfile

    processes = parse_procfile(path.read_text()).processes
    wanted = list(names) or list(processes)
    unknown = [name for name in wanted if name not in processes]
    if unknown:
        raise ValueError(f"not in {path}: {', '.join(unknown)} (it has {', '.join(processes)})")
    ports = {name: base_port + 100 * index for index, name in enumerate(processes)}
    return [ProcessSpec(name, processes[name], ports[name]) for name in processes if name in wanted]


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _identity(pid: int) -> float | None:
    """The process's start time: a pid alone may have been reused by another process since."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def _same_process(pid: int, started: float | None) -> bool:
    current = _identity(pid)
    return current is not None and started is not None and abs(current - started) < 0.01


def _group_members(pgid: int) -> list[int]:
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            continue
    return members


def kill_group(pgid: int) -> int:
    """SIGKILL every process left in a group; returns how many there were."""
    members = [pid for pid in _group_members(pgid) if pid != os.getpid()]
    if members:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return 0
    return len(members)


def clean_leftovers(state_file: Path) -> int:
    """Stop what a run that died without cleaning up left behind; refuse if that run still lives."""
    try:
        state = json.loads(state_file.read_text())
    except (FileNotFoundError, ValueError):
        return 0
    owner = state.get("supervisor", {})
    if owner.get("pid") and owner["pid"] != os.getpid() and _same_process(owner["pid"], owner.get("started")):
        raise AlreadyRunning(f"jobservice run is already running (pid {owner['pid']}, state in {state_file})")
    stopped = 0
    for entry in state.get("groups", {}).values():
        pgid, started = entry["pid"], entry.get("started")
        # Each process led a session of its own (pgid == pid). If a process with that pid runs and is
        # not the one recorded, the group is someone else's; if none does, its members are our orphans
        # (the kernel never reuses a pid while a group of that id has members).
        if _identity(pgid) is not None and not _same_process(pgid, started):
            continue
        stopped += kill_group(pgid)
    for entry in state.get("others", []):
        if _same_process(entry["pid"], entry.get("started")):
            os.kill(entry["pid"], signal.SIGKILL)
            stopped += 1
    if stopped:
        log.warning("stopped %d processes left behind by a previous run (supervisor pid %s)", stopped, owner.get("pid"))
    state_file.unlink(missing_ok=True)
    return stopped


@dataclass
class Child:
    spec: ProcessSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row that came before the process was up long enough to count as stable
    restart_at: float | None = None
    create_time: float | None = None


@dataclass
class Supervisor:
    specs: list[ProcessSpec]
    env: Mapping[str, str]
    cwd: Path
    state_file: Path
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 30.0
    stop_grace_seconds: float = 30.0
    others: list[int] = field(default_factory=list)  # more pids the next run stops if this one dies (embedded Redis)
    output: IO[str] = field(default_factory=lambda: sys.stdout)

    def __post_init__(self) -> None:
        if not (0 < self.backoff_seconds <= self.backoff_max_seconds <= 3600) or not 0 <= self.stop_grace_seconds <= 3600:
            raise ValueError("restart backoff must be 0 < first <= max <= 3600 s, the stop grace 0..3600 s")
        self.children = [Child(spec) for spec in self.specs]
        self._signals: list[int] = []
        self._output_lock = threading.Lock()
        self._width = max((len(spec.name) for spec in self.specs), default=0)

    def run(self) -> int:
        """Until SIGTERM/SIGINT: then stop everything and return 0."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self._start(child)
            while not self._signals:
                self._watch()
                time.sleep(POLL_SECONDS)
            log.info("received %s: stopping %s", signal.Signals(self._signals[0]).name, ", ".join(s.name for s in self.specs))
            self.stop()
            return 0
        except BaseException:
            log.exception("the supervisor failed: stopping every process")
            self.stop(grace_seconds=0.0)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.state_file.unlink(missing_ok=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                self._died(child, now)
            elif child.process is None and child.restart_at is not None and now >= child.restart_at:
                self._start(child)

    def _died(self, child: Child, now: float) -> None:
        assert child.process is not None
        pid, returncode = child.process.pid, child.process.returncode
        uptime = now - child.started_at
        leftovers = kill_group(pid)
        if uptime >= self.backoff_max_seconds:
            child.failures = 0
        delay = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** child.failures)
        child.failures += 1
        child.process = None
        child.restart_at = now + delay
        log.warning(
            "%s (pid %d) %s after %.1f s up%s; restarting it in %g s",
            child.spec.name, pid, describe_exit(returncode), uptime,
            f", killed {leftovers} processes left in its group" if leftovers else "", delay,
        )

    def _start(self, child: Child) -> None:
        env = dict(self.env)
        if child.spec.port is not None:
            env["PORT"] = str(child.spec.port)
        parent = os.getpid()

        def die_with_supervisor() -> None:
            # Runs in the child between fork and exec. PR_SET_PDEATHSIG survives the exec; it fires
            # when the forking thread ends, so children are only ever started from the main thread.
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the supervisor died before the prctl took effect
                os._exit(1)

        # `exec`: the command itself, not a shell, gets the signals (and leads the process group).
        child.process = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {child.spec.command}"], env=env, cwd=self.cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_supervisor,
        )
        child.started_at = time.monotonic()
        child.create_time = _identity(child.process.pid)
        child.restart_at = None
        assert child.process.stdout is not None
        threading.Thread(target=self._copy_output, args=(child.spec.name, child.process.stdout), daemon=True).start()
        self._write_state()
        log.info("started %s (pid %d): %s", child.spec.name, child.process.pid, child.spec.command)

    def _copy_output(self, name: str, stream: IO[bytes]) -> None:
        """Each line prefixed with its process's name, as honcho does."""
        prefix = f"{name.ljust(self._width)} | "
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self._output_lock:
                    try:
                        self.output.write(prefix + line + "\n")
                        self.output.flush()
                    except (OSError, ValueError):
                        pass  # our own output is gone (a closed terminal): keep draining the pipe

    def stop(self, grace_seconds: float | None = None) -> None:
        """SIGTERM to each process, SIGKILL to what is left after the grace (or at once on a second signal)."""
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (self.stop_grace_seconds if grace_seconds is None else grace_seconds)
        signals_before = len(self._signals)
        while time.monotonic() < deadline and len(self._signals) == signals_before:
            if all(c.process is None or c.process.poll() is not None for c in running):
                break
            time.sleep(POLL_SECONDS)
        for child in self.children:
            if child.process is None:
                continue
            if child.process.poll() is None:
                log.warning("%s (pid %d) still running after the grace: SIGKILL", child.spec.name, child.process.pid)
            kill_group(child.process.pid)
            child.process.wait()
            log.info("%s (pid %d) %s", child.spec.name, child.process.pid, describe_exit(child.process.returncode))

    def _write_state(self) -> None:
        """Pids and start times, for the next run to clean up after this one if it dies without doing so."""
        state = {
            "supervisor": {"pid": os.getpid(), "started": _identity(os.getpid())},
            "groups": {
                c.spec.name: {"pid": c.process.pid, "started": c.create_time}
                for c in self.children if c.process is not None
            },
            "others": [{"pid": pid, "started": _identity(pid)} for pid in self.others],
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.state_file)
